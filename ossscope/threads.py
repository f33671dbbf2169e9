"""The torch thread count for small models on CPU: one.

A forward of nano is a few hundred tiny matrix products. A second thread saves little when the machine is
idle and costs a great deal when it is busy, because every product waits for a thread that is not running:
measured on the shared 2-core development machine (load average 4-6), re-reading nano's 230-token demo
sequence took 1.0 s with torch's default of 2 threads and 0.2 s with one, and the demo took 63-72 s instead
of 8 s (before the expert cache; see docs/PERFORMANCE.md). So `Model.forward` runs a small CPU model with one
thread and puts the setting back afterwards. Nothing changes when the user chose a count (`OMP_NUM_THREADS`),
for big models, or on GPUs.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_MODEL_PARAMETERS = 200_000_000  # below this a model's products are too small for threads to pay
SMALL_MODEL_THREADS = 1

# torch's OpenMP thread count is a per-thread setting, so each Python thread saves and restores its own;
# nesting (a forward inside a chat, a chat inside a callback) restores once, at the outermost exit.
_local = threading.local()
_counts: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


def parameter_count(model: torch.nn.Module) -> int:
    """Weights of `model`, counting each packed MXFP4 byte as the two values it holds (computed once a model)."""
    count = _counts.get(model)
    if count is None:
        dense = sum(p.numel() for p in model.parameters())
        packed = sum(2 * b.numel() for name, b in model.named_buffers() if name.endswith("_blocks"))
        count = _counts[model] = dense + packed
    return count


def threads_for(model: torch.nn.Module) -> int | None:
    """The torch thread count to run `model` with, or None to leave torch's setting alone."""
    if os.environ.get("OMP_NUM_THREADS") or getattr(model, "device", torch.device("cpu")).type != "cpu":
        return None
    if parameter_count(model) >= SMALL_MODEL_PARAMETERS:
        return None
    return SMALL_MODEL_THREADS


@contextmanager
def cpu_threads(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with `threads_for(model)` torch threads (if any) in this Python thread, then restore."""
    depth = getattr(_local, "depth", 0)
    threads = threads_for(model) if depth == 0 else None
    if depth == 0 and threads is None:
        yield
        return
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
