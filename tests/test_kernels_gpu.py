"""The compiled Triton kernels and the fast path against the torch path, on a CUDA GPU (skipped without one).

bf16 checks use real gpt-oss widths (D = I = 2880, 64 query heads of 64, 8 kv heads); fp32 model checks are
tight enough that routing cannot flip, so whole-model logits must agree closely. Every check draws fresh
random inputs and poisons its outputs first.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: these tests check compiled kernels", allow_module_level=True)

from ossscope.kernels.norm import add_rms_norm_reference  # noqa: E402
from ossscope.kernels.routing import route_reference  # noqa: E402

import ossscope  # noqa: E402
from ossscope import fast, kernels, mxfp4, ops  # noqa: E402

CUDA = torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def same_choice(logits, indices, ref_indices) -> None:
    """The kernels chose the same experts as the reference, up to the order of equal logits: the router's
    logits are bf16 values, so ties happen, and torch.topk orders tied values arbitrarily."""
    assert torch.equal(logits.gather(-1, indices), logits.gather(-1, ref_indices))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(int(torch.randint(0, 2**31, ()).item()))


def test_dequantize_every_byte():
    blocks = torch.arange(256, dtype=torch.uint8, device=CUDA).view(16, 16)
    for scale in (100, 119, 127, 140, 200):
        scales = torch.full((16,), scale, dtype=torch.uint8, device=CUDA)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(kernels.dequantize(blocks, scales, dtype), mxfp4.dequantize(blocks, scales, dtype))


@pytest.mark.parametrize("E", [32, 128])
def test_route_with_masks(gen, E):
    N, k = 1000, 4
    logits = torch.randn(N, E, device=CUDA, generator=gen)
    reroute = torch.rand(E, device=CUDA, generator=gen) < 0.2
    zero = torch.rand(E, device=CUDA, generator=gen) < 0.2
    indices = torch.full((N, k), -1, dtype=torch.long, device=CUDA)
    weights = torch.full((N, k), float("nan"), device=CUDA)
    kernels.route(logits, k, reroute, zero, out=(indices, weights))
    ref_i, ref_w = route_reference(logits, k, reroute, zero)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w)


def _experts(gen, E, D, I):
    b1, s1 = mxfp4.random_packed((E, 2 * I), D, device=CUDA, std=D**-0.5)
    b2, s2 = mxfp4.random_packed((E, D), I, device=CUDA, std=I**-0.5)
    bias1 = (torch.randn(E, 2 * I, device=CUDA, generator=gen) * 0.02).bfloat16()
    bias2 = (torch.randn(E, D, device=CUDA, generator=gen) * 0.02).bfloat16()
    return b1, s1, bias1, b2, s2, bias2


@pytest.mark.parametrize("N", [1, 3, 37, 1000])  # streaming (1, 3) and grouped (37, 1000) kernels
def test_moe_experts_bf16_real_width(gen, N):
    E, D, I, k = 8, 2880, 2880, 4
    packed = _experts(gen, E, D, I)
    x = torch.randn(N, D, device=CUDA, generator=gen).bfloat16()
    indices, weights = route_reference(torch.randn(N, E, device=CUDA, generator=gen), k)
    y = torch.full((N, D), float("nan"), device=CUDA, dtype=torch.bfloat16)
    y, expert_out = kernels.moe_experts(x, indices, weights, *packed, per_expert=True, out=y)
    ref_packed = [t.float() if t.is_floating_point() else t for t in packed]
    ref_y, ref_out = ops.moe_experts(x.float(), indices, weights, *ref_packed, per_expert=True)
    assert rel(y, ref_y) < 1e-2 and rel(expert_out, ref_out) < 1e-2


def test_moe_prefill_is_identical_run_to_run(gen):
    """The grouped prefill sums each token's k expert outputs in a fixed order: fp32 atomics added them in the
    order programs finished, so bf16 outputs differed between identical calls (and, at router near-ties, which
    experts the next layers chose)."""
    E, D, I, k, N = 32, 2880, 2880, 4, 2048
    packed = _experts(gen, E, D, I)
    x = torch.randn(N, D, device=CUDA, generator=gen).bfloat16()
    indices, weights = route_reference(torch.randn(N, E, device=CUDA, generator=gen), k)
    first = kernels.moe_experts(x, indices, weights, *packed)
    for _ in range(4):
        assert torch.equal(kernels.moe_experts(x, indices, weights, *packed), first)


def test_greedy_generation_on_the_kernels_is_identical_run_to_run():
    """The same prompts twice, greedy, on the kernel engine: the same tokens and router choices, prefill included."""
    from ossscope.generation import generate

    model = _model(torch.bfloat16)
    model.set_engine("kernels")
    prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (40, 300, 700)]
    runs = [generate(model, prompts, max_new_tokens=24, stop_tokens=()) for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens
    assert torch.equal(runs[0].router_indices, runs[1].router_indices)


def test_moe_decode_parts_and_fused_norm_bf16(gen):
    """The decoder's MoE: inputs in word order from the norm, per-expert parts, the weighted sum in the next norm."""
    E, D, I, k = 8, 2880, 2880, 4
    packed = _experts(gen, E, D, I)
    x = torch.randn(2, D, device=CUDA, generator=gen).bfloat16()
    scale = torch.rand(D, device=CUDA, generator=gen) + 0.5
    words = torch.full((2, D), float("nan"), device=CUDA)
    _, h = kernels.add_rms_norm(x, torch.zeros_like(x), scale, 1e-5, words_out=words)
    assert torch.equal(words, kernels.input_words(h))
    indices, weights = route_reference(torch.randn(2, E, device=CUDA, generator=gen), k)
    parts = kernels.moe_decode_parts(words, indices, *packed)  # split DECODE_BLOCKS["SPLIT_D"] ways
    ref_y, ref_out = ops.moe_experts(h.float(), indices, weights, *[t.float() if t.is_floating_point() else t
                                                                     for t in packed], per_expert=True)
    assert rel(parts.view(2 * k, -1, D).sum(1), ref_out.reshape(2 * k, D)) < 1e-2
    y = torch.full_like(x, float("nan"))
    residual, _ = kernels.add_rms_norm(x, parts, scale, 1e-5, weights=weights.contiguous(), delta_out=y)
    assert rel(y, ref_y) < 1e-2 and rel(residual, x.float() + ref_y) < 1e-2


