"""What the CPU kernel tests share: Triton's interpreter, switched on before the kernels are imported.

Triton decides when a function is decorated whether it is compiled or interpreted (its own library functions
too), so `interpreted_kernels` sets TRITON_INTERPRET=1 before Triton and `ossscope.kernels` are imported, and
imports both afresh if an earlier module imported them for compilation. If the interpreter is already on, it
imports nothing again: Triton aborts when its modules are imported twice in one process. On a machine with a
GPU the calling module is skipped (the compiled kernels are checked there instead).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch


def interpreted_kernels(on_a_gpu: str) -> ModuleType:
    """`ossscope.kernels` under the interpreter; skips the calling module on a GPU machine (`on_a_gpu` says
    what checks the compiled kernels there)."""
    if torch.cuda.is_available():
        pytest.skip(f"a GPU is present: {on_a_gpu}", allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        for name in [m for m in sys.modules if m.startswith(("ossscope.kernels", "triton"))]:
            del sys.modules[name]  # decorate Triton's library and our kernels again, now for the interpreter
    pytest.importorskip("triton")
    return importlib.import_module("ossscope.kernels")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
