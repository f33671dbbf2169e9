"""KV cache for incremental decoding, one row per sequence, each row at its own length.

Full-attention layers keep every key up to `max_len`; sliding-window layers keep only the last `window` keys
in a ring buffer (slot = position % window), since nothing older is ever visible again. Each slot records the
absolute position of the key in it, per row (-1 = empty), and attention masks by position, so neither the ring's
order nor a row being shorter than another matters.

Rows: `lengths[b]` tokens of row b are cached. A batch whose rows were filled together (one prompt length, every
row fed every step) is *shared*: its positions are one [T] range and the attention kernels get one k_pos row,
exactly as for a single sequence. A ragged batch (rows reset or prefilled one at a time through `row(b)`, or a
step that feeds only some rows) gets positions [B, T] and per-row key positions. In a step that feeds only some
rows (`only(active)`), the others take position -1: they write nothing and attend to nothing, and stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .config import GptOssConfig


def to_device(values: torch.Tensor | list, device) -> torch.Tensor:
    """A small host tensor (or list of ints) on `device` without stopping the GPU's queue: torch's plain copy from
    pageable memory waits for the stream to drain, which would cost a decoder running ahead of the host a step."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    device = torch.device(device) if device is not None else t.device
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps it until copied


class ContextLimitError(ValueError):
    """Raised when a sequence would run past the cache's (or the model's) context limit."""