def _norm_inputs(gen, E, D):
    """Two rows of residual and delta, a norm scale, and a router (weight, bias) of E experts: bf16."""
    x, delta = (torch.randn(2, D, device=CUDA, generator=gen).bfloat16() for _ in range(2))
    scale = torch.rand(D, device=CUDA, generator=gen) + 0.5
    router_w = (torch.randn(E, D, device=CUDA, generator=gen) / D**0.5).bfloat16()
    return x, delta, scale, router_w, torch.randn(E, device=CUDA, generator=gen).bfloat16()


def test_router_in_norm_and_moe_routing_itself_bf16(gen):
    """The decoder's form with PDL launches: the norm gives the router logits, the MoE kernels route from them."""
    E, D, I, k = 32, 2880, 2880, 4
    packed = _experts(gen, E, D, I)
    x, delta, scale, router_w, router_b = _norm_inputs(gen, E, D)
    words, logits = torch.empty(2, D, device=CUDA), torch.full((2, E), float("nan"), device=CUDA)
    _, h = kernels.add_rms_norm(x, delta, scale, 1e-5, words_out=words, router=(router_w, router_b),
                                logits_out=logits, pdl=True)
    ref_logits = torch.nn.functional.linear(h, router_w, router_b).float()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-2, atol=1e-2)
    reroute = torch.zeros(E, dtype=torch.bool, device=CUDA)
    reroute[:3] = True
    parts, indices, weights = kernels.moe_decode_routed(words, logits, k, *packed, reroute_mask=reroute, pdl=True)
    ref_i, ref_w = route_reference(logits, k, reroute)
    same_choice(logits, indices, ref_i)
    torch.testing.assert_close(weights, ref_w)
    _, ref_out = ops.moe_experts(h.float(), indices, weights, *[t.float() if t.is_floating_point() else t
                                                            for t in packed], per_expert=True)
    assert rel(parts.view(2 * k, -1, D).sum(1), ref_out.reshape(2 * k, D)) < 1e-2


