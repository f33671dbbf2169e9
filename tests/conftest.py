"""Shared fixtures: tiny random models and checkpoints written in both layouts."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

import ossscope

REPO_ROOT = Path(__file__).resolve().parent.parent


def _unshadow_hub_kernels() -> None:
    """Keep our top-level kernels/ folder from posing as Hugging Face's `kernels` package.

    `python -m pytest` puts the repository root on sys.path, where kernels/ (installed as `ossscope.kernels`)
    is importable as a top-level `kernels`. transformers (which depends on the hub's `kernels` package) then
    runs `from kernels import CUDAProperties` against our folder and fails, and every test that builds the HF
    reference model would break. Bind the name to the real package, or to nothing if it is not installed.
    """
    def shadows(entry: str) -> bool:
        return Path(entry or ".").resolve() == REPO_ROOT

    if not any(shadows(entry) for entry in sys.path) or "kernels" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if not shadows(entry)]
    try:
        importlib.import_module("kernels")
    except ImportError:
        sys.modules["kernels"] = None  # `import kernels` fails and find_spec says "not installed", as it should
    finally:
        sys.path[:] = saved


_unshadow_hub_kernels()

# Tests must never reach the network (the tokenizer is built offline from a package).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fresh seed: every check draws new random inputs (tests/test_kernels_gpu.py has its
    own, on the GPU)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))


@pytest.fixture(scope="session")
def tiny_model() -> ossscope.Model:
    """4 layers (2 sliding with window 8, 2 full), 8 experts top-2, GQA 4/2, fp32 on CPU. Do not mutate."""
    return ossscope.random_model("tiny", seed=0, device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_model):
    """The tiny model written in both layouts (the HF one sharded): {"original": path, "hf": path}."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "original": ossscope.write_checkpoint(tiny_model, root / "original-layout"),
        "hf": ossscope.write_checkpoint(tiny_model, root / "hf-layout", layout="hf", max_shard_bytes=300_000),
    }
