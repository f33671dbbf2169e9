"""The batched decode MoE (kernels/moe_batch.py) against its torch twin, on CPU through Triton's interpreter.

Like tests/test_kernels_cpu.py (tests/_interpreter.py switches the interpreter on), fp32/fp16 only: the
interpreter's tl.dot is wrong on bf16. Outputs are poisoned first, sizes are not multiples of the blocks.
"""

from __future__ import annotations

import pytest
import torch
from _interpreter import interpreted_kernels, rel

kernels = interpreted_kernels("tests/test_kernels_gpu.py checks the compiled kernels")
from ossscope.kernels.routing import route_reference  # noqa: E402

import ossscope  # noqa: E402
from ossscope import fast, mxfp4, ops  # noqa: E402


def _experts(gen, E, D, I, dtype):
    w1 = mxfp4.quantize(torch.randn(E, 2 * I, D, generator=gen) / D**0.5)
    w2 = mxfp4.quantize(torch.randn(E, D, I, generator=gen) / I**0.5)
    b1 = (torch.randn(E, 2 * I, generator=gen) * 0.1).to(dtype)
    b2 = (torch.randn(E, D, generator=gen) * 0.1).to(dtype)
    return (*w1, b1, *w2, b2)


# Small tiles so the interpreter is quick; D = 96 and I = 160 are not multiples of them.
SMALL = {"BLOCK_M": 16, "BLOCK_N1": 32, "BLOCK_N2": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
E, D, I, K = 6, 96, 160, 3  # E is not a power of two


def _masks(gen, which):
    reroute = torch.zeros(E, dtype=torch.bool)
    reroute[torch.randperm(E, generator=gen)[:2]] = True
    zero = ~reroute & (torch.rand(E, generator=gen) < 0.5)
    zero[(~reroute).nonzero()[0]] = True  # at least one zeroed expert that can be chosen
    return (reroute if which in ("reroute", "both") else None), (zero if which in ("zero", "both") else None)


def _run(gen, N, dtype, logits, r=None, z=None, blocks=SMALL, decode=None):
    packed = _experts(gen, E, D, I, dtype)
    h = torch.randn(N, D, generator=gen).to(dtype)
    indices = torch.full((N, K), -7, dtype=torch.int64)
    weights = torch.full((N, K), float("nan"))
    parts = torch.full((N * K, D), float("nan"))
    got = kernels.moe_decode_grouped(h, logits, K, *packed, 7.0, 1.702, r, z, indices_out=indices,
                                     weights_out=weights, out=parts, blocks=blocks, decode=decode)
    assert got[0] is parts and got[1] is indices and got[2] is weights  # the static buffers, written in place
    ref_i, ref_w = route_reference(logits, K, r, z)
    ref_packed = [t.float() if t.is_floating_point() else t for t in packed]
    _, ref_out = ops.moe_experts(h.float(), ref_i, ref_w, *ref_packed, 7.0, 1.702, per_expert=True)
    return h, packed, parts, indices, weights, ref_i, ref_w, ref_out


@pytest.mark.parametrize("N", [1, 7, 13])  # 13 tokens * 3 = 39 slots: several blocks of 16, none full
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_decode_matches_twin_and_per_slot_routing(gen, N, dtype):
    logits = torch.randn(N, E, generator=gen)
    h, packed, parts, indices, weights, ref_i, ref_w, ref_out = _run(gen, N, dtype, logits)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel(parts, ref_out.reshape(N * K, D)) < tol
    # The routing is exactly the per-slot decode's (same kernels' top-k, same ties).
    if dtype == torch.float32:
        blocks = {"BLOCK_I": 16, "GROUPS_I": 1, "BLOCK_D": 16, "GROUPS_D": 1, "SPLIT_D": 1}
        slot_parts, slot_i, slot_w = kernels.moe_decode_routed(kernels.input_words(h), logits, K, *packed,
                                                               blocks=blocks)
        assert torch.equal(indices, slot_i) and torch.equal(weights, slot_w)
        assert rel(parts, slot_parts) < 1e-5
    # The decoder's residual update: add_rms_norm sums the parts with the routing weights.
    x = torch.randn(N, D, generator=gen).to(dtype)
    residual, _ = kernels.add_rms_norm(x, parts, torch.ones(D, dtype=dtype), 1e-5, weights=weights)
    want = (x.float() + (ref_out * ref_w[..., None]).sum(1)).to(dtype)
    torch.testing.assert_close(residual, want, rtol=tol, atol=tol)


def test_grouped_decode_ties_choose_as_the_per_slot_decode(gen):
    """Tied logits: the lowest index first, as `moe_decode_routed` (torch.topk's order among ties is unspecified,
    so the twin is not the judge here); the outputs follow the chosen experts."""
    N = 5
    logits = torch.zeros(N, E)  # every expert tied: experts 0, 1, 2 in that order, equal weights
    logits[1, 4] = logits[1, 5] = 1.0  # two tied winners, then ties among the rest
    h, packed, parts, indices, weights, _, _, _ = _run(gen, N, torch.float32, logits)
    assert torch.equal(indices[0], torch.tensor([0, 1, 2])) and torch.equal(indices[1], torch.tensor([4, 5, 0]))
    _, slot_i, slot_w = kernels.moe_decode_routed(kernels.input_words(h), logits, K, *packed)
    assert torch.equal(indices, slot_i) and torch.equal(weights, slot_w)
    torch.testing.assert_close(weights[0], torch.full((K,), 1 / 3))
    _, ref_out = ops.moe_experts(h, indices, weights, *packed, 7.0, 1.702, per_expert=True)
    assert rel(parts, ref_out.reshape(N * K, D)) < 1e-5


@pytest.mark.parametrize("which", ["reroute", "zero", "both"])
def test_grouped_decode_ablation_masks(gen, which):
    N = 11
    r, z = _masks(gen, which)
    logits = torch.randn(N, E, generator=gen)
    if z is not None:  # make sure a zeroed expert is chosen by most tokens
        logits[:, z.nonzero()[0]] += 10.0
    _, _, parts, indices, weights, ref_i, ref_w, ref_out = _run(gen, N, torch.float32, logits, r, z)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    if r is not None:
        assert not r[indices].any()
    if z is not None:
        assert z[indices].any() and (weights[z[indices]] == 0).all()  # chosen, weight 0
    assert rel(parts, ref_out.reshape(N * K, D)) < 1e-5  # the zeroed experts' outputs are still there


def test_grouped_decode_one_expert_takes_every_token(gen):
    """17 tokens all on experts 2, 3, 4: each group (17 slots) spans two blocks of 16, and the grid's other
    blocks are unused."""
    N = 17
    logits = torch.randn(N, E, generator=gen) * 0.1
    logits[:, 2:5] += torch.tensor([3.0, 2.0, 1.0])
    _, _, parts, indices, weights, ref_i, ref_w, ref_out = _run(gen, N, torch.float32, logits)
    assert (indices == torch.tensor([2, 3, 4])).all()
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    assert rel(parts, ref_out.reshape(N * K, D)) < 1e-5


def test_grouped_decode_route_group_layout(gen):
    """The routing kernel's grouping is `group_by_expert`'s (same rows, same blocks), past its 32-token loop
    step (N = 45)."""
    N, BM = 45, 16
    logits = torch.randn(N, E, generator=gen)
    S = N * K
    n_blocks = kernels.moe_batch.max_row_blocks(S, E, BM)
    row_slot = torch.full((n_blocks * BM,), 99, dtype=torch.int32)
    block_expert = torch.full((n_blocks,), 99, dtype=torch.int32)
    indices, weights = torch.empty(N, K, dtype=torch.int64), torch.empty(N, K)
    kernels.moe_batch._route_group_kernel[(1,)](
        logits, logits, logits, indices, weights, row_slot, block_expert, N, E, n_blocks * BM, n_blocks,
        K_ACT=K, K_P2=4, BLOCK_E=8, BLOCK_T=32, BLOCK_M=BM, BLOCK_R=64, HAS_REROUTE=False, HAS_ZERO=False)
    ref_rows, ref_blocks = kernels.group_by_expert(route_reference(logits, K)[0], E, BM)
    assert n_blocks == ref_blocks.shape[0]
    assert torch.equal(row_slot, ref_rows) and torch.equal(block_expert, ref_blocks)


def test_grouped_decode_default_blocks_and_checks(gen):
    assert kernels.moe_batch.grouped_blocks(8 * 4, 32)["BLOCK_M"] == 16
    assert kernels.moe_batch.grouped_blocks(128 * 4, 32)["BLOCK_M"] == 32
    assert kernels.moe_batch.grouped_blocks(128 * 4, 32, {"BLOCK_M": 64})["BLOCK_M"] == 64
    # The measured defaults of each decode (moe_batch notes): direct BN 128 BK 64, dequant BN 64 BK 128.
    direct, dequant = (kernels.moe_batch.grouped_blocks(64 * 4, 32, decode=d) for d in ("direct", "dequant"))
    assert (direct["BLOCK_N1"], direct["BLOCK_N2"], direct["BLOCK_K"], direct["num_warps"]) == (128, 128, 64, 4)
    assert (dequant["BLOCK_N1"], dequant["BLOCK_K"]) == (64, 128) and "SPLIT_X" not in dequant
    packed = _experts(gen, E, D, I, torch.float32)
    h, logits = torch.randn(3, D), torch.randn(3, E)
    with pytest.raises(ValueError, match="router_logits must be contiguous"):
        kernels.moe_decode_grouped(h, torch.randn(E, 3).t(), K, *packed)
    with pytest.raises(ValueError, match="out must be contiguous float32"):
        kernels.moe_decode_grouped(h, logits, K, *packed, out=torch.empty(3, D))
    parts, indices, weights = kernels.moe_decode_grouped(h[:0], logits[:0], K, *packed)
    assert parts.shape == (0, D) and indices.shape == (0, K)


def test_graph_decoder_batched_moe_matches_torch_path(monkeypatch):
    """GraphDecoder (eager) at a batch whose slots exceed the threshold takes the grouped MoE, and still matches
    the torch forward: logits, routing records, resid_mid / mlp_out captures, rerouting and steering."""
    monkeypatch.setattr(fast, "GROUPED_DECODE_SLOTS", 8)  # tiny: k = 2, batch 5 -> 10 slots
    small = {**SMALL, "BLOCK_N1": 64, "BLOCK_N2": 64}
    monkeypatch.setattr(kernels.moe_batch, "GROUPED_BLOCKS", {"dequant": small, "direct": small})
    calls = []
    grouped = kernels.moe_decode_grouped
    monkeypatch.setattr(kernels, "moe_decode_grouped", lambda *a, **kw: calls.append(1) or grouped(*a, **kw))
    cfg = ossscope.PRESETS["tiny"].replace(num_hidden_layers=2, sliding_window=4)
    model = ossscope.random_model(cfg, seed=11, device="cpu", dtype=torch.float32)  # fixed: no routing near-ties
    B = 5
    ids = torch.randint(0, cfg.vocab_size, (B, 4))
    ref_cache, cache = model.new_cache(B, 16), model.new_cache(B, 16)
    model(ids, cache=ref_cache)
    model(ids, cache=cache)
    decoder = fast.GraphDecoder(model, cache, capture=["blocks.1.hook_resid_mid", "blocks.0.hook_mlp_out"],
                                graph=False)
    assert decoder.grouped_moe
    model.set_ablation({1: [0, 3]}, "reroute")
    model.set_steering(0, torch.randn(cfg.hidden_size))
    seen: dict[str, torch.Tensor] = {}
    names = ["blocks.1.hook_resid_mid", "blocks.1.mlp.hook_topk_indices", "blocks.0.hook_mlp_out",
             "blocks.1.mlp.hook_router_logits", "blocks.1.mlp.hook_topk_weights", "blocks.0.mlp.hook_topk_weights"]
    for _ in range(2):
        token = torch.randint(0, cfg.vocab_size, (B, 1))
        with model.hooks([(n, lambda x, hook: seen.__setitem__(hook.name, x.clone())) for n in names]):
            ref = model(token, cache=ref_cache)[:, -1]
        assert rel(decoder.step(token[:, 0]), ref) < 1e-5
        # fp32 sums in another order than torch's: differences of a few 1e-6 (once 1.03e-5 in CI) are rounding
        close = dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decoder.captured["blocks.1.hook_resid_mid"], seen[names[0]][:, 0], **close)
        assert torch.equal(decoder.router_indices[1], seen[names[1]][:, 0])
        assert not torch.isin(decoder.router_indices[1], torch.tensor([0, 3])).any()
        torch.testing.assert_close(decoder.captured["blocks.0.hook_mlp_out"], seen[names[2]][:, 0], **close)
        torch.testing.assert_close(decoder.router_logits[1], seen[names[3]][:, 0].float())
        torch.testing.assert_close(decoder.router_weights[1], seen[names[4]][:, 0])
        torch.testing.assert_close(decoder.router_weights[0], seen[names[5]][:, 0])
    assert len(calls) == 2 * cfg.num_hidden_layers


