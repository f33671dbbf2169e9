"""The Triton kernels against their torch twins, on CPU through Triton's interpreter (fp32/fp16 only).

`tests/_interpreter.py` switches the interpreter on before Triton and `ossscope.kernels` are imported (and says
why that must come first). On a machine with a GPU these tests are skipped: tests/test_kernels_gpu.py checks the
compiled kernels there. Every check draws fresh
random inputs, poisons the outputs first, and uses sizes that are not multiples of the kernels' blocks.
"""

from __future__ import annotations

import pytest
import torch
from _interpreter import interpreted_kernels, rel

kernels = interpreted_kernels("tests/test_kernels_gpu.py checks the compiled kernels")
from ossscope.kernels.norm import add_rms_norm_reference  # noqa: E402
from ossscope.kernels.routing import route_reference  # noqa: E402

import ossscope  # noqa: E402
from ossscope import fast, mxfp4, ops  # noqa: E402

# -- MXFP4 ---------------------------------------------------------------------------------------------------


def test_dequantize_matches_reference_for_every_byte_and_many_scales():
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16)  # every pair of nibbles
    for scale in (100, 119, 126, 127, 128, 140, 200):
        scales = torch.full((16,), scale, dtype=torch.uint8)
        ours = kernels.dequantize(blocks, scales, torch.float32)
        assert torch.equal(ours, mxfp4.dequantize(blocks, scales, torch.float32)), scale


def test_dequantize_random_tensor(gen):
    blocks, scales = mxfp4.random_packed((3, 7), 96, generator=gen)
    ours = kernels.dequantize(blocks, scales, torch.float32)
    assert torch.equal(ours, mxfp4.dequantize(blocks, scales, torch.float32))


# -- routing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masks", ["none", "reroute", "zero", "both"])
def test_route_matches_twin(gen, masks):
    N, E, k = 37, 12, 3  # N spans three blocks of 16, E is not a power of two
    logits = torch.randn(N, E, generator=gen)
    reroute = torch.zeros(E, dtype=torch.bool)
    reroute[torch.randperm(E, generator=gen)[:3]] = True
    zero = torch.zeros(E, dtype=torch.bool)
    zero[torch.randperm(E, generator=gen)[:4]] = True
    r = reroute if masks in ("reroute", "both") else None
    z = zero if masks in ("zero", "both") else None
    indices = torch.full((N, k), -7, dtype=torch.int64)
    weights = torch.full((N, k), float("nan"))
    kernels.route(logits, k, r, z, out=(indices, weights))
    ref_i, ref_w = route_reference(logits, k, r, z)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    if r is not None:
        assert not reroute[indices].any()
    if z is not None:
        assert (weights[zero[indices]] == 0).all() and weights.sum(-1).le(1 + 1e-6).all()


def test_route_keeps_leading_dims_and_bf16_logits(gen):
    logits = torch.randn(2, 5, 8, generator=gen).to(torch.bfloat16)
    indices, weights = kernels.route(logits, 2)
    ref_i, ref_w = route_reference(logits, 2)
    assert indices.shape == (2, 5, 2) and weights.shape == (2, 5, 2)
    # bf16 logits tie now and then; which tied expert comes first is the implementation's choice (torch.topk's
    # order is unspecified too), so require the same chosen values in the same order, and the same experts
    # wherever no tie among the top k + 1 values leaves a choice.
    assert torch.equal(logits.gather(-1, indices), logits.gather(-1, ref_i))
    top = logits.float().topk(3, dim=-1).values  # [2, 5, k + 1]
    untied = (top[..., 1:] != top[..., :-1]).all(-1)
    assert torch.equal(indices[untied], ref_i[untied])
    torch.testing.assert_close(weights, ref_w)


# -- experts -------------------------------------------------------------------------------------------------


def _experts(gen, E, D, I, dtype):
    w1 = mxfp4.quantize(torch.randn(E, 2 * I, D, generator=gen) / D**0.5)
    w2 = mxfp4.quantize(torch.randn(E, D, I, generator=gen) / I**0.5)
    b1 = (torch.randn(E, 2 * I, generator=gen) * 0.1).to(dtype)
    b2 = (torch.randn(E, D, generator=gen) * 0.1).to(dtype)
    return (*w1, b1, *w2, b2)


# Small tiles so the interpreter is quick and D, I are not multiples of them (BLOCK_K 64 against D = 96).
SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_N1": 32, "BLOCK_N2": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1,
                "BLOCK_I": 32, "GROUPS_I": 2, "WARPS_I": 4, "BLOCK_D": 32, "GROUPS_D": 2, "WARPS_D": 4, "SPLIT_D": 3}


