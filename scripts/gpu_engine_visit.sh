#!/usr/bin/env bash
# One device visit for the engine: the GPU tests, nano through model.chat on both engines, and the benchmark's
# chat and engine rows on the gpt-oss-20b shape. Carry .whl (openai-harmony, quicktok-v1, pydantic and its
# needs, which the GPU image lacks). Everything lands in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() { echo; echo "== $1 ($(date +%T))"; }
step "GPU tests"
timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py \
  2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
step "nano through model.chat, both engines"
timeout 150 python3 scripts/chat_engines.py nano --device cuda --max-new-tokens 300 2>&1 | tail -12 | tee "$OUT/nano.txt"
step "bench (gpt-oss-20b shape)"
timeout "${BENCH_TIMEOUT:-300}" python3 -m ossscope.bench --prefill 2048 --chat-tokens 128 1024 --no-kernels \
  --json "$OUT/bench.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
