#!/usr/bin/env bash
# One entry point that does all set-up itself on a fresh machine.
#   bash run.sh demo   install, then run the main job on the built-in nano model (writes ossscope-demo.html)
#   bash run.sh test   install with the test extras (and Chromium where apt is available), then run the tests
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

install_torch() {
  # A bare `torch` requirement pulls a multi-GB CUDA build; on machines without a GPU install the CPU wheel first.
  if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$PYTHON" -m pip install -q "torch>=2.4"
    else
      "$PYTHON" -m pip install -q "torch==2.13.0" || "$PYTHON" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
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
  test)
    install_torch
    "$PYTHON" -m pip install -q -e ".[lab,test]"
    install_chromium
    shift
    exec "$PYTHON" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash run.sh demo | test [pytest args]" >&2
    exit 2
    ;;
esac
