#!/usr/bin/env bash
# One device visit for batching (issue 17): the GPU tests, the ragged attention check (RAGGED=0 skips it), with
# SWEEP=1 the batched-MoE sweep, with NANO=1 nano's eval on the GPU, and with BENCH=1 the benchmark's batched rows
# through the user's path (generate over a list of prompts; collect).
# Carry .whl (openai-harmony, quicktok-v1, pydantic and its needs, which the GPU image lacks). Output in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
step() { echo; echo "== $1 ($(date +%T))"; }
if [ "${TESTS:-1}" = 1 ]; then
  step "GPU tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
if [ "${RAGGED:-1}" = 1 ]; then
  step "ragged attention"
  timeout 120 python3 scripts/ragged_attention_check.py 2>&1 | tail -30 | tee "$OUT/ragged.txt"
fi
if [ "${SWEEP:-0}" = 1 ]; then
  step "batched MoE sweep"
  timeout 150 python3 scripts/moe_batch_sweep.py --json "$OUT/moe_batch.json" 2>&1 | tail -50 | tee "$OUT/sweep.txt"
fi
if [ "${BENCH:-0}" = 1 ]; then
  step "bench: batched decode, collect, chat (gpt-oss-20b shape)"
  timeout "${BENCH_TIMEOUT:-420}" python3 -m ossscope.bench --batch ${BATCHES:-1 8 32 64 128} --batch-steps 64 \
    --collect ${COLLECT:-1000 256 64} --chat-tokens ${CHAT:-1024} --prefill --decode-steps 0 --no-kernels \
    ${BASELINE:-} --json "$OUT/bench.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
fi
if [ "${NANO:-0}" = 1 ]; then
  step "nano eval on the GPU (MXFP4 kernels, greedy, through the user's path)"
  timeout "${NANO_TIMEOUT:-150}" python3 -m ossscope.nano.eval --n 20 --n-tools 10 --agentic 5 \
    --json "$OUT/nano_eval.json" 2>&1 | tail -25 | tee "$OUT/nano_eval.txt"
fi