def test_moe_decode_on_tensor_cores_bf16(gen):
    """The decoder's tensor-core MoE: slices from the norm, routing in the kernels, exact sums on fp8 tensor
    cores (Hopper keeps 13 mantissa bits of them: the slices keep every sum within that)."""
    E, D, I, k = 32, 2880, 2880, 4
    packed = _experts(gen, E, D, I)
    x, delta, scale, router_w, router_b = _norm_inputs(gen, E, D)
    slices = kernels.moe_tc.new_slices(2, D, CUDA)
    logits = torch.full((2, E), float("nan"), device=CUDA)
    _, h = kernels.add_rms_norm(x, delta, scale, 1e-5, slices_out=slices, router=(router_w, router_b),
                                logits_out=logits, pdl=True)
    ref_bt, ref_xe = kernels.moe_tc.slices_reference(h)
    assert torch.equal(slices[0].view(torch.uint8), ref_bt.view(torch.uint8)) and torch.equal(slices[1], ref_xe)
    assert torch.equal(kernels.input_slices(h)[0].view(torch.uint8), ref_bt.view(torch.uint8))
    reroute = torch.zeros(E, dtype=torch.bool, device=CUDA)
    reroute[:3] = True
    act = kernels.moe_tc.new_slices(2 * k, I, CUDA)
    parts, indices, weights = kernels.moe_decode_slices(slices, None, *packed, router_logits=logits, k=k,
                                                        reroute_mask=reroute, act_slices=act, pdl=True)
    ref_i, ref_w = route_reference(logits, k, reroute)
    same_choice(logits, indices, ref_i)
    torch.testing.assert_close(weights, ref_w)
    out = parts.view(2 * k, -1, D).sum(1).double()
    w2 = mxfp4.dequantize(packed[3], packed[4], torch.float64)
    act_values = kernels.moe_tc.slices_value(*act).double()
    ref_down = torch.stack([w2[e] @ act_values[s] + packed[5][e].double() for s, e in enumerate(indices.view(-1))])
    assert rel(out, ref_down) < 1e-6  # fp32-exact: the tensor cores' sums lost nothing
    words, _, _ = kernels.moe_decode_routed(kernels.input_words(h), logits, k, *packed, reroute_mask=reroute)
    assert rel(out, words.view(2 * k, -1, D).sum(1)) < 2e-4  # the CUDA-core kernels, up to 1-ulp activation flips
    # The decoder's form: the down kernel's last program per token does the residual update and the next norm.
    # Repeated, with PDL, so that a race between the programs' parts and that last program would show.
    counters = torch.zeros(2, dtype=torch.int32, device=CUDA)
    extra = torch.randn(D, device=CUDA, generator=gen).bfloat16()
    ref_residual, ref_normed = kernels.add_rms_norm(x, parts, scale, 1e-5, extra, weights=weights)
    for _ in range(20):
        outs = {name: torch.full_like(x, float("nan")) for name in ("residual_out", "out")}
        kernels.moe_decode_slices(slices, None, *packed, router_logits=logits, k=k, reroute_mask=reroute,
                                  act_slices=act, pdl=True, then_norm=dict(x=x, scale=scale, eps=1e-5, extra=extra,
                                                                           delta_out=None, counters=counters, **outs))
        assert torch.equal(outs["residual_out"], ref_residual) and torch.equal(outs["out"], ref_normed)
    assert not counters.any()


@pytest.mark.parametrize("N, K", [(5120, 2880), (2880, 4096), (37, 300)])
@pytest.mark.parametrize("batch", [1, 4])
def test_linear_bf16(gen, N, K, batch):
    x = torch.randn(batch, K, device=CUDA, generator=gen).bfloat16()
    w = (torch.randn(N, K, device=CUDA, generator=gen) / K**0.5).bfloat16()
    b = torch.randn(N, device=CUDA, generator=gen).bfloat16()
    y = kernels.linear(x, w, b, out=torch.full((batch, N), float("nan"), device=CUDA, dtype=torch.bfloat16))
    assert rel(y, torch.nn.functional.linear(x.float(), w.float(), b.float())) < 1e-2


