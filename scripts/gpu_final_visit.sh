#!/usr/bin/env bash
# The last device visit of a session for issue 17: GPU tests, the benchmark's batched rows (user's path), the
# batch-vs-alone agreement, and the batched-MoE sweep (for the notes). Carry .whl. Output in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
step() { echo; echo "== $1 ($(date +%T))"; }
step "GPU tests"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
step "bench"
timeout 240 python3 -m ossscope.bench --batch 1 8 64 128 --batch-steps 64 --collect 1000 256 64 --chat-tokens 1024 \
  --prefill --decode-steps 0 --no-kernels --json "$OUT/bench.json" 2>&1 | grep -v "^ossscope: captured" | tail -22 \
  | tee "$OUT/bench.txt"
step "agreement"
timeout 60 python3 scripts/batch_agreement.py 2>&1 | tail -3 | tee "$OUT/agreement.txt"
step "sweep"
timeout 100 python3 scripts/moe_batch_sweep.py --json "$OUT/moe_batch.json" 2>&1 | tail -14 | tee "$OUT/sweep.txt"
