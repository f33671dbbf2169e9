#!/usr/bin/env bash
# The last device visit of a session for issue 17: the GPU tests of the batched paths, the benchmark's batched rows
# through the user's path, and the batch-vs-alone agreement; SWEEP=1 adds the batched-MoE sweep. Carry .whl.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
step() { echo; echo "== $1 ($(date +%T))"; }
step "GPU tests (batched paths)"
timeout "${TESTS_TIMEOUT:-90}" python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py \
  -k "continuous or graph_decoder or chat_on or load_on or kernel_engine or decode_step" 2>&1 | tail -4 \
  | tee "$OUT/gpu_tests.txt"
step "bench"
timeout "${BENCH_TIMEOUT:-170}" python3 -m ossscope.bench --batch ${BATCHES:-1 64 128} --batch-steps 64 \
  --collect ${COLLECT:-1000 256 64} --chat-tokens ${CHAT:-1024} --prefill --decode-steps 0 --no-kernels \
  --json "$OUT/bench.json" 2>&1 | grep -v "^ossscope: captured" | tail -20 | tee "$OUT/bench.txt"
step "agreement"
timeout 45 python3 scripts/batch_agreement.py --prompts 32 --new 48 2>&1 | tail -3 | tee "$OUT/agreement.txt"
if [ "${SWEEP:-0}" = 1 ]; then
  step "sweep"
  timeout 100 python3 scripts/moe_batch_sweep.py --json "$OUT/moe_batch.json" 2>&1 | tail -14 | tee "$OUT/sweep.txt"
fi