@pytest.mark.parametrize("window", [None, 128])
def test_attention_prefill_bf16(gen, window):
    B, T, H, Hkv, Dh = 2, 1000, 64, 8, 64
    q, k, v = (torch.randn(B, T, h, Dh, device=CUDA, generator=gen).bfloat16() for h in (H, Hkv, Hkv))
    sinks = torch.randn(H, device=CUDA, generator=gen)
    pos = torch.arange(T, device=CUDA)
    z = torch.full((B, T, H, Dh), float("nan"), device=CUDA, dtype=torch.bfloat16)
    sink = torch.full((B, H, T), float("nan"), device=CUDA)
    kernels.attention_prefill(q, k, v, sinks, pos, pos, window, out=z, sink_out=sink)
    ref_z, ref_sink, _ = ops.attention(q.float(), k.float(), v.float(), sinks, pos, pos, window)
    assert rel(z, ref_z) < 1e-2
    torch.testing.assert_close(sink, ref_sink, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("window", [None, 128])
def test_attention_decode_bf16_with_pattern(gen, window):
    B, Tk, H, Hkv, Dh = 2, 1100, 64, 8, 64
    q = torch.randn(B, 1, H, Dh, device=CUDA, generator=gen).bfloat16()
    k, v = (torch.randn(B, Tk, Hkv, Dh, device=CUDA, generator=gen).bfloat16() for _ in range(2))
    sinks = torch.randn(H, device=CUDA, generator=gen)
    k_pos = torch.arange(Tk, device=CUDA)
    k_pos[1000:] = -1  # the unfilled end of a cache
    q_pos = torch.tensor([999], device=CUDA)
    pattern = torch.full((B, H, Tk), float("nan"), device=CUDA)
    z, sink, pat = kernels.attention_decode(q, k, v, sinks, q_pos, k_pos, window, need_pattern=True,
                                            pattern_out=pattern)
    ref_z, ref_sink, ref_pat = ops.attention(q.float(), k.float(), v.float(), sinks, q_pos, k_pos, window,
                                             need_pattern=True)
    assert rel(z, ref_z) < 1e-2
    torch.testing.assert_close(sink, ref_sink, rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(pat, ref_pat, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("window", [None, 128])
def test_attention_decode_step_bf16_equals_rope_then_decode(gen, window):
    B, S, H, Hkv, Dh = 2, 1100, 64, 8, 64
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, device=CUDA, generator=gen).bfloat16()
    k_cache, v_cache = (torch.randn(B, S, Hkv, Dh, device=CUDA, generator=gen).bfloat16() for _ in range(2))
    k_pos = torch.arange(S, device=CUDA)
    k_pos[1000:] = -1  # the unfilled end of a cache
    position, slot = torch.tensor([1000], device=CUDA), torch.tensor([1000], device=CUDA)
    sinks = torch.randn(H, device=CUDA, generator=gen)
    cos, sin = ops.rope_tables(ossscope.PRESETS["gpt-oss-20b"], position)
    ref_k, ref_v, ref_pos = k_cache.clone(), v_cache.clone(), k_pos.clone()
    q, _, _ = kernels.qkv_rope(qkv.view(B, 1, -1), cos, sin, H, Hkv, k_dst=ref_k, v_dst=ref_v, slots=slot,
                               positions=position, k_pos_dst=ref_pos)
    ref_z, ref_sink, ref_pat = kernels.attention_decode(q, ref_k, ref_v, sinks, position, ref_pos, window,
                                                        need_pattern=True)
    counters = kernels.decode_counters(B, Hkv, CUDA)
    pattern = torch.full((B, H, S), float("nan"), device=CUDA)
    z, sink, pat = kernels.attention_decode_step(qkv, cos, sin, k_cache, v_cache, k_pos, slot, position, sinks,
                                                 window, H, need_pattern=True, pattern_out=pattern,
                                                 counters=counters)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v) and torch.equal(k_pos, ref_pos)
    torch.testing.assert_close(z, ref_z, rtol=1e-2, atol=1e-3)  # a ulp where summation orders differ
    torch.testing.assert_close(sink, ref_sink)
    torch.testing.assert_close(pat, ref_pat)
    assert not counters.any()
    for _ in range(10):  # the merge by the last program to arrive: a race would show as a different result
        again, _, _ = kernels.attention_decode_step(qkv, cos, sin, k_cache, v_cache, k_pos, slot, position, sinks,
                                                    window, H, counters=counters, pdl=True)
        assert torch.equal(again, z)
    truth_z, _, _ = ops.attention(q.float(), ref_k.float(), ref_v.float(), sinks, position, ref_pos, window)
    assert rel(z, truth_z) < 1e-2


def test_norm_and_rope_bf16(gen):
    x, delta = (torch.randn(7, 2880, device=CUDA, generator=gen).bfloat16() for _ in range(2))
    scale = 1 + 0.1 * torch.randn(2880, device=CUDA, generator=gen)
    extra = torch.randn(2880, device=CUDA, generator=gen).bfloat16()
    torch.testing.assert_close(kernels.rms_norm(x, scale, 1e-5), ops.rms_norm(x, scale, 1e-5))
    residual, normed = kernels.add_rms_norm(x, delta, scale, 1e-5, extra)
    ref_residual, ref_normed = add_rms_norm_reference(x, delta, scale, 1e-5, extra)
    assert torch.equal(residual, ref_residual)
    torch.testing.assert_close(normed, ref_normed)
    cfg = ossscope.PRESETS["gpt-oss-20b"]
    qkv = torch.randn(1, 5, 5120, device=CUDA, generator=gen).bfloat16()
    positions = torch.arange(300, 305, device=CUDA)
    cos, sin = ops.rope_tables(cfg, positions)
    q, k, _ = kernels.qkv_rope(qkv, cos, sin, 64, 8)
    # Against an fp32 truth: the kernel rotates in fp32 and rounds once, while the bf16 torch twin (like HF)
    # rounds cos/sin and each product to bf16 and drifts up to ~0.024 from it (5 of 1,500 random draws failed
    # a 0.02 tolerance against the twin on the H100).
    truth = ops.apply_rope(qkv[..., :4096].float().view(1, 5, 64, 64), cos, sin)
    torch.testing.assert_close(q.float(), truth, rtol=1e-2, atol=1e-3)


def _model(dtype):
    cfg = ossscope.PRESETS["tiny"].replace(hidden_size=256, intermediate_size=192, head_dim=64,
                                           num_attention_heads=8, num_key_value_heads=2, sliding_window=16,
                                           num_experts=16, experts_per_token=4, vocab_size=1000)
    return ossscope.random_model(cfg, seed=int(torch.randint(0, 1000, ())), device="cuda", dtype=dtype,
                                 engine="torch")


def test_model_forward_on_kernels_matches_torch_path():
    model = _model(torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 70), device=CUDA)
    ref = model(ids)
    fast.use_kernels(model)
    ours = model(ids)
    assert rel(ours, ref) < 1e-4
    cache = model.new_cache(1, 100)
    last = fast.prefill(model, ids[:1], cache, fused=True)
    assert rel(last, ref[0, -1]) < 1e-4 and cache.length == 70


