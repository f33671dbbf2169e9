"""The dequantized-expert cache: equal to decoding, invalidated by every kind of weight change, bounded by size."""

from __future__ import annotations

import gc

import pytest
import torch

import ossscope
from ossscope import expert_cache
from ossscope.expert_cache import ExpertCache
from ossscope.mxfp4 import dequantize, random_packed


def packed(experts=4, rows=8, K=64, seed=0):
    return random_packed((experts, rows), K, generator=torch.Generator().manual_seed(seed))


def test_cached_expert_equals_decoding_and_is_reused():
    cache = ExpertCache(2**20)
    blocks, scales = packed()
    first = cache.get(blocks, scales, 2, torch.float32)
    assert torch.equal(first, dequantize(blocks[2], scales[2], torch.float32)) and first.shape == (8, 64)
    assert cache.get(blocks, scales, 2, torch.float32) is first
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    # another expert, another dtype: separate entries
    assert torch.equal(cache.get(blocks, scales, 2, torch.bfloat16), dequantize(blocks[2], scales[2]))
    assert cache.get(blocks, scales, 3, torch.float32) is not first and len(cache) == 3


@pytest.mark.parametrize("change", ["slice assignment", "copy_ of scales", "data swap", "new tensor"])
def test_any_weight_change_invalidates(change):
    cache = ExpertCache(2**20)
    blocks, scales = packed()
    other_blocks, other_scales = packed(seed=1)
    before = cache.get(blocks, scales, 1, torch.float32)
    if change == "slice assignment":
        blocks[1] = other_blocks[1]
    elif change == "copy_ of scales":
        scales.copy_(other_scales)
    elif change == "data swap":
        blocks.data = other_blocks.clone()
    else:
        blocks = other_blocks.clone()
    after = cache.get(blocks, scales, 1, torch.float32)
    assert torch.equal(after, dequantize(blocks[1], scales[1], torch.float32))
    assert not torch.equal(after, before) and cache.misses == 2


def test_size_bound_evicts_least_recently_used_and_big_tensors_are_not_cached():
    blocks, scales = packed(experts=4)  # one expert decodes to 8 x 64 fp32 = 2 KiB; all four to 8 KiB
    KiB = 2**10
    cache = ExpertCache(32 * KiB)  # admits tensors of up to 32 / ADMIT_FRACTION = 8 KiB decoded
    for expert in range(4):
        cache.get(blocks, scales, expert, torch.float32)
    cache.get(blocks, scales, 0, torch.float32)  # expert 0 becomes the most recently used
    assert cache.nbytes == 8 * KiB and len(cache) == 4
    cache.set_max_bytes(6 * KiB)  # one entry too many: the least recently used (expert 1) goes
    assert [key[2] for key in cache._entries] == [2, 3, 0] and cache.nbytes == 6 * KiB
    # At this budget the tensor (8 KiB decoded) is too big to cache at all: decoded per call, nothing kept.
    assert not cache.admits(blocks, torch.float32)
    assert torch.equal(cache.get(blocks, scales, 1, torch.float32), dequantize(blocks[1], scales[1], torch.float32))
    assert len(cache) == 3 and cache.misses == 4
    off = ExpertCache(0)
    assert torch.equal(off.get(blocks, scales, 0, torch.float32), dequantize(blocks[0], scales[0], torch.float32))
    assert len(off) == 0


def test_entries_of_freed_tensors_are_dropped():
    cache = ExpertCache(2**20)
    blocks, scales = packed()
    cache.get(blocks, scales, 0, torch.float32)
    del blocks
    gc.collect()
    keep_b, keep_s = packed(seed=2)
    cache.get(keep_b, keep_s, 0, torch.float32)
    assert len(cache) == 1 and cache.nbytes == 8 * 64 * 4


def test_bad_inputs_are_clear_errors(monkeypatch):
    blocks, scales = packed()
    with pytest.raises(ValueError, match=r"blocks \[E, rows, G, 16\]"):
        ExpertCache().get(blocks[0], scales[0], 0, torch.float32)
    with pytest.raises(ValueError, match="non-negative"):
        ExpertCache(-1)
    monkeypatch.setenv("OSSSCOPE_EXPERT_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="OSSSCOPE_EXPERT_CACHE_MB must be a number"):
        expert_cache._budget_from_env()
    monkeypatch.setenv("OSSSCOPE_EXPERT_CACHE_MB", "64")
    assert expert_cache._budget_from_env() == 64 * 2**20


def test_model_outputs_follow_loaded_weights_with_the_cache_on():
    """The shared cache must not serve a model its old experts after load_state_dict replaces them."""
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    a, b = ossscope.random_model("tiny", seed=0, device="cpu"), ossscope.random_model("tiny", seed=1, device="cpu")
    expert_cache.EXPERT_CACHE.clear()
    first = a(ids)
    assert expert_cache.EXPERT_CACHE.misses > 0 and a(ids).equal(first) and expert_cache.EXPERT_CACHE.hits > 0
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)
    budget = expert_cache.EXPERT_CACHE.max_bytes
    try:
        expert_cache.EXPERT_CACHE.set_max_bytes(0)
        torch.testing.assert_close(b(ids), a(ids), atol=0, rtol=0)
    finally:
        expert_cache.EXPERT_CACHE.set_max_bytes(budget)


def test_gpt_oss_20b_layers_are_not_cached():
    # One layer's mlp2 experts of gpt-oss-20b: [32, 2880, 90, 16] packed; 0.5 GB decoded as bf16.
    big = torch.empty((32, 2880, 90, 16), dtype=torch.uint8, device="meta")
    assert not expert_cache.EXPERT_CACHE.admits(big, torch.bfloat16)
    assert expert_cache.EXPERT_CACHE.admits(torch.empty((16, 512, 8, 16), dtype=torch.uint8), torch.float32)
