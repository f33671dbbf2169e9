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
        keep = min(T, self.slots) if self.ring else T  # only the last `window` new keys can ever be seen again
        if positions.dim() == 1:
            k_pos = torch.cat((self.pos[0, :held], positions))
            slots = positions[-keep:] % self.slots if self.ring else positions
            self.k[:, slots] = k_new[:, -keep:]
            self.v[:, slots] = v_new[:, -keep:]
            self.pos[:, slots] = positions[-keep:]
            return k_all, v_all, k_pos
        k_pos = torch.cat((self.pos[:, :held], positions), dim=1)  # [B, S' + T]
        new_pos = positions[:, -keep:]  # [B, keep]
        slots = new_pos.clamp(min=0) % self.slots  # [B, keep]; a row at -1 rewrites its slot 0 with itself
        taking = new_pos >= 0
        for buffer, new in ((self.k, k_new), (self.v, v_new)):
            where = slots[:, :, None, None].expand(-1, -1, *buffer.shape[2:])
            buffer.scatter_(1, where, torch.where(taking[:, :, None, None], new[:, -keep:], buffer.gather(1, where)))
        self.pos.scatter_(1, slots, torch.where(taking, new_pos, self.pos.gather(1, slots)))
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
        if self.shared and self.active is None:
            return torch.arange(start, start + new_tokens, device=device)
        rows = [
            list(range(n, n + new_tokens)) if self.active is None or self.active[b] else [-1] * new_tokens
            for b, n in enumerate(self.lengths)
        ]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def advance(self, new_tokens: int) -> None:
        for b in self._fed_rows():
            self.lengths[b] += new_tokens
        if self.active is not None and not all(self.active):
            self.shared = False

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
        self.shared, self.active = True, None
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
