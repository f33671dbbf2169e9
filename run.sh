#!/usr/bin/env bash
# One entry point that does all set-up itself on a fresh machine.
#   bash run.sh demo   install, then run the main job on the built-in nano model (writes ossscope-demo.html)
#   bash run.sh test   install with the test extras (and Chromium where apt is available), then run the tests
#   bash run.sh torch  install torch only: the CPU build where there is no GPU (one line says which build)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# The CPU build of torch, from PyTorch's CPU index. TORCH_CPU_INDEX / TORCH_VERSION override (e.g. for a mirror).
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

say_torch() {
  "$PYTHON" -W ignore -c "import torch; print('run.sh: using torch', torch.__version__, \
'(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU build)')"
}

install_torch() {
  # A bare `torch` requirement on Linux pulls the multi-GB CUDA build from PyPI. Without a GPU, install the CPU
  # build explicitly first; then the project's `torch>=2.4` is already satisfied.
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    say_torch
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "run.sh: a GPU is present: installing torch with CUDA from PyPI"
    "$PYTHON" -m pip install -q "torch>=2.4"
  else
    echo "run.sh: no GPU: installing the CPU build of torch $TORCH_VERSION from $TORCH_CPU_INDEX"
    # Short timeouts: where that index is unreachable (an offline mirror, a proxy) fall back quickly to the
    # configured index, which may hold a CPU wheel (pip's find-links); say_torch reports which build it was.
    if ! "$PYTHON" -m pip install -q --timeout 20 --retries 1 --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"; then
      echo "run.sh: $TORCH_CPU_INDEX did not work; installing torch==$TORCH_VERSION from the configured index"
      "$PYTHON" -m pip install -q "torch==$TORCH_VERSION"
    fi
  fi
  say_torch
}

install_chromium() {
  # The browser tests drive Debian's Chromium through playwright-python; skip quietly where we cannot install it.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "run.sh: could not install chromium; browser tests will be skipped" >&2
  fi
}

case "${1:-}" in
  demo)
    install_torch
    "$PYTHON" -m pip install -q -e ".[lab]"
    shift
    exec "$PYTHON" -m ossscope demo "$@"
    ;;
  torch)
    install_torch
    ;;
  test)
    install_torch
    "$PYTHON" -m pip install -q -e ".[lab,test]"
    install_chromium
    shift
    exec "$PYTHON" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash run.sh demo [demo args] | test [pytest args] | torch (install torch only)" >&2
    exit 2
    ;;
esac