def test_bf16_kernels_are_as_close_to_fp32_as_the_bf16_torch_path():
    # In bf16 the two paths round differently, a few router choices flip, and a random model amplifies the flips
    # layer by layer, so bf16-vs-bf16 agreement says little. What matters: the kernels lose no more accuracy than
    # the bf16 torch path does, measured against the same weights in fp32.
    truth_model = _model(torch.float32)
    model = ossscope.random_model(truth_model.config, device="cuda", dtype=torch.bfloat16)
    model.load_state_dict(truth_model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (2, 70), device=CUDA)
    truth = truth_model(ids)
    torch_error = rel(model(ids), truth)
    fast.use_kernels(model)
    kernel_error = rel(model(ids), truth)
    assert kernel_error < 1.5 * torch_error + 5e-3, (kernel_error, torch_error)


def test_graph_decoder_matches_torch_path_and_takes_new_settings_without_recapture():
    from ossscope.generation import forward_and_capture

    model = _model(torch.float32)
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (2, 20), device=CUDA)
    ref_cache, cache = model.new_cache(2, 64), model.new_cache(2, 64)
    model(prompt, cache=ref_cache)
    fast.prefill(model, prompt, cache, fused=True)
    decoder = fast.GraphDecoder(model, cache, capture=["blocks.2.hook_resid_post"], pattern=True)
    names = ["blocks.2.hook_resid_post", "blocks.3.mlp.hook_topk_indices", "blocks.3.mlp.hook_topk_weights",
             "blocks.1.attn.hook_sink", "blocks.1.attn.hook_pattern"]
    for step in range(24):  # the sliding layers' ring (16 slots) wraps
        if step == 6:
            model.set_ablation({3: decoder.router_indices[3, 0, :2].tolist()}, "reroute")
        if step == 10:
            model.set_ablation({3: decoder.router_indices[3, 0, :2].tolist()}, "zero")
            model.set_steering(2, torch.randn(cfg.hidden_size, device=CUDA), scale=4.0)
        if step == 14:
            model.clear_ablation()
            model.clear_steering()
        token = torch.randint(0, cfg.vocab_size, (2, 1), device=CUDA)
        logits_ref, kept = forward_and_capture(model, token, ref_cache, names)
        logits = decoder.step(token[:, 0])
        assert rel(logits, logits_ref) < 1e-4, step
        torch.testing.assert_close(decoder.captured[names[0]], kept[names[0]][:, 0], rtol=1e-4, atol=1e-4)
        assert torch.equal(decoder.router_indices[3], kept[names[1]][:, 0])
        torch.testing.assert_close(decoder.router_weights[3], kept[names[2]][:, 0])
        torch.testing.assert_close(decoder.sink[1], kept[names[3]][:, 0])
        length = ref_cache.length  # layer 1 is a full-attention layer: slot order = position order
        torch.testing.assert_close(decoder.patterns[1][:, :, :length], kept[names[4]][:, 0])