@pytest.mark.parametrize("N", [1, 3, 13])  # 1 and 3 tokens take the streaming kernels, 13 the grouped GEMMs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_experts_matches_twin(gen, N, dtype):
    E, D, I, k = 5, 96, 160, 2  # D/2 = 48 bytes and I = 160 are not multiples of the blocks
    packed = _experts(gen, E, D, I, dtype)
    x = torch.randn(N, D, generator=gen).to(dtype)
    indices, weights = route_reference(torch.randn(N, E, generator=gen), k)
    y = torch.full((N, D), float("nan"), dtype=dtype)
    y, expert_out = kernels.moe_experts(x, indices, weights, *packed, 7.0, 1.702, per_expert=True, out=y,
                                        blocks=SMALL_BLOCKS)
    ref_packed = [t.float() if t.is_floating_point() else t for t in packed]
    ref_y, ref_out = ops.moe_experts(x.float(), indices, weights, *ref_packed, 7.0, 1.702, per_expert=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel(y, ref_y) < tol and rel(expert_out, ref_out) < tol


def test_moe_swiglu_clamps_large_activations(gen):
    E, D, I = 3, 64, 64
    packed = _experts(gen, E, D, I, torch.float32)
    x = torch.randn(20, D, generator=gen) * 30  # pushes gate/linear units far past the limit of 7
    indices, weights = route_reference(torch.randn(20, E, generator=gen), 2)
    y = kernels.moe_experts(x, indices, weights, *packed, blocks=SMALL_BLOCKS)
    assert rel(y, ops.moe_experts(x, indices, weights, *packed)) < 1e-5


def _word_order(D: int) -> torch.Tensor:
    """Where each input feature goes in the MoE decode kernels' word order (spelled out independently)."""
    f = torch.arange(D)
    return (f // 32) * 32 + (f % 8) * 4 + (f // 8) % 4


def test_moe_decode_parts_odd_k_and_word_order(gen):
    E, D, I, k = 5, 96, 160, 3  # k = 3: not a power of two
    packed = _experts(gen, E, D, I, torch.float32)
    x = torch.randn(2, D, generator=gen)
    words = kernels.input_words(x)
    expected = torch.empty_like(words)
    expected[:, _word_order(D)] = x * 2.0**64
    assert torch.equal(words, expected)
    indices, weights = route_reference(torch.randn(2, E, generator=gen), k)
    parts = kernels.moe_decode_parts(words, indices, *packed, blocks={"BLOCK_I": 16, "GROUPS_I": 2,
                                                                      "BLOCK_D": 16, "GROUPS_D": 2, "SPLIT_D": 1})
    _, ref_out = ops.moe_experts(x, indices, weights, *packed, per_expert=True)
    assert rel(parts, ref_out.reshape(2 * k, D)) < 1e-5


def test_group_by_expert_layout(gen):
    indices = torch.randint(0, 6, (11, 3), generator=gen)
    row_slot, block_expert = kernels.group_by_expert(indices, 6, 4)
    flat = indices.reshape(-1)
    assert sorted(row_slot[row_slot >= 0].tolist()) == list(range(33))  # every slot exactly once
    rows_expert = block_expert.repeat_interleave(4)
    valid = row_slot >= 0
    assert torch.equal(flat[row_slot[valid].long()], rows_expert[valid].long())
    # A fixed number of blocks (no host sync): the used ones first, then unused ones holding no slot.
    assert block_expert.shape[0] == 9 + 6
    used = block_expert >= 0
    assert used.sum() == ((torch.bincount(flat, minlength=6) + 3) // 4).sum() and not used[int(used.sum()):].any()
    assert (row_slot.view(-1, 4)[~used] == -1).all()


# -- attention -----------------------------------------------------------------------------------------------


def _qkv(gen, B, Tq, Tk, H, Hkv, Dh, dtype):
    q = torch.randn(B, Tq, H, Dh, generator=gen).to(dtype)
    k = torch.randn(B, Tk, Hkv, Dh, generator=gen).to(dtype)
    v = torch.randn(B, Tk, Hkv, Dh, generator=gen).to(dtype)
    return q, k, v, torch.randn(H, generator=gen)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_prefill_matches_twin(gen, window, dtype):
    B, T, H, Hkv, Dh = 2, 37, 4, 2, 16
    q, k, v, sinks = _qkv(gen, B, T, T, H, Hkv, Dh, dtype)
    pos = torch.arange(T)
    z = torch.full((B, T, H, Dh), float("nan"), dtype=dtype)
    sink = torch.full((B, H, T), float("nan"))
    kernels.attention_prefill(q, k, v, sinks, pos, pos, window, block_m=16, block_n=16, out=z, sink_out=sink)
    ref_z, ref_sink, _ = ops.attention(q.float(), k.float(), v.float(), sinks, pos, pos, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel(z, ref_z) < tol
    torch.testing.assert_close(sink, ref_sink, rtol=tol, atol=tol)


def test_attention_prefill_continues_a_ring_cache(gen):
    """New queries after cached keys whose positions are scrambled and partly empty (a ring buffer)."""
    B, Tq, Tk, H, Hkv, Dh = 1, 9, 30, 4, 1, 16
    q, k, v, sinks = _qkv(gen, B, Tq, Tk, H, Hkv, Dh, torch.float32)
    k_pos = torch.randperm(40, generator=gen)[:Tk]
    k_pos[::4] = -1
    q_pos = torch.arange(31, 31 + Tq)
    for window in (None, 12):
        z, sink = kernels.attention_prefill(q, k, v, sinks, q_pos, k_pos, window, block_m=16, block_n=16)
        ref_z, ref_sink, _ = ops.attention(q, k, v, sinks, q_pos, k_pos, window)
        assert rel(z, ref_z) < 1e-5
        torch.testing.assert_close(sink, ref_sink)


def test_attention_row_that_sees_nothing_gives_sink_one_and_zero_output(gen):
    q, k, v, sinks = _qkv(gen, 1, 3, 5, 2, 1, 16, torch.float32)
    k_pos = torch.tensor([7, 8, -1, 9, 10])  # every key is in the queries' future
    q_pos = torch.tensor([0, 1, 2])
    z, sink = kernels.attention_prefill(q, k, v, sinks, q_pos, k_pos, None, block_m=16, block_n=16)
    assert torch.equal(z, torch.zeros_like(z)) and torch.equal(sink, torch.ones_like(sink))


@pytest.mark.parametrize("window", [None, 8])
def test_attention_decode_matches_twin_with_pattern(gen, window):
    B, Tk, H, Hkv, Dh = 2, 45, 8, 2, 16
    q, k, v, sinks = _qkv(gen, B, 1, Tk, H, Hkv, Dh, torch.float32)
    k_pos = torch.randperm(60, generator=gen)[:Tk]
    k_pos[::5] = -1
    q_pos = torch.tensor([50])
    z = torch.full((B, 1, H, Dh), float("nan"))
    sink = torch.full((B, H), float("nan"))
    pattern = torch.full((B, H, Tk), float("nan"))
    _, sink_mass, pat = kernels.attention_decode(q, k, v, sinks, q_pos, k_pos, window, need_pattern=True,
                                                 block_n=16, splits=3, out=z, sink_out=sink, pattern_out=pattern)
    ref_z, ref_sink, ref_pat = ops.attention(q, k, v, sinks, q_pos, k_pos, window, need_pattern=True)
    assert rel(z, ref_z) < 1e-5
    torch.testing.assert_close(sink_mass, ref_sink)
    torch.testing.assert_close(pat, ref_pat)
    torch.testing.assert_close(pattern.sum(-1) + sink, torch.ones(B, H))


@pytest.mark.parametrize("window,splits,pattern", [(None, 3, True), (6, 1, False), (None, None, False),
                                                    (6, 4, True)])
def test_attention_decode_step_equals_rope_then_decode(gen, window, splits, pattern):
    """The fused step (RoPE, cache write, attention, merged in one kernel) against qkv_rope then the torch twin;
    the new slot holds an older key (a ring buffer) that the step must not see."""
    B, S, H, Hkv, Dh = 2, 45, 8, 2, 16
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, generator=gen)
    k_cache, v_cache = torch.randn(B, S, Hkv, Dh, generator=gen), torch.randn(B, S, Hkv, Dh, generator=gen)
    k_pos = torch.randperm(60, generator=gen)[:S]
    k_pos[::5] = -1
    position, slot = torch.tensor([61]), torch.tensor([int(torch.randint(0, S, (), generator=gen))])
    k_pos[slot] = 55  # an older key in the slot the new one overwrites
    sinks, cos, sin = torch.randn(H, generator=gen), torch.randn(1, Dh // 2, generator=gen), torch.randn(
        1, Dh // 2, generator=gen)
    ref_k, ref_v, ref_pos = k_cache.clone(), v_cache.clone(), k_pos.clone()
    q, _, _ = kernels.qkv_rope(qkv.view(B, 1, -1), cos, sin, H, Hkv, k_dst=ref_k, v_dst=ref_v, slots=slot,
                               positions=position, k_pos_dst=ref_pos)
    ref_z, ref_sink, ref_pat = ops.attention(q, ref_k, ref_v, sinks, position, ref_pos, window, need_pattern=True)
    counters = kernels.decode_counters(B, Hkv, "cpu")
    z, sink = torch.full((B, 1, H, Dh), float("nan")), torch.full((B, H), float("nan"))
    pattern_out = torch.full((B, H, S), float("nan")) if pattern else None
    z, sink_mass, pat = kernels.attention_decode_step(
        qkv, cos, sin, k_cache, v_cache, k_pos, slot, position, sinks, window, H, need_pattern=pattern,
        block_n=16, splits=splits, out=z, sink_out=sink, pattern_out=pattern_out, counters=counters)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v) and torch.equal(k_pos, ref_pos)
    assert rel(z, ref_z) < 1e-5
    torch.testing.assert_close(sink_mass, ref_sink)
    if pattern:
        torch.testing.assert_close(pat, ref_pat)
    assert not counters.any()  # left zeroed for the next call


@pytest.mark.parametrize("position,splits", [(0, 3), (17, 3), (44, None), (30, 1)])
def test_attention_decode_step_keys_in_order_reads_no_slot_past_the_new_one(gen, position, splits):
    """A full-attention cache fills its slots in order (slot = position): the step stops at the new slot, and
    gives what reading every slot gives, however large the cache."""
    B, S, H, Hkv, Dh = 2, 45, 8, 2, 16
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, generator=gen)
    k_cache, v_cache = torch.randn(B, S, Hkv, Dh, generator=gen), torch.randn(B, S, Hkv, Dh, generator=gen)
    k_pos = torch.where(torch.arange(S) < position, torch.arange(S), -1)
    slot = pos = torch.tensor([position])
    sinks, cos, sin = torch.randn(H, generator=gen), torch.randn(1, Dh // 2, generator=gen), torch.randn(
        1, Dh // 2, generator=gen)
    results = []
    for in_order in (False, True):
        k, v, kp = k_cache.clone(), v_cache.clone(), k_pos.clone()
        z, sink_mass, _ = kernels.attention_decode_step(qkv, cos, sin, k, v, kp, slot, pos, sinks, None, H,
                                                        block_n=16, splits=splits, keys_in_order=in_order)
        results.append((z, sink_mass, k, kp))
    (z0, s0, k0, p0), (z1, s1, k1, p1) = results
    assert torch.equal(k0, k1) and torch.equal(p0, p1) and int(p1[position]) == position
    assert rel(z1, z0) < 1e-6
    torch.testing.assert_close(s1, s0)


def test_attention_dispatch_matches_twin(gen):
    q, k, v, sinks = _qkv(gen, 1, 1, 20, 4, 2, 16, torch.float16)
    pos = torch.arange(20)
    z, sink, pattern = kernels.attention(q, k, v, sinks, pos[-1:], pos, None)
    ref_z, ref_sink, _ = ops.attention(q.float(), k.float(), v.float(), sinks, pos[-1:], pos, None)
    assert pattern is None and rel(z, ref_z) < 2e-3
    torch.testing.assert_close(sink, ref_sink, rtol=1e-3, atol=1e-3)


# -- linear ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 11])  # 11: past GEMV_MAX_BATCH, torch's turn
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_matches_torch(gen, batch, dtype):
    N, K = 37, 300  # neither a multiple of the row tile nor of BLOCK_K
    x = torch.randn(batch, 1, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype) / K**0.5
    b = torch.randn(N, generator=gen).to(dtype)
    for bias in (b, None):
        out = torch.full((batch, 1, N), float("nan"), dtype=dtype)
        y = kernels.linear(x, w, bias, out=out, blocks={"ROWS": 4, "BLOCK_K": 128})
        ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        assert y is out and rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("masks,split_d", [("none", 1), ("both", 1), ("both", 3), ("none", 7)])
def test_moe_decode_routed_matches_route_then_experts(gen, masks, split_d):
    E, D, I, k, N = 12, 96, 160, 3, 2  # split 7 ways, down's 5 groups leave some programs nothing to add
    packed = _experts(gen, E, D, I, torch.float32)
    x = torch.randn(N, D, generator=gen)
    logits = torch.randn(N, E, generator=gen)
    reroute = torch.zeros(E, dtype=torch.bool)
    reroute[torch.randperm(E, generator=gen)[:3]] = True
    zero = ~reroute & (torch.rand(E, generator=gen) < 0.5)
    r, z = (reroute, zero) if masks == "both" else (None, None)
    ref_i, ref_w = route_reference(logits, k, r, z)
    _, ref_out = ops.moe_experts(x, ref_i, ref_w, *packed, per_expert=True)
    blocks = {"BLOCK_I": 16, "GROUPS_I": 1, "BLOCK_D": 16, "GROUPS_D": 1, "SPLIT_D": split_d}
    indices = torch.full((N, k), -7, dtype=torch.int64)
    weights = torch.full((N, k), float("nan"))
    parts, _, _ = kernels.moe_decode_routed(kernels.input_words(x), logits, k, *packed, 7.0, 1.702, r, z,
                                            indices_out=indices, weights_out=weights, blocks=blocks)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    assert parts.shape == (N * k * split_d, D)
    assert rel(parts.view(N * k, split_d, D).sum(1), ref_out.reshape(N * k, D)) < 1e-5
    # The decoder's residual update sums the split parts with the routing weights.
    residual, _ = kernels.add_rms_norm(x, parts, torch.ones(D), 1e-5, weights=weights)
    torch.testing.assert_close(residual, x + (ref_out * ref_w[..., None]).sum(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="router_logits must be contiguous"):
        kernels.moe_decode_routed(kernels.input_words(x), logits[:, :-1], k, *packed)


# -- MoE decode on fp8 tensor cores (kernels/moe_tc.py) -----------------------------------------------------


def test_input_slices_match_twin_and_hold_bf16_exactly(gen):
    x = torch.randn(3, 320, generator=gen)  # 10 groups: a whole tile of 8 and part of another
    x[0, :32] = 0.0  # an all-zero group
    x[1, 40:50] *= 1e-3  # inputs about 2**10 below their group's largest
    x = x.bfloat16()
    bt, xe = kernels.input_slices(x)
    ref_bt, ref_xe = kernels.moe_tc.slices_reference(x)
    assert torch.equal(bt.view(torch.uint8), ref_bt.view(torch.uint8)) and torch.equal(xe, ref_xe)
    value, groups = kernels.moe_tc.slices_value(bt, xe).view(3, 10, 32), x.float().view(3, 10, 32)
    largest = groups.abs().amax(-1, keepdim=True)
    within = groups.abs() >= largest / 256  # within 2**8 of the group's largest: exact
    assert within.sum() < within.numel() and torch.equal(value[within], groups[within])
    assert ((value - groups).abs() <= largest * 2.0**-16).all()
    # Written in place into used buffers: every place that can be nonzero is overwritten.
    again = kernels.input_slices(x.flip(0), out=(bt, xe))
    flip_bt, flip_xe = kernels.moe_tc.slices_reference(x.flip(0))
    assert torch.equal(again[0].view(torch.uint8), flip_bt.view(torch.uint8)) and torch.equal(again[1], flip_xe)
    with pytest.raises(ValueError, match="out\\[0\\] must be contiguous float8_e4m3fn"):
        kernels.input_slices(x, out=(bt[:, :, :-32].contiguous(), xe))


@pytest.mark.parametrize("masks,split_d", [("none", 1), ("both", 3)])
def test_moe_decode_slices_matches_cuda_core_kernels(gen, masks, split_d):
    E, D, I, k, N = 12, 96, 160, 3, 2  # 3 and 5 groups: both tiles partial
    packed = _experts(gen, E, D, I, torch.bfloat16)
    x = torch.randn(N, D, generator=gen).bfloat16()
    logits = torch.randn(N, E, generator=gen)
    reroute = torch.zeros(E, dtype=torch.bool)
    reroute[torch.randperm(E, generator=gen)[:3]] = True
    zero = ~reroute & (torch.rand(E, generator=gen) < 0.5)
    r, z = (reroute, zero) if masks == "both" else (None, None)
    blocks = {"BLOCK_D": 32, "SPLIT_D": split_d, "STAGES": 1}
    indices = torch.full((N, k), -7, dtype=torch.int64)
    weights = torch.full((N, k), float("nan"))
    parts = torch.full((N * k * split_d, D), float("nan"))
    act = kernels.moe_tc.new_slices(N * k, I, "cpu")
    got = kernels.moe_decode_slices(kernels.input_slices(x), None, *packed, 7.0, 1.702, router_logits=logits, k=k,
                                    reroute_mask=r, zero_mask=z, indices_out=indices, weights_out=weights,
                                    out=parts, act_slices=act, blocks=blocks)
    assert got[0] is parts and got[1] is indices and got[2] is weights
    ref_i, ref_w = route_reference(logits, k, r, z)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    out = parts.view(N * k, split_d, D).sum(1).double()
    # Down is exact on the activations it was given (their slices): fp64 reference on the same values.
    w2 = mxfp4.dequantize(packed[3], packed[4], torch.float64)
    act_values = kernels.moe_tc.slices_value(*act).double()
    ref_down = torch.stack([w2[e] @ act_values[s] + packed[5][e].double() for s, e in enumerate(ref_i.view(-1))])
    assert rel(out, ref_down) < 1e-6
    # Gate/up: each activation is the SwiGLU of the exact sum rounded to bf16 (to nearest on the GPU; this
    # interpreter's bf16 conversion truncates, so either is accepted), up to rare last-bit flips, as far as
    # the slices hold it (exactly within 2**8 of its group's largest, to 2**-16 of that largest below).
    w1 = mxfp4.dequantize(packed[0], packed[1], torch.float64)
    pre = torch.stack([w1[e] @ x[s // k].double() + packed[2][e].double() for s, e in enumerate(ref_i.view(-1))])
    exact = ops.swiglu(pre, 7.0, 1.702).float()
    nearest, toward_zero = exact.bfloat16().float(), (exact.view(torch.int32) & -65536).view(torch.float32)
    got_act = act_values.float().view(N * k, I // 32, 32)
    largest = nearest.view(N * k, I // 32, 32).abs().amax(-1, keepdim=True)
    within = nearest.view(N * k, I // 32, 32).abs() >= largest / 256
    rounded = (got_act == nearest.view_as(got_act)) | (got_act == toward_zero.view_as(got_act))
    assert rounded[within].float().mean() > 0.99
    assert ((got_act - nearest.view_as(got_act)).abs() <= largest * 2.0**-7).all()
    # The whole of it matches the CUDA-core kernels (fp32 sums), up to 1-ulp flips of bf16 activations where
    # the two sums differ in their last bits (one flip among these 160 units moves an output by about 1e-4).
    words, _, _ = kernels.moe_decode_routed(kernels.input_words(x), logits, k, *packed, 7.0, 1.702, r, z)
    assert rel(out, words.view(N * k, -1, D).sum(1)) < 1e-3
    # Given the indices instead of logits: the same computation.
    again, none_i, none_w = kernels.moe_decode_slices(kernels.input_slices(x), ref_i, *packed, blocks=blocks)
    assert torch.equal(again, parts) and none_i is None and none_w is None
    with pytest.raises(ValueError, match="either topk_indices, or router_logits"):
        kernels.moe_decode_slices(kernels.input_slices(x), ref_i, *packed, router_logits=logits, k=k)
    with pytest.raises(ValueError, match="act_slices\\[0\\] must be"):
        kernels.moe_decode_slices(kernels.input_slices(x), ref_i, *packed,
                                  act_slices=kernels.moe_tc.new_slices(1, I, "cpu"))


def test_moe_decode_slices_then_norm_equals_add_rms_norm(gen):
    """The residual update and next norm done by the down kernel's last program to finish (the decoder's form)
    equal `add_rms_norm` on the same parts, and the counters are left zeroed."""
    E, D, I, k, N = 12, 96, 160, 3, 2
    packed = _experts(gen, E, D, I, torch.bfloat16)
    h, residual = torch.randn(N, D, generator=gen).bfloat16(), torch.randn(N, D, generator=gen).bfloat16()
    logits = torch.randn(N, E, generator=gen)
    scale, extra = 1 + 0.1 * torch.randn(D, generator=gen), torch.randn(D, generator=gen).bfloat16()
    counters = torch.zeros(N, dtype=torch.int32)
    outs = {name: torch.full((N, D), float("nan")).bfloat16() for name in ("residual_out", "out", "delta_out")}
    parts, _, weights = kernels.moe_decode_slices(
        kernels.input_slices(h), None, *packed, router_logits=logits, k=k, blocks={"BLOCK_D": 32, "STAGES": 1},
        then_norm=dict(x=residual, scale=scale, eps=1e-5, extra=extra, counters=counters, **outs))
    delta_out = torch.empty(N, D).bfloat16()
    ref_residual, ref_normed = kernels.add_rms_norm(residual, parts, scale, 1e-5, extra, weights=weights,
                                                    delta_out=delta_out)
    assert torch.equal(outs["residual_out"], ref_residual) and torch.equal(outs["out"], ref_normed)
    assert torch.equal(outs["delta_out"], delta_out)
    assert not counters.any()
    with pytest.raises(ValueError, match="then_norm needs the routing"):
        kernels.moe_decode_slices(kernels.input_slices(h), weights.long(), *packed,
                                  then_norm=dict(x=residual, scale=scale, eps=1e-5, extra=None, counters=counters,
                                                 **outs))


def test_moe_experts_bf16_decode_takes_tensor_cores(gen, monkeypatch):
    E, D, I, k, N = 5, 96, 160, 2, 3
    packed = _experts(gen, E, D, I, torch.bfloat16)
    x = torch.randn(N, D, generator=gen).bfloat16()
    indices, weights = route_reference(torch.randn(N, E, generator=gen), k)
    assert kernels.moe_tc.available(x)
    y, expert_out = kernels.moe_experts(x, indices, weights, *packed, per_expert=True)
    monkeypatch.setenv("OSSSCOPE_MOE_DECODE", "cuda_cores")
    assert not kernels.moe_tc.available(x)
    y_cc, expert_out_cc = kernels.moe_experts(x, indices, weights, *packed, per_expert=True)
    assert rel(y, y_cc) < 4e-3 and rel(expert_out, expert_out_cc) < 4e-3  # bf16 outputs, 1-ulp flips at most


# -- norm and RoPE -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_and_fused_residual_add(gen, dtype):
    x = torch.randn(5, 3, 72, generator=gen).to(dtype)  # 72 is not a power of two
    delta = torch.randn(5, 3, 72, generator=gen).to(dtype)
    scale = torch.randn(72, generator=gen)
    extra = torch.randn(72, generator=gen).to(dtype)
    out = torch.full_like(x, float("nan"))
    kernels.rms_norm(x, scale, 1e-5, out=out)
    torch.testing.assert_close(out, ops.rms_norm(x, scale, 1e-5))
    for steer in (None, extra):
        residual, normed = kernels.add_rms_norm(x, delta, scale, 1e-5, steer)
        ref_residual, ref_normed = add_rms_norm_reference(x, delta, scale, 1e-5, steer)
        assert torch.equal(residual, ref_residual)
        torch.testing.assert_close(normed, ref_normed)
    # The decoder's form: delta as fp32 parts summed with weights, the sum kept, the normed rows in word order.
    x2, D = x[:, 0, :64].contiguous(), 64
    parts = torch.randn(5 * 3, D, generator=gen)
    weights = torch.softmax(torch.randn(5, 3, generator=gen), -1)
    delta_out = torch.full_like(x2, float("nan"))
    words = torch.full((5, D), float("nan"))
    residual, normed = kernels.add_rms_norm(x2, parts, scale[:D], 1e-5, extra[:D], weights=weights,
                                            delta_out=delta_out, words_out=words)
    ref_delta = (parts.view(5, 3, D) * weights[..., None]).sum(1).to(dtype)
    ref_residual, ref_normed = add_rms_norm_reference(x2, ref_delta, scale[:D], 1e-5, extra[:D])
    torch.testing.assert_close(delta_out, ref_delta)
    torch.testing.assert_close(residual, ref_residual)
    torch.testing.assert_close(normed, ref_normed)
    expected_words = torch.empty(5, D)
    expected_words[:, _word_order(D)] = normed.float() * 2.0**64
    assert torch.equal(words, expected_words)
    # With the router: 10 experts spread over 3 programs per row (4, 4, 2), each redoing the norm.
    router_w, router_b = torch.randn(10, D, generator=gen).to(dtype), torch.randn(10, generator=gen).to(dtype)
    logits = torch.full((5, 10), float("nan"))
    slices = kernels.moe_tc.new_slices(5, D, "cpu")
    residual, normed = kernels.add_rms_norm(x2, x2.flip(0), scale[:D], 1e-5, router=(router_w, router_b),
                                            logits_out=logits, words_out=words, slices_out=slices)
    ref_residual, ref_normed = add_rms_norm_reference(x2, x2.flip(0), scale[:D], 1e-5)
    assert torch.equal(residual, ref_residual)
    torch.testing.assert_close(normed, ref_normed)
    ref_slices = kernels.moe_tc.slices_reference(normed)  # what the tensor-core decode reads
    assert torch.equal(slices[0].view(torch.uint8), ref_slices[0].view(torch.uint8))
    assert torch.equal(slices[1], ref_slices[1])
    ref_logits = torch.nn.functional.linear(normed.float(), router_w.float(), router_b.float()).to(dtype).float()
    torch.testing.assert_close(logits, ref_logits, rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be x itself"):
        kernels.add_rms_norm(x2, x2, scale[:D], 1e-5, router=(router_w, router_b), logits_out=logits,
                             residual_out=x2)


def test_qkv_rope_matches_twin_and_writes_cache_slots(gen):
    cfg = ossscope.PRESETS["tiny"]
    B, T, H, Hkv, Dh = 2, 3, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = torch.randn(B, T, (H + 2 * Hkv) * Dh, generator=gen)
    positions = torch.arange(9, 9 + T)
    cos, sin = ops.rope_tables(cfg, positions)
    q, k, v = kernels.qkv_rope(qkv, cos, sin, H, Hkv)
    split = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    torch.testing.assert_close(q, ops.apply_rope(split[0].view(B, T, H, Dh), cos, sin))
    torch.testing.assert_close(k, ops.apply_rope(split[1].view(B, T, Hkv, Dh), cos, sin))
    assert torch.equal(v, split[2].view(B, T, Hkv, Dh))
    k_cache = torch.full((B, 8, Hkv, Dh), float("nan"))
    v_cache = torch.full((B, 8, Hkv, Dh), float("nan"))
    k_pos = torch.full((8,), -1)
    slots = positions % 8
    kernels.qkv_rope(qkv, cos, sin, H, Hkv, k_dst=k_cache, v_dst=v_cache, slots=slots, positions=positions,
                     k_pos_dst=k_pos)
    torch.testing.assert_close(k_cache[:, slots], k)
    assert torch.equal(v_cache[:, slots], v) and torch.equal(k_pos[slots], positions)
    assert (k_pos >= 0).sum() == T


# -- input checks ----------------------------------------------------------------------------------------------


def test_wrappers_name_bad_inputs(gen):
    E, D, I = 4, 64, 64
    packed = _experts(gen, E, D, I, torch.float32)
    x = torch.randn(2, D, generator=gen)
    indices, weights = route_reference(torch.randn(2, E, generator=gen), 2)
    with pytest.raises(ValueError, match="topk_weights must be"):
        kernels.moe_experts(x, indices, weights[:, :1], *packed)
    with pytest.raises(ValueError, match="mlp1 must be blocks"):
        kernels.moe_experts(x, indices, weights, packed[0][:, :, :-1], *packed[1:])
    with pytest.raises(ValueError, match="reroute_mask must be a bool"):
        kernels.route(torch.randn(2, E), 2, torch.zeros(E))
    q, k, v, sinks = _qkv(gen, 1, 2, 4, 4, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kernels.attention_prefill(q, k, v, sinks, torch.arange(2), torch.arange(4), None)
    q, k, v, sinks = _qkv(gen, 1, 2, 4, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="one query per sequence"):
        kernels.attention_decode(q, k, v, sinks, torch.arange(2), torch.arange(4), None)
    cos = torch.zeros(1, 8)
    with pytest.raises(ValueError, match=r"qkv must be \[1, 128\]"):
        kernels.attention_decode_step(torch.zeros(1, 120), cos, cos, k, v, torch.arange(4), torch.tensor([0]),
                                      torch.tensor([0]), sinks, None, 4)
    with pytest.raises(ValueError, match="counters must be contiguous int32"):
        kernels.attention_decode_step(torch.zeros(1, 128), cos, cos, k, v, torch.arange(4), torch.tensor([0]),
                                      torch.tensor([0]), sinks, None, 4, counters=torch.zeros(2))


# -- the model on the kernels ---------------------------------------------------------------------------------


def test_prefill_on_kernels_matches_torch_path_and_fills_the_cache_alike():
    """fast.prefill with the kernels on and no hook active takes the fused layers; a prompt longer than the
    sliding window, continued by a second chunk, with an ablation and a steering vector set."""
    cfg = ossscope.PRESETS["tiny"].replace(num_hidden_layers=2, sliding_window=4)
    model = ossscope.random_model(cfg, seed=int(torch.randint(0, 1000, ())), device="cpu", dtype=torch.float32)
    model.set_ablation({0: [1], 1: [2]}, "reroute")
    model.set_steering(1, torch.randn(cfg.hidden_size))
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    ref_cache, cache = model.new_cache(2, 16), model.new_cache(2, 16)
    for chunk in (ids[:, :7], ids[:, 7:]):
        ref = model(chunk, cache=ref_cache)[:, -1]
        fast.use_kernels(model)
        got = fast.prefill(model, chunk, cache, fused=True)
        fast.use_kernels(model, False)
        assert rel(got, ref) < 1e-5
    assert cache.length == ref_cache.length == 10
    for lc, ref_lc in zip(cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(lc.pos, ref_lc.pos) and lc.filled == ref_lc.filled
        torch.testing.assert_close(lc.k, ref_lc.k)
        torch.testing.assert_close(lc.v, ref_lc.v)
    # With a hook active, the blocks' own code runs (and the hook with it).
    fast.use_kernels(model)
    with model.hooks([("blocks.1.hook_resid_mid", lambda x, hook: x * 0)]):
        hooked = fast.prefill(model, ids[:, :3], model.new_cache(2, 16), fused=True)
    fast.use_kernels(model, False)
    with model.hooks([("blocks.1.hook_resid_mid", lambda x, hook: x * 0)]):
        assert rel(hooked, model(ids[:, :3])[:, -1]) < 1e-5


@pytest.mark.parametrize("splits,tensor_cores", [({}, False), ({"SPLIT_D": 3}, False), ({"SPLIT_D": 3}, True)])
def test_model_on_kernels_and_eager_graph_step_match_torch_path(monkeypatch, splits, tensor_cores):
    for key, value in splits.items():  # the decoder's MoE with its reductions split (split-K)
        monkeypatch.setitem(kernels.moe.DECODE_BLOCKS, key, value)
        monkeypatch.setitem(kernels.moe_tc.TC_BLOCKS, key, value)
    # The fp32 model takes the CUDA-core MoE kernels; forced onto the tensor-core ones (made for bf16, which
    # the interpreter cannot run the attention of), its inputs are cut to 16 bits: a looser match.
    monkeypatch.setattr(kernels.moe_tc, "available", lambda x: tensor_cores)
    tol = 3e-4 if tensor_cores else 1e-5
    cfg = ossscope.PRESETS["tiny"].replace(num_hidden_layers=2, sliding_window=4)
    model = ossscope.random_model(cfg, seed=int(torch.randint(0, 1000, ())), device="cpu", dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    ref_cache, cache = model.new_cache(2, 16), model.new_cache(2, 16)
    ref = model(ids, cache=ref_cache)
    fast.use_kernels(model)
    assert rel(model(ids, cache=cache), ref) < 1e-5
    fast.use_kernels(model, False)
    decoder = fast.GraphDecoder(model, cache, capture=["blocks.1.hook_resid_mid", "blocks.0.hook_mlp_out"],
                                graph=False)
    assert decoder.tensor_cores == tensor_cores
    model.set_ablation({1: [0, 3]}, "reroute")
    model.set_steering(0, torch.randn(cfg.hidden_size))
    seen: dict[str, torch.Tensor] = {}
    for _ in range(3):  # crosses the ring buffer's wrap (window 4)
        token = torch.randint(0, cfg.vocab_size, (2, 1))
        names = ["blocks.1.hook_resid_mid", "blocks.1.mlp.hook_topk_indices", "blocks.0.attn.hook_sink",
                 "blocks.0.hook_mlp_out", "blocks.1.mlp.hook_router_logits", "blocks.1.mlp.hook_topk_weights"]
        with model.hooks([(n, lambda x, hook: seen.__setitem__(hook.name, x.clone())) for n in names]):
            ref = model(token, cache=ref_cache)[:, -1]
        assert rel(decoder.step(token[:, 0]), ref) < tol
        close = dict(rtol=5e-3, atol=5e-3) if tensor_cores else {}
        torch.testing.assert_close(decoder.captured["blocks.1.hook_resid_mid"], seen[names[0]][:, 0], **close)
        assert torch.equal(decoder.router_indices[1], seen[names[1]][:, 0])
        assert not torch.isin(decoder.router_indices[1], torch.tensor([0, 3])).any()
        torch.testing.assert_close(decoder.sink[0], seen[names[2]][..., 0])
        torch.testing.assert_close(decoder.captured["blocks.0.hook_mlp_out"], seen[names[3]][:, 0], **close)
        torch.testing.assert_close(decoder.router_logits[1], seen[names[4]][:, 0].float(), **close)
        torch.testing.assert_close(decoder.router_weights[1], seen[names[5]][:, 0], **close)
    assert cache.length == ref_cache.length == 9


# -- the kernel engine under generation and chat --------------------------------------------------------------


def test_chat_on_the_kernel_engine_matches_the_torch_engine_and_reuses_its_decoder():
    """model.chat on the kernel engine (fused prefill, the decoder's step: eager here, a CUDA graph on a GPU)
    gives the torch engine's tokens, router records and sinks; a second chat reuses the pooled cache and its
    decoder (nothing is built again); a Python hook sends steps down the eager kernel path instead."""
    cfg = ossscope.PRESETS["tiny"].replace(num_hidden_layers=2, sliding_window=4, vocab_size=201_088)
    model = ossscope.random_model(cfg, seed=3, device="cpu", engine="torch")
    kwargs = dict(reasoning="low", max_new_tokens=5, temperature=0.0)
    ref = model.chat("Why is the sky blue?", **kwargs)
    engine = model.set_engine("kernels")
    assert isinstance(engine, ossscope.engine.KernelEngine) and model.engine is engine and not engine.graphs
    got = model.chat("Why is the sky blue?", **kwargs)
    assert got.metadata["engine"].startswith("kernels")
    assert got.tokens == ref.tokens and len(got.tokens) == 5
    assert torch.equal(got.router_indices, ref.router_indices)
    torch.testing.assert_close(got.router_weights, ref.router_weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sink, ref.sink, atol=1e-5, rtol=1e-5)
    assert engine.graph_steps == 5 and engine.captures == 1
    again = model.chat("Why is the sky blue?", **kwargs)
    assert again.tokens == ref.tokens and engine.captures == 1 and engine.graph_steps == 10
    seen = []
    with model.hooks([("blocks.1.hook_resid_post", lambda x, hook: seen.append(x.shape))]):
        hooked = model.chat("Why is the sky blue?", **kwargs)
    assert hooked.tokens == ref.tokens and engine.graph_steps == 10 and len(seen) == 6  # prefill + 5 steps
    model.set_engine("torch")
    assert model.blocks[0].mlp.experts_fn is ops.moe_experts
