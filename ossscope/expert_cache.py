"""A bounded cache of dequantized MXFP4 experts, so small models stop re-decoding their weights every call.

The torch path (`ops.moe_experts`) decodes each chosen expert's packed weights on every forward. For a model
like nano that decoding was half of a chat's time on CPU (cProfile: `mxfp4.dequantize` 1.04 s of 2.06 s), while
all its experts fit in 72 MB as fp32. `EXPERT_CACHE.get(blocks, scales, expert, dtype)` returns the decoded
expert, remembering it:

- validity: an entry belongs to one packed tensor object (held by weak reference) and records that tensor's
  data pointer and version counter. Any in-place write (`copy_`, `load_state_dict`, slice assignment) bumps
  the version; swapping `.data` moves the pointer; a new tensor (`.to()`, reassignment) is another object.
  Each of these makes the entry stale, and a stale entry is decoded again.
- size: entries are evicted least recently used first to stay within `max_bytes` (default 512 MiB, or
  `OSSSCOPE_EXPERT_CACHE_MB`; 0 turns the cache off). A packed tensor whose experts would take more than a
  quarter of the budget is never cached: gpt-oss-20b's layers (0.5-1 GB each as bf16) are decoded per call as
  before, so big models on CPU keep their memory instead of churning the cache.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .mxfp4 import BLOCK_SIZE, dequantize

DEFAULT_MAX_BYTES = 512 * 2**20
ADMIT_FRACTION = 4  # a packed tensor is cached only if all its experts fit in max_bytes / ADMIT_FRACTION


@dataclass
class _Entry:
    blocks: weakref.ref
    scales: weakref.ref
    stamp: tuple[int, int, int, int]  # (blocks data_ptr, blocks version, scales data_ptr, scales version)
    value: torch.Tensor
    nbytes: int


def _stamp(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[int, int, int, int]:
    return blocks.data_ptr(), blocks._version, scales.data_ptr(), scales._version


def _budget_from_env() -> int:
    raw = os.environ.get("OSSSCOPE_EXPERT_CACHE_MB")
    if raw is None:
        return DEFAULT_MAX_BYTES
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(
            f"OSSSCOPE_EXPERT_CACHE_MB must be a number of MiB (0 turns the cache off), got {raw!r}") from None
    if megabytes < 0:
        raise ValueError(f"OSSSCOPE_EXPERT_CACHE_MB must not be negative, got {raw!r}")
    return int(megabytes * 2**20)


class ExpertCache:
    """Least-recently-used cache of decoded experts, bounded by bytes; safe to share between threads."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._dead: list[tuple] = []  # keys whose packed tensor was freed (appended by weakref callbacks)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.max_bytes = 0
        self.set_max_bytes(max_bytes)

    def set_max_bytes(self, max_bytes: int) -> None:
        """Change the budget (0 turns caching off); entries beyond it are evicted now."""
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def clear(self) -> None:
        """Drop every entry (and reset the hit / miss counters)."""
        with self._lock:
            self._entries.clear()
            self._dead.clear()
            self.nbytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def admits(self, blocks: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether experts of this packed tensor [E, rows, G, 16] are cached at all (see the module docstring)."""
        decoded_bytes = blocks.numel() * 2 * dtype.itemsize  # two values per packed byte
        if blocks.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # a tensor allocated inside a CUDA graph capture belongs to the graph's pool
        return 0 < decoded_bytes <= self.max_bytes // ADMIT_FRACTION

    def get(self, blocks: torch.Tensor, scales: torch.Tensor, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `expert` of blocks uint8 [E, rows, G, 16], scales uint8 [E, rows, G] -> [rows, G * 32] in `dtype`.

        Equal to `mxfp4.dequantize(blocks[expert], scales[expert], dtype)`; the result is shared: do not modify it.
        """
        if blocks.dim() != 4 or blocks.shape[-1] != BLOCK_SIZE // 2 or scales.shape != blocks.shape[:-1]:
            raise ValueError(f"expected packed experts blocks [E, rows, G, 16] and scales [E, rows, G], got "
                             f"{tuple(blocks.shape)} and {tuple(scales.shape)}")
        if not self.admits(blocks, dtype):
            return dequantize(blocks[expert], scales[expert], dtype)
        key = (id(blocks), id(scales), expert, dtype)
        stamp = _stamp(blocks, scales)
        with self._lock:
            if self._dead:
                self._evict()
            entry = self._entries.get(key)
            if entry is not None and entry.blocks() is blocks and entry.scales() is scales and entry.stamp == stamp:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.value
        # Decode outside the lock; a tensor made under inference_mode could not be reused outside it later.
        with torch.inference_mode(False), torch.no_grad():
            value = dequantize(blocks[expert], scales[expert], dtype)
        nbytes = value.numel() * value.element_size()
        with self._lock:
            self.misses += 1
            stale = self._entries.pop(key, None)
            if stale is not None:
                self.nbytes -= stale.nbytes
            # A freed model's experts go at the next call instead of waiting to be evicted. The callback only
            # appends (atomic): it can run during garbage collection in any thread, even one holding the lock.
            forget = lambda _ref, key=key: self._dead.append(key)  # noqa: E731
            self._entries[key] = _Entry(weakref.ref(blocks, forget), weakref.ref(scales, forget), stamp, value,
                                        nbytes)
            self.nbytes += nbytes
            self._evict()
        return value

    def _evict(self) -> None:
        """Drop entries of freed tensors, then least recently used ones until within budget (lock held)."""
        while self._dead:
            key = self._dead.pop()
            entry = self._entries.get(key)
            if entry is not None and (entry.blocks() is None or entry.scales() is None):
                del self._entries[key]
                self.nbytes -= entry.nbytes
        while self._entries and self.nbytes > self.max_bytes:
            _, entry = self._entries.popitem(last=False)
            self.nbytes -= entry.nbytes


# The one cache the torch expert path uses (`ops.moe_experts`).
EXPERT_CACHE = ExpertCache(_budget_from_env())
