"""The torch thread count for generating with small models on CPU.

A token of nano is a few hundred tiny matrix products: a second thread saves little when the machine is idle
(217 vs 190 tok/s on 2 idle cores) and costs a great deal when it is busy, because every product waits for a
thread that is not running (17 tok/s, and the demo took 154-171 s instead of 10 s on a loaded 2-core machine).
So `model.chat` / `model.generate` run a small CPU model with one thread and put the setting back afterwards.
Nothing changes when the user chose a count (`OMP_NUM_THREADS`), for big models, or on GPUs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_MODEL_PARAMETERS = 200_000_000  # below this a model's products are too small for threads to pay
SMALL_MODEL_THREADS = 1

# torch's OpenMP thread count is a per-thread setting, so each Python thread saves and restores its own;
# nesting (a chat inside a chat's callback) restores once, at the outermost exit.
_local = threading.local()


def parameter_count(model: torch.nn.Module) -> int:
    """Weights of `model`, counting each packed MXFP4 byte as the two values it holds."""
    dense = sum(p.numel() for p in model.parameters())
    packed = sum(2 * b.numel() for name, b in model.named_buffers() if name.endswith("_blocks"))
    return dense + packed


def threads_for(model: torch.nn.Module) -> int | None:
    """The torch thread count to generate with, or None to leave torch's setting alone."""
    if os.environ.get("OMP_NUM_THREADS") or getattr(model, "device", torch.device("cpu")).type != "cpu":
        return None
    if parameter_count(model) >= SMALL_MODEL_PARAMETERS:
        return None
    return SMALL_MODEL_THREADS


@contextmanager
def generation_threads(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with `threads_for(model)` torch threads (if any) in this Python thread, then restore."""
    threads = threads_for(model)
    if threads is None:
        yield
        return
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.saved = torch.get_num_threads()
        if threads < _local.saved:
            torch.set_num_threads(threads)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth -= 1
        if _local.depth == 0 and torch.get_num_threads() != _local.saved:
            torch.set_num_threads(_local.saved)
