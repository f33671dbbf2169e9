"""KV cache: incremental decoding equals recomputing the whole sequence, past the sliding window."""

from __future__ import annotations

import pytest
import torch

from ossscope.cache import ContextLimitError


def test_cached_decoding_matches_full_recompute(tiny_model):
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    full = tiny_model(ids)
    cache = tiny_model.new_cache(batch_size=2, max_len=64)
    pieces = [tiny_model(ids[:, :13], cache=cache)]  # prefill longer than the window of 8
    pieces += [tiny_model(ids[:, t : t + 1], cache=cache) for t in range(13, 30)]
    pieces.append(tiny_model(ids[:, 30:], cache=cache))  # a chunk again
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 40
    assert cache.layers[0].k.shape[1] == 8 and cache.layers[1].k.shape[1] == 64  # ring buffer vs full


def test_cached_hooks_see_the_window_and_sinks(tiny_model):
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    _, full = tiny_model.run_with_cache(ids, names=lambda n: "hook_sink" in n)
    cache = tiny_model.new_cache(1, 32)
    tiny_model(ids[:, :19], cache=cache)
    _, step = tiny_model.run_with_cache(ids[:, 19:], cache=cache, names=lambda n: "attn.hook_" in n)
    for layer in range(4):
        name = f"blocks.{layer}.attn.hook_sink"
        torch.testing.assert_close(step[name], full[name][..., 19:])
    assert step["blocks.0.attn.hook_pattern"].shape[-1] == 8 + 1  # ring of 8 held keys + the new one
    assert step["blocks.1.attn.hook_pattern"].shape[-1] == 20


def test_context_limit_is_a_clear_error(tiny_model):
    cache = tiny_model.new_cache(1, 10)
    tiny_model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ContextLimitError, match="8 cached \\+ 3 new tokens exceed the cache's max_len of 10"):
        tiny_model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch of 1"):
        tiny_model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ContextLimitError, match="context limit"):
        tiny_model.new_cache(1, tiny_model.config.max_context + 1)