# -- the "direct" weight decode (kernels/moe.py `_direct_tile`) --------------------------------------------------
# On a GPU bf16 takes inline assembly, which the interpreter cannot run (and its bf16 arithmetic is wrong too): the
# bit trick is checked here by its torch twin for bf16, and the kernels run their fp16 form (the same code path
# with fp16 constants); scripts/moe_batch_sweep.py checks the bf16 assembly on the GPU.


def _every_byte(groups_per_row: int, rows: int) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).repeat(rows * groups_per_row * 16 // 256 + 1)[
        : rows * groups_per_row * 16].reshape(rows, groups_per_row, 16)


@pytest.mark.parametrize("dtype, lo, hi", [(torch.bfloat16, 34, 160), (torch.float16, 105, 128)])
def test_direct_bit_trick_is_exact_over_its_scale_range(dtype, lo, hi):
    """The twin of the bits the kernels build: every byte, every scale code of the documented range, gives the
    MXFP4 value times 2**-X exactly (0.5, -0, the largest and smallest scales included)."""
    codes = torch.arange(lo, hi + 1, dtype=torch.uint8)
    blocks = _every_byte(1, 16).repeat(len(codes), 1, 1)  # [codes * 16, 1, 16]: every byte under every scale
    scales = codes.repeat_interleave(16)[:, None]
    X = kernels.moe.DIRECT_X[str(dtype).removeprefix("torch.")]
    got = kernels.moe_batch.direct_reference(blocks, scales, dtype)
    assert got.dtype == dtype
    assert torch.equal(got.float() * 2.0**X, mxfp4.dequantize(blocks, scales, torch.float32))