def test_bf16_graph_decoder_on_tensor_cores_is_as_close_to_fp32_as_on_cuda_cores(monkeypatch):
    truth_model = _model(torch.float32)
    model = ossscope.random_model(truth_model.config, device="cuda", dtype=torch.bfloat16)
    model.load_state_dict(truth_model.state_dict())
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (2, 28), device=CUDA)
    truth = truth_model(tokens)[:, 20:]  # the logits of steps 20..27, from the fp32 model
    fast.use_kernels(model)
    errors = {}
    for path in ("cuda_cores", "auto"):
        monkeypatch.setenv("OSSSCOPE_MOE_DECODE", path)
        cache = model.new_cache(2, 40)
        fast.prefill(model, tokens[:, :20], cache, fused=True)
        decoder = fast.GraphDecoder(model, cache)
        assert decoder.tensor_cores == (path == "auto")
        logits = [decoder.step(tokens[:, 20 + i]).clone() for i in range(8)]
        errors[path] = rel(torch.stack(logits, 1), truth)
    assert errors["auto"] < 1.5 * errors["cuda_cores"] + 5e-3, errors


def test_kernel_engine_in_generation_matches_torch_records():
    from ossscope.generation import generate

    model = _model(torch.float32)
    prompt = torch.randint(0, model.config.vocab_size, (2, 12))
    ref = generate(model, prompt, max_new_tokens=8, stop_tokens=())
    engine = model.set_engine("kernels")
    ours = generate(model, prompt, max_new_tokens=8, stop_tokens=())
    assert engine.graphs and engine.graph_steps == 8 and ours.engine == "kernels"
    assert ours.tokens == ref.tokens
    assert torch.equal(ours.router_indices, ref.router_indices)
    torch.testing.assert_close(ours.sink, ref.sink)


def test_chat_on_the_kernel_engine_matches_torch_and_a_second_chat_captures_nothing():
    """model.chat on a GPU: the kernel engine's CUDA graph gives the torch engine's tokens, router records and
    sinks; a second chat of a similar length reuses the pooled cache and its graph; the tool loop's feeds work."""
    cfg = ossscope.PRESETS["tiny"].replace(num_hidden_layers=4, sliding_window=16, vocab_size=201_088)
    model = ossscope.random_model(cfg, seed=5, device="cuda", dtype=torch.float32, engine="torch")
    kwargs = dict(reasoning="low", max_new_tokens=40, temperature=0.0)
    ref = model.chat("Why is the sky blue?", **kwargs)
    engine = model.set_engine("kernels")
    assert model.engine is engine and engine.graphs
    ours = model.chat("Why is the sky blue?", **kwargs)
    assert ours.tokens == ref.tokens
    assert torch.equal(ours.router_indices, ref.router_indices)
    torch.testing.assert_close(ours.sink, ref.sink, atol=1e-4, rtol=1e-4)
    assert engine.captures == 1 and engine.graph_steps == len(ours.tokens)
    sampled = [model.chat("Why is the sky blue?", reasoning="low", max_new_tokens=30, seed=s) for s in (1, 1)]
    assert sampled[0].tokens == sampled[1].tokens and engine.captures == 1


