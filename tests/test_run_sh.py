"""run.sh installs the CPU build of torch where there is no GPU and says which build it installed.

A stand-in `python` records the pip commands instead of running them, so this takes milliseconds and no network.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

RUN_SH = Path(__file__).resolve().parent.parent / "run.sh"

# `python -c "import torch"` fails until `python -m pip install ...torch...` has "succeeded" (a marker file);
# pip fails for the URLs listed in $FAIL_INDEX; `say_torch`'s one-liner prints a build.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-W" ]; then shift 2; fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "pip ${*:3}" >> "$LOG"
  for arg in "$@"; do [ -n "${FAIL_INDEX:-}" ] && [ "$arg" = "$FAIL_INDEX" ] && exit 1; done
  touch "$HOME/installed"
  exit 0
fi
if [ "$1" = "-c" ]; then
  [ -f "$HOME/installed" ] || exit 1
  case "$2" in *print*) echo "run.sh: using torch 2.13.0+cpu (CPU build)";; esac
  exit 0
fi
exit 3
"""


def run_install(tmp_path: Path, gpu: bool, fail_index: str | None = None) -> tuple[str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    if gpu:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H200'\n")
        smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "pip.log"
    # PATH: the stand-ins, then only what bash needs (no real nvidia-smi can sneak in).
    tools = {Path(shutil.which(name)).parent for name in ("bash", "touch", "dirname")}
    env = {"PATH": os.pathsep.join([str(bin_dir), *map(str, tools)]), "HOME": str(tmp_path), "LOG": str(log),
           "PYTHON": str(fake), "FAIL_INDEX": fail_index or ""}
    done = subprocess.run(["bash", str(RUN_SH), "torch"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_without_a_gpu_the_cpu_build_is_installed_and_named(tmp_path):
    out, pip = run_install(tmp_path, gpu=False)
    assert "no GPU: installing the CPU build of torch 2.13.0 from https://download.pytorch.org/whl/cpu" in out
    assert len(pip) == 1 and "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in pip[0]
    assert out.strip().splitlines()[-1] == "run.sh: using torch 2.13.0+cpu (CPU build)"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_an_unreachable_cpu_index_falls_back_to_the_configured_one(tmp_path):
    out, pip = run_install(tmp_path, gpu=False, fail_index="https://download.pytorch.org/whl/cpu")
    assert len(pip) == 2 and pip[1] == "pip install -q torch==2.13.0"
    assert "did not work" in out and out.strip().splitlines()[-1].endswith("(CPU build)")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_with_a_gpu_torch_comes_from_pypi(tmp_path):
    out, pip = run_install(tmp_path, gpu=True)
    assert "a GPU is present" in out and pip == ["pip install -q torch>=2.4"]