def test_direct_dequantize_kernel_fp16(gen):
    """The kernels' decoder (plain Triton, fp16 constants) equals mxfp4.dequantize and the twin; rows and groups
    not multiples of its blocks (16 rows, 2 groups)."""
    blocks = _every_byte(5, 21)
    scales = torch.randint(110, 129, (21, 5), dtype=torch.uint8, generator=gen)
    got = kernels.moe_batch.direct_dequantize(blocks, scales, torch.float16)
    assert torch.equal(got, mxfp4.dequantize(blocks, scales, torch.float32))
    assert torch.equal(got.half(), kernels.moe_batch.direct_reference(blocks, scales, torch.float16))


@pytest.mark.parametrize("N", [1, 13])
def test_grouped_direct_decode_matches_twin_and_dequant(gen, N):
    """decode="direct" (fp16 form) against the twin, and against decode="dequant" on the same inputs: both
    multiply exact weights in fp32, so they agree far below fp16's rounding."""
    logits = torch.randn(N, E, generator=gen)
    h, packed, parts, indices, weights, ref_i, ref_w, ref_out = _run(gen, N, torch.float16, logits, decode="direct")
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    assert rel(parts, ref_out.reshape(N * K, D)) < 3e-3
    other, _, _ = kernels.moe_decode_grouped(h, logits, K, *packed, blocks=SMALL, decode="dequant")
    assert rel(parts, other) < 1e-5