def test_load_on_a_gpu_picks_the_kernel_engine_and_chat_replays_graphs(tmp_path):
    """What a user gets: `ossscope.load(path, device="cuda")` of a checkpoint on disk runs chat on the kernels."""
    cfg = ossscope.PRESETS["tiny"].replace(vocab_size=201_088)
    path = ossscope.write_checkpoint(ossscope.random_model(cfg, seed=1, device="cpu"), tmp_path / "ckpt")
    model = ossscope.load(path, device="cuda", progress=False)
    assert isinstance(model.engine, ossscope.engine.KernelEngine) and model.engine.graphs
    trace = model.chat("Why is the sky blue?", max_new_tokens=16, seed=0)
    assert model.engine.graph_steps == len(trace.tokens) >= 1 and model.engine.captures == 1
    assert trace.metadata["engine"].startswith("kernels (CUDA graphs")
    assert ossscope.load(path, device="cuda", engine="torch", progress=False).engine.name == "torch"


@pytest.mark.parametrize("batch_size", [3, 24])
def test_continuous_batching_on_cuda_graphs_matches_the_torch_engine(batch_size):
    """Ragged prompts through a CUDA-graph decoder at per-row positions, rows leaving as they stop and freed rows
    taking the next prompt; at 24 rows the MoE takes the grouped batch kernels (fast.GROUPED_DECODE_SLOTS)."""
    from ossscope.generation import generate

    model = _model(torch.float32)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, model.config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (30,), generator=g)]
    ref = generate(model, prompts, max_new_tokens=12, stop_tokens=())
    stop = ref.tokens[0][3]  # some rows stop early, at different steps
    ref = generate(model, prompts, max_new_tokens=12, stop_tokens=(stop,))
    engine = model.set_engine("kernels")
    ours = generate(model, prompts, max_new_tokens=12, stop_tokens=(stop,), batch_size=batch_size)
    assert engine.graphs and engine.graph_steps == engine.steps and engine.captures == 1
    model.set_engine("torch")
    same = _rows_equal_up_to_ties(model, prompts, ours.tokens, ref.tokens)
    assert len(same) >= len(prompts) - 2, f"only rows {same} agree"
    assert [ours.stop_reasons[b] for b in same] == [ref.stop_reasons[b] for b in same]
    n = max(len(ref.tokens[b]) for b in same)  # (a parted row may be the longest: records are that long)
    assert torch.equal(ours.router_indices[same, :n], ref.router_indices[same, :n])
    torch.testing.assert_close(ours.sink[same, :n], ref.sink[same, :n], atol=1e-4, rtol=1e-4)


def _rows_equal_up_to_ties(model, prompts, ours, ref, margin=1e-3) -> list[int]:
    """The rows whose tokens are identical; any other row must part at a near-tie: where it first differs, the
    torch engine's logits of the two tokens are within `margin` (the random models here make such ties now and
    then, and the kernels' fp32 sums legitimately break them the other way). A real error fails the assert."""
    same = []
    for b, (mine, theirs) in enumerate(zip(ours, ref, strict=True)):
        if mine == theirs:
            same.append(b)
            continue
        i = next((i for i, (x, y) in enumerate(zip(mine, theirs, strict=False)) if x != y), None)
        assert i is not None, f"row {b}: {len(mine)} tokens against {len(theirs)}, the shorter one a prefix"
        ids = torch.tensor([prompts[b] + theirs[:i]], device=CUDA)
        with torch.no_grad():
            logits = model(ids)[0, -1].float()
        gap = (logits[theirs[i]] - logits[mine[i]]).item()
        assert 0 <= gap < margin, f"row {b} parts at token {i}: {mine[i]} against {theirs[i]}, logit gap {gap}"
    return same