class LayerCache:
    """Keys and values of one layer: k, v [B, S, Hkv, Dh], pos [B, S] (each row's absolute position per slot, -1
    empty). `owner` is the KVCache whose row lengths say how many slots are in use."""

    def __init__(self, owner: KVCache, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ring: bool) -> None:
        self.owner, self.k, self.v, self.pos, self.ring = owner, k, v, pos, ring

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    @property
    def filled(self) -> int:
        """Slots that may hold keys: those the longest row has used (they fill from slot 0 before a ring wraps)."""
        return min(self.slots, self.owner.length)

    def update(
        self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the keys/values to attend over (held ones, then the new ones) and store the new ones.

        k_new, v_new [B, T, Hkv, Dh]; positions [T] (every row at the same positions: a shared cache) or [B, T]
        (per row; -1 = this row takes no token) -> k, v [B, S' + T, Hkv, Dh] and k_pos [S' + T] for positions [T],
        [B, S' + T] for positions [B, T].
        """
        held = self.filled
        k_all = torch.cat((self.k[:, :held], k_new), dim=1)
        v_all = torch.cat((self.v[:, :held], v_new), dim=1)
        T = positions.shape[-1]
        if positions.dim() == 1:
            keep = min(T, self.slots) if self.ring else T  # only the last `window` new keys can be seen again
            k_pos = torch.cat((self.pos[0, :held], positions))
            slots = positions[-keep:] % self.slots if self.ring else positions
            self.k[:, slots] = k_new[:, -keep:]
            self.v[:, slots] = v_new[:, -keep:]
            self.pos[:, slots] = positions[-keep:]
            return k_all, v_all, k_pos
        k_pos = torch.cat((self.pos[:, :held], positions), dim=1)  # [B, S' + T]
        # Per row: a token is stored unless it is padding (-1) or, in a ring, more than a window behind the row's
        # newest. Stored tokens of a row have distinct slots; every other entry of the scatter repeats one
        # stored entry of its row (same slot, same value), or rewrites slot 0 with itself, so no two writes of
        # different values ever race for a slot.
        newest = positions.amax(dim=1, keepdim=True)  # [B, 1]
        taking = (positions >= 0) & ((positions > newest - self.slots) if self.ring else True)  # [B, T]
        slots = positions.clamp(min=0) % self.slots  # [B, T]
        column = torch.arange(T, device=positions.device).expand_as(positions)
        last = torch.where(taking, column, -1).amax(dim=1, keepdim=True)  # [B, 1] a stored column, -1: none
        has = last >= 0
        pick = last.clamp(min=0)
        slots = torch.where(taking, slots, torch.where(has, slots.gather(1, pick), 0))
        for buffer, new in ((self.k, k_new), (self.v, v_new)):
            expand = (-1, -1, *buffer.shape[2:])
            keep_old = buffer[:, :1].expand(-1, T, *buffer.shape[2:])  # slot 0 as it is
            stand_in = torch.where(has[:, :, None, None], new.gather(1, pick[:, :, None, None].expand(expand)),
                                   keep_old)  # [B, T, ...]: the row's stored entry, or slot 0 unchanged
            values = torch.where(taking[:, :, None, None], new, stand_in)
            buffer.scatter_(1, slots[:, :, None, None].expand(expand), values)
        pos_stand_in = torch.where(has, positions.gather(1, pick), self.pos[:, :1])
        self.pos.scatter_(1, slots, torch.where(taking, positions, pos_stand_in))
        return k_all, v_all, k_pos


class KVCache:
    """Per-layer caches plus the number of tokens each row has processed (`lengths`; `length` is the longest)."""

    def __init__(self, config: GptOssConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > config.max_context:
            raise ContextLimitError(f"max_len {max_len} exceeds the model's context limit of {config.max_context}")
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        self.lengths = [0] * batch_size
        self.shared = True  # every row at the same positions with the same slots filled (see the module docstring)
        self.active: list[bool] | None = None  # during `only(active)`: the rows the next forward feeds
        self.pad_lengths: list[int] | None = None  # during `padded(lengths)`: each row's real tokens
        self.layers = []
        for layer in range(config.num_hidden_layers):
            ring = config.is_sliding(layer)
            slots = min(config.sliding_window, max_len) if ring else max_len
            kv = (batch_size, slots, config.num_key_value_heads, config.head_dim)
            k = torch.zeros(kv, device=device, dtype=dtype)
            pos = torch.full((batch_size, slots), -1, dtype=torch.long, device=device)
            self.layers.append(LayerCache(self, k, torch.zeros_like(k), pos, ring))

    @property
    def length(self) -> int:
        """Tokens cached in the longest row (every row's, in a shared cache)."""
        return max(self.lengths)

    def room(self, row: int | None = None) -> int:
        """How many more tokens row `row` (default: the longest) can take."""
        return self.max_len - (self.length if row is None else self.lengths[row])

    def _fed_rows(self) -> list[int]:
        return [b for b in range(self.batch_size) if self.active is None or self.active[b]]

    def check_room(self, batch: int, new_tokens: int) -> None:
        if batch != self.batch_size:
            raise ValueError(f"this cache holds a batch of {self.batch_size}, got input_ids with batch {batch}")
        fed = self._fed_rows()
        longest = max((self.lengths[b] for b in fed), default=0)
        if longest + new_tokens > self.max_len:
            raise ContextLimitError(
                f"{longest} cached + {new_tokens} new tokens exceed the cache's max_len of {self.max_len} "
                f"(the model allows up to {self.config.max_context}; allocate a larger cache)"
            )

    def positions(self, new_tokens: int, device=None) -> torch.Tensor:
        """The absolute positions of the next `new_tokens` tokens: [T] in a shared cache, else [B, T] (-1 for the
        rows this step does not feed)."""
        start = self.lengths[0]
        if self.shared and self.active is None and self.pad_lengths is None:
            return torch.arange(start, start + new_tokens, device=device)
        real = self.pad_lengths or [new_tokens] * self.batch_size
        rows = [
            [n + t if t < real[b] else -1 for t in range(new_tokens)] if self.active is None or self.active[b]
            else [-1] * new_tokens
            for b, n in enumerate(self.lengths)
        ]
        return to_device(rows, device)

    def last_indices(self) -> list[int] | None:
        """During `padded(lengths)`: each row's last real token (where its next-token logits are), else None."""
        return None if self.pad_lengths is None else [n - 1 for n in self.pad_lengths]

    def advance(self, new_tokens: int) -> None:
        for b in self._fed_rows():
            self.lengths[b] += new_tokens if self.pad_lengths is None else self.pad_lengths[b]
        if (self.active is not None and not all(self.active)) or (
                self.pad_lengths is not None and len(set(self.pad_lengths)) > 1):
            self.shared = False

    @contextmanager
    def padded(self, lengths: Sequence[int]) -> Iterator[KVCache]:
        """Within this block, a forward of T tokens per row feeds row b only its first lengths[b]: the rest is
        right padding at position -1 (nothing written, nothing attended; its outputs mean nothing), so prompts of
        different lengths prefill together without changing what each row computes."""
        if len(lengths) != self.batch_size or min(lengths) < 1:
            raise ValueError(f"padded needs {self.batch_size} lengths of at least 1, got {list(lengths)}")
        self.pad_lengths = [int(n) for n in lengths]
        try:
            yield self
        finally:
            self.pad_lengths = None

    @contextmanager
    def only(self, active: Sequence[bool] | None) -> Iterator[KVCache]:
        """Within this block, forwards over the whole batch feed only the rows where `active` is true; the
        others get position -1 (nothing written, nothing attended) and keep their length. None: every row."""
        if active is not None and len(active) != self.batch_size:
            raise ValueError(f"active has {len(active)} entries for a batch of {self.batch_size}")
        previous = self.active
        self.active = None if active is None or all(active) else [bool(a) for a in active]
        try:
            yield self
        finally:
            self.active = previous

    def reset(self) -> None:
        """Empty the cache in place (its buffers, and any CUDA graph that reads them, stay valid)."""
        self.lengths = [0] * self.batch_size
        self.shared = True
        for layer in self.layers:
            layer.pos.fill_(-1)

    def reset_row(self, b: int) -> None:
        """Empty row b only (a finished sequence's slot, for the next prompt)."""
        if self.batch_size == 1:
            self.reset()
            return
        self.lengths[b] = 0
        self.shared = False
        for layer in self.layers:
            layer.pos[b].fill_(-1)

    def row(self, b: int) -> KVCache:
        """Row b as a cache of batch 1 over the same storage: a prompt or a tool's answer for one sequence runs
        through it at batch 1, with batch-1 numerics; its length goes back to `lengths[b]`."""
        if not 0 <= b < self.batch_size:
            raise IndexError(f"row {b} of a cache with batch {self.batch_size}")
        return _RowCache(self, b)

    def __repr__(self) -> str:
        lengths = self.lengths[0] if self.shared else self.lengths
        return f"KVCache(batch={self.batch_size}, length={lengths}, max_len={self.max_len})"


class _RowCache(KVCache):
    """One row of a KVCache, as a cache of batch 1 sharing its storage (see `KVCache.row`)."""

    def __init__(self, parent: KVCache, b: int) -> None:  # noqa: D107 (not KVCache's allocation)
        self.parent, self.b = parent, b
        self.config, self.batch_size, self.max_len = parent.config, 1, parent.max_len
        self.shared, self.active, self.pad_lengths = True, None, None
        self.layers = [LayerCache(self, lc.k[b : b + 1], lc.v[b : b + 1], lc.pos[b : b + 1], lc.ring)
                       for lc in parent.layers]

    @property
    def lengths(self) -> list[int]:  # type: ignore[override]
        return [self.parent.lengths[self.b]]

    @lengths.setter
    def lengths(self, value: list[int]) -> None:
        self.parent.lengths[self.b] = value[0]
        if self.parent.batch_size > 1:
            self.parent.shared = False

    def advance(self, new_tokens: int) -> None:
        self.lengths = [self.lengths[0] + new_tokens]

    def reset(self) -> None:
        self.parent.reset_row(self.b)

    def row(self, b: int) -> KVCache:
        if b != 0:
            raise IndexError(f"row {b} of a cache with batch 1")
        return self