def test_grouped_direct_decode_masks_and_one_expert(gen):
    """Rerouted and zeroed experts, then 17 tokens all on experts 2, 3, 4 (blocks spanning two of BLOCK_M, the
    grid's other blocks unused), with the direct decode and BLOCK_K 32 (one group per step)."""
    N = 11
    r, z = _masks(gen, "both")
    logits = torch.randn(N, E, generator=gen)
    logits[:, z.nonzero()[0]] += 10.0
    blocks = {**SMALL, "BLOCK_K": 32}
    _, _, parts, indices, weights, ref_i, ref_w, ref_out = _run(gen, N, torch.float16, logits, r, z, blocks,
                                                                "direct")
    assert torch.equal(indices, ref_i) and not r[indices].any() and (weights[z[indices]] == 0).all()
    assert rel(parts, ref_out.reshape(N * K, D)) < 3e-3
    N = 17
    logits = torch.randn(N, E, generator=gen) * 0.1
    logits[:, 2:5] += torch.tensor([3.0, 2.0, 1.0])
    _, _, parts, indices, _, ref_i, _, ref_out = _run(gen, N, torch.float16, logits, blocks=blocks, decode="direct")
    assert (indices == torch.tensor([2, 3, 4])).all()
    assert rel(parts, ref_out.reshape(N * K, D)) < 3e-3


