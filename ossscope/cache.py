"""KV cache for incremental decoding.

Full-attention layers keep every key up to `max_len`; sliding-window layers keep only the last `window` keys
in a ring buffer (slot = position % window), since nothing older is ever visible again. Each slot records the
absolute position of the key in it (-1 = empty), and attention masks by position, so the ring's order
doesn't matter.
"""

from __future__ import annotations

import torch

from .config import GptOssConfig


class ContextLimitError(ValueError):
    """Raised when a sequence would run past the cache's (or the model's) context limit."""


class LayerCache:
    """Keys and values of one layer: k, v [B, S, Hkv, Dh], pos [S] (absolute position per slot, -1 empty)."""

    def __init__(self, batch: int, slots: int, kv_heads: int, head_dim: int, ring: bool, device, dtype) -> None:
        self.k = torch.zeros(batch, slots, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.ring = ring
        self.filled = 0  # slots in use (they fill from slot 0 before a ring wraps)

    @property
    def slots(self) -> int:
        return self.pos.shape[0]

    def update(
        self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the keys/values to attend over (held ones, then the new ones) and store the new ones.

        k_new, v_new [B, T, Hkv, Dh], positions [T] -> k, v [B, S' + T, Hkv, Dh], k_pos [S' + T].
        """
        held = self.filled
        k_all = torch.cat((self.k[:, :held], k_new), dim=1)
        v_all = torch.cat((self.v[:, :held], v_new), dim=1)
        k_pos = torch.cat((self.pos[:held], positions))
        T = positions.shape[0]
        if self.ring:
            keep = min(T, self.slots)  # only the last `window` new keys can ever be seen again
            slots = positions[-keep:] % self.slots
            self.k[:, slots] = k_new[:, -keep:]
            self.v[:, slots] = v_new[:, -keep:]
            self.pos[slots] = positions[-keep:]
            self.filled = min(self.slots, held + T)
        else:
            self.k[:, held : held + T] = k_new
            self.v[:, held : held + T] = v_new
            self.pos[held : held + T] = positions
            self.filled = held + T
        return k_all, v_all, k_pos


class KVCache:
    """Per-layer caches plus the number of tokens processed so far (`length`)."""

    def __init__(self, config: GptOssConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > config.max_context:
            raise ContextLimitError(f"max_len {max_len} exceeds the model's context limit of {config.max_context}")
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.layers = [
            LayerCache(
                batch_size,
                min(config.sliding_window, max_len) if config.is_sliding(layer) else max_len,
                config.num_key_value_heads,
                config.head_dim,
                ring=config.is_sliding(layer),
                device=device,
                dtype=dtype,
            )
            for layer in range(config.num_hidden_layers)
        ]

    def check_room(self, batch: int, new_tokens: int) -> None:
        if batch != self.batch_size:
            raise ValueError(f"this cache holds a batch of {self.batch_size}, got input_ids with batch {batch}")
        if self.length + new_tokens > self.max_len:
            raise ContextLimitError(
                f"{self.length} cached + {new_tokens} new tokens exceed the cache's max_len of {self.max_len} "
                f"(the model allows up to {self.config.max_context}; allocate a larger cache)"
            )

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def reset(self) -> None:
        """Empty the cache in place (its buffers, and any CUDA graph that reads them, stay valid)."""
        self.length = 0
        for layer in self.layers:
            layer.pos.fill_(-1)
            layer.filled = 0

    def __repr__(self) -> str:
        return f"KVCache(batch={self.batch_size}, length={self.length}, max_len={self.max_len})"
