"""Shared fixtures: tiny random models and checkpoints written in both layouts."""

from __future__ import annotations

import os

import pytest
import torch

import ossscope

# Tests must never reach the network (the tokenizer is built offline from a package).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


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