def test_grouped_decode_choice_and_checks(gen):
    h = torch.randn(3, D)
    assert kernels.moe_batch.default_decode(h.bfloat16()) == "dequant"  # CPU (the interpreter): no assembly
    packed = _experts(gen, E, D, I, torch.float32)
    with pytest.raises(ValueError, match="needs bf16 or fp16"):
        kernels.moe_decode_grouped(h, torch.randn(3, E), K, *packed, decode="direct")
    with pytest.raises(ValueError, match="decode must be"):
        kernels.moe_decode_grouped(h, torch.randn(3, E), K, *packed, decode="fast")


# The direct kernels' flags (moe._direct_matmul): SPLIT_X (inputs and act split into even / odd features once) and
# PREFETCH_S (scales read a step ahead), each alone and together, fp16 through the interpreter, against the twin
# and bit for bit against the default direct path (same products, same order of sums).
VARIANTS = [{"SPLIT_X": True}, {"PREFETCH_S": True}, {"SPLIT_X": True, "PREFETCH_S": True}]


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: "+".join(f))
def test_grouped_direct_variants_match_twin_and_default(gen, flags):
    """13 tokens (blocks not full, unused blocks at the end), BLOCK_K 32 so the scale prefetch crosses several
    steps and runs past the last one; then 17 tokens all on experts 2, 3, 4 (each spans two row blocks)."""
    blocks = {**SMALL, "BLOCK_K": 32, **flags}
    for N, one_expert in [(13, False), (17, True)]:
        logits = torch.randn(N, E, generator=gen) * (0.1 if one_expert else 1.0)
        if one_expert:
            logits[:, 2:5] += torch.tensor([3.0, 2.0, 1.0])
        h, packed, parts, indices, weights, ref_i, ref_w, ref_out = _run(gen, N, torch.float16, logits,
                                                                         blocks=blocks, decode="direct")
        assert torch.equal(indices, ref_i)
        torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
        assert not parts.isnan().any()
        assert rel(parts, ref_out.reshape(N * K, D)) < 3e-3
        default, _, _ = kernels.moe_decode_grouped(h, logits, K, *packed, blocks={**SMALL, "BLOCK_K": 32},
                                                   decode="direct")
        assert rel(parts, default) < 1e-6
        if one_expert:
            assert (indices == torch.tensor([2, 3, 4])).all()


def test_grouped_direct_variants_masks(gen):
    """Rerouted and zeroed experts with both flags, BLOCK_K 64 (two groups a step)."""
    N = 11
    r, z = _masks(gen, "both")
    logits = torch.randn(N, E, generator=gen)
    logits[:, z.nonzero()[0]] += 10.0
    blocks = {**SMALL, "SPLIT_X": True, "PREFETCH_S": True}
    _, _, parts, indices, weights, ref_i, ref_w, ref_out = _run(gen, N, torch.float16, logits, r, z, blocks,
                                                                "direct")
    assert torch.equal(indices, ref_i) and not r[indices].any() and (weights[z[indices]] == 0).all()
    assert rel(parts, ref_out.reshape(N * K, D)) < 3e-3


def test_grouped_direct_flags_need_direct(gen):
    packed = _experts(gen, E, D, I, torch.float32)
    with pytest.raises(ValueError, match="flags of decode='direct'"):
        kernels.moe_decode_grouped(torch.randn(3, D), torch.randn(3, E), K, *packed, blocks={"SPLIT_X": True},
                                   decode="dequant")


