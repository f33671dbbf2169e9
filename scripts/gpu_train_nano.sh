#!/usr/bin/env bash
# One device visit: train gpt-oss-nano on the GPU machine from the corpus prepared on the CPU
# (`python -m ossscope.nano.train prepare --out .carry/nano`, carried along), writing everything under $OUT/nano.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
mkdir -p "$OUT/nano"
timeout "${TRAIN_TIMEOUT:-588}" python -m ossscope.nano.train train --data .carry/nano --out "$OUT/nano" \
  --minutes "${MINUTES:-7}" "$@" 2>&1 | tee "$OUT/nano/train.log"
ls -la "$OUT/nano" "$OUT/nano/weights"