# -- decode="fp8": the grouped kernels on fp8 tensor cores (moe_batch `_fp8_grouped_matmul`) ---------------------
# bf16 works end to end here: the inputs reach the dots as fp8 slices (the interpreter's fp8 dot is exact on them,
# as tests/test_kernels_cpu.py's moe_tc checks rely on), only the SwiGLU output's rounding to bf16 differs (the
# interpreter truncates where the GPU rounds to nearest). So each kernel is checked where it is exact: down against
# an fp64 product on the activation slices it was given, gate/up's activations against the fp64 SwiGLU of the x
# slices rounded to bf16 (either way); then the whole against the torch twin. The e4m3 codes take plain Triton here
# (the GPU's inline assembly is checked by scripts/moe_batch_sweep.py).
FP8 = {"BLOCK_N1": 64, "BLOCK_N2": 32, "num_warps": 4, "num_stages": 1}  # D = 96: 3 column tiles, the last partial


def _check_fp8(gen, N, logits, r=None, z=None, blocks=FP8):
    packed = _experts(gen, E, D, I, torch.bfloat16)
    h = torch.randn(N, D, generator=gen).bfloat16()
    indices = torch.full((N, K), -7, dtype=torch.int64)
    weights = torch.full((N, K), float("nan"))
    parts = torch.full((N * K, D), float("nan"))
    act = kernels.moe_tc.new_slices(N * K, I, "cpu", tile_groups=1)
    act[0].view(torch.uint8).fill_(0x7F)  # e4m3 NaN: every byte a slot reads must have been written
    got = kernels.moe_decode_grouped(h, logits, K, *packed, 7.0, 1.702, r, z, indices_out=indices,
                                     weights_out=weights, out=parts, blocks=blocks, decode="fp8", act_slices=act)
    assert got[0] is parts and got[1] is indices and got[2] is weights
    ref_i, ref_w = route_reference(logits, K, r, z)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    assert not parts.isnan().any()
    experts = ref_i.view(-1)
    # Down is exact on the activations it was given: an fp64 product on their slices' values.
    w2 = mxfp4.dequantize(packed[3], packed[4], torch.float64)
    act_values = kernels.moe_tc.slices_value(*act).double()  # [N * k, I]
    ref_down = torch.einsum("sdi,si->sd", w2[experts], act_values) + packed[5][experts].double()
    assert rel(parts, ref_down) < 1e-6
    # Gate/up: each activation is the SwiGLU of the exact sum on x's slices, rounded to bf16 (to nearest on the
    # GPU, toward zero here), as far as the slices hold it (moe_tc's test of the same).
    x_values = kernels.moe_tc.slices_value(*kernels.moe_tc.slices_reference(h, tile_groups=1)).double()
    w1 = mxfp4.dequantize(packed[0], packed[1], torch.float64)
    pre = torch.einsum("sfd,sd->sf", w1[experts], x_values[torch.arange(N * K) // K]) + packed[2][experts].double()
    exact = ops.swiglu(pre, 7.0, 1.702).float()
    nearest, toward_zero = exact.bfloat16().float(), (exact.view(torch.int32) & -65536).view(torch.float32)
    got_act = act_values.float().view(N * K, I // 32, 32)
    largest = nearest.view_as(got_act).abs().amax(-1, keepdim=True)
    within = nearest.view_as(got_act).abs() >= largest / 256
    rounded = (got_act == nearest.view_as(got_act)) | (got_act == toward_zero.view_as(got_act))
    assert rounded[within].float().mean() > 0.99
    assert ((got_act - nearest.view_as(got_act)).abs() <= largest * 2.0**-7).all()
    # The whole against the torch twin (fp32, activations unrounded): bf16's rounding of them apart.
    ref_packed = [t.float() if t.is_floating_point() else t for t in packed]
    _, ref_out = ops.moe_experts(h.float(), ref_i, ref_w, *ref_packed, 7.0, 1.702, per_expert=True)
    assert rel(parts, ref_out.reshape(N * K, D)) < 8e-3
    return indices


@pytest.mark.parametrize("N,BM", [(1, 8), (6, 8), (13, 16)])  # 13 * 3 = 39 slots: several blocks, none full
def test_grouped_fp8_decode_exact_where_it_should_be(gen, N, BM):
    _check_fp8(gen, N, torch.randn(N, E, generator=gen), blocks={**FP8, "BLOCK_M": BM})


def test_grouped_fp8_decode_one_expert_spans_blocks_and_masks(gen):
    """17 tokens all on experts 2, 3, 4 (17 slots each: three blocks of 8, the grid's other blocks unused), BLOCK_N1
    128 (two groups of units per program); then rerouted and zeroed experts at the default tiles."""
    N = 17
    logits = torch.randn(N, E, generator=gen) * 0.1
    logits[:, 2:5] += torch.tensor([3.0, 2.0, 1.0])
    indices = _check_fp8(gen, N, logits, blocks={**FP8, "BLOCK_N1": 128, "BLOCK_M": 8})
    assert (indices == torch.tensor([2, 3, 4])).all()
    N = 11
    r, z = _masks(gen, "both")
    logits = torch.randn(N, E, generator=gen)
    logits[:, z.nonzero()[0]] += 10.0
    indices = _check_fp8(gen, N, logits, r, z, blocks=None)
    assert not r[indices].any() and z[indices].any()


def test_e4m3_codes_are_the_mxfp4_values():
    """The bit move of `moe_tc._e4m3_codes` (its plain form; the assembly does the same on 4 bytes) for every byte:
    the E2M1 value times 2**-6, exactly, both nibbles."""
    b = torch.arange(256, dtype=torch.int32)
    low = ((b << 2) & 0x1C) | ((b << 4) & 0x80)
    high = ((b >> 2) & 0x1C) | (b & 0x80)
    as_e4m3 = torch.stack([low, high], -1).to(torch.uint8).view(torch.float8_e4m3fn).float().view(16, 32)
    want = mxfp4.dequantize(torch.arange(256, dtype=torch.uint8).view(16, 1, 16), torch.full((16, 1), 127,
                            dtype=torch.uint8), torch.float32)  # [16 rows, 1 group of 32], scale 2**0
    assert torch.equal(as_e4m3 * 64, want)


def test_compact_slices_match_twin(gen):
    """input_slices(tile_groups=1), the form the fp8 grouped kernels read: the twin's bytes, the value bf16 holds
    within 2**8 of each group's largest, [N, 4, K] with every byte written."""
    x = torch.randn(3, 320, generator=gen)
    x[1, 40:50] *= 1e-3
    x = x.bfloat16()
    bt, xe = kernels.input_slices(x, tile_groups=1)
    assert bt.shape == (3, kernels.moe_tc.SLICES, 320)
    ref_bt, ref_xe = kernels.moe_tc.slices_reference(x, tile_groups=1)
    assert torch.equal(bt.view(torch.uint8), ref_bt.view(torch.uint8)) and torch.equal(xe, ref_xe)
    value, groups = kernels.moe_tc.slices_value(bt, xe).view(3, 10, 32), x.float().view(3, 10, 32)
    largest = groups.abs().amax(-1, keepdim=True)
    within = groups.abs() >= largest / 256
    assert torch.equal(value[within], groups[within]) and ((value - groups).abs() <= largest * 2.0**-16).all()


def test_grouped_fp8_decode_checks(gen):
    packed = _experts(gen, E, D, I, torch.bfloat16)
    h, logits = torch.randn(3, D), torch.randn(3, E)
    assert kernels.moe_batch.default_decode(h.bfloat16()) != "fp8"  # opt-in only
    assert kernels.moe_batch.grouped_blocks(8 * 4, 32, decode="fp8")["BLOCK_M"] == 8
    assert kernels.moe_batch.grouped_blocks(128 * 4, 32, decode="fp8")["BLOCK_M"] == 16
    with pytest.raises(ValueError, match="decode='fp8' needs bf16"):
        kernels.moe_decode_grouped(h, logits, K, *packed, decode="fp8")
    with pytest.raises(ValueError, match="BLOCK_N1 a multiple of 64"):
        kernels.moe_decode_grouped(h.bfloat16(), logits, K, *packed, decode="fp8", blocks={"BLOCK_N1": 32})
    with pytest.raises(ValueError, match="act_slices is for"):
        kernels.moe_decode_grouped(h.bfloat16(), logits, K, *packed, decode="direct",
                                   act_slices=kernels.moe_tc.new_slices(9, I, "cpu", 1))
    with pytest.raises(ValueError, match="act_slices\\[0\\] must be"):
        kernels.moe_decode_grouped(h.bfloat16(), logits, K, *packed, decode="fp8",
                                   act_slices=kernels.moe_tc.new_slices(9, I, "cpu"))
