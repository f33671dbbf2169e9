"""Ragged batches in the attention kernels: positions per sequence (q_pos [B, Tq], k_pos [B, Tk]; a decode step's
slot, position and RoPE tables per row), on CPU through Triton's interpreter (fp32, small shapes).

Like tests/test_kernels_cpu.py, it runs the kernels under Triton's interpreter (tests/_interpreter.py) and is
skipped where a GPU is present
(scripts/ragged_attention_check.py checks the compiled kernels there). Rows sit at different lengths, so a
kernel that read row 0's positions (or the shared ones) for every row gives a different answer.
"""

from __future__ import annotations

import pytest
import torch
from _interpreter import interpreted_kernels, rel

kernels = interpreted_kernels("scripts/ragged_attention_check.py checks the compiled kernels")

from ossscope import ops  # noqa: E402

H, HKV, DH = 8, 2, 16  # G = 4 query heads per kv head


def ragged_k_pos(S: int, gen: torch.Generator) -> torch.Tensor:
    """Cache positions [4, S], one row per kind of sequence: short (8 keys in order, the rest empty), a ring
    buffer whose slots wrapped (positions 50..50+S-1 at slot position % S), a full one in order, and scattered
    positions with holes."""
    short = torch.where(torch.arange(S) < 8, torch.arange(S), -1)
    wrapped = torch.empty(S, dtype=torch.long)
    wrapped[torch.arange(50, 50 + S) % S] = torch.arange(50, 50 + S)
    scattered = torch.randperm(S + 20, generator=gen)[:S]
    scattered[::5] = -1
    return torch.stack((short, wrapped, torch.arange(S), scattered))


def qkv_tensors(gen, B, Tq, Tk, dtype=torch.float32):
    q = torch.randn(B, Tq, H, DH, generator=gen).to(dtype)
    k = torch.randn(B, Tk, HKV, DH, generator=gen).to(dtype)
    v = torch.randn(B, Tk, HKV, DH, generator=gen).to(dtype)
    return q, k, v, torch.randn(H, generator=gen)


# -- (a) attention_prefill / attention_decode against the torch twin --------------------------------------


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_positions_per_row_match_twin(gen, window):
    """Per-row q_pos and k_pos (and each mixed with shared ones); 37 keys in blocks of 16, so the rows' key-block
    ranges differ (the short row's keys sit in block 0 only)."""
    B, Tq, Tk = 4, 7, 37
    q, k, v, sinks = qkv_tensors(gen, B, Tq, Tk)
    k_pos = ragged_k_pos(Tk, gen)
    # Each row's queries continue that row: the short one at 8.., the wrapped one after its last key, ...
    q_pos = torch.stack([torch.arange(Tq) + start for start in (8, 50 + Tk, 30, 40)])
    for qp, kp in ((q_pos, k_pos), (q_pos, torch.arange(Tk)), (torch.arange(20, 20 + Tq), k_pos)):
        z = torch.full((B, Tq, H, DH), float("nan"))
        sink = torch.full((B, H, Tq), float("nan"))
        kernels.attention_prefill(q, k, v, sinks, qp, kp, window, block_m=16, block_n=16, out=z, sink_out=sink)
        ref_z, ref_sink, _ = ops.attention(q, k, v, sinks, qp, kp, window)
        assert rel(z, ref_z) < 1e-5
        torch.testing.assert_close(sink, ref_sink)


def test_prefill_row_that_sees_nothing_next_to_rows_that_do(gen):
    """Row 1's keys are all in its queries' future or empty: z = 0 and sink mass 1 there, the others as the twin."""
    q, k, v, sinks = qkv_tensors(gen, 2, 3, 20)
    k_pos = torch.stack((torch.arange(20), torch.where(torch.arange(20) % 3 == 0, -1, torch.arange(20) + 10)))
    q_pos = torch.tensor([[17, 18, 19], [0, 1, 2]])
    z, sink = kernels.attention_prefill(q, k, v, sinks, q_pos, k_pos, None, block_m=16, block_n=16)
    assert torch.equal(z[1], torch.zeros_like(z[1])) and torch.equal(sink[1], torch.ones_like(sink[1]))
    ref_z, ref_sink, _ = ops.attention(q, k, v, sinks, q_pos, k_pos, None)
    assert rel(z[0], ref_z[0]) < 1e-5
    torch.testing.assert_close(sink, ref_sink)


@pytest.mark.parametrize("window,splits", [(None, 3), (8, 3), (None, 1), (8, None)])
def test_decode_positions_per_row_match_twin_with_pattern(gen, window, splits):
    B, Tk = 4, 45
    q, k, v, sinks = qkv_tensors(gen, B, 1, Tk)
    k_pos = ragged_k_pos(Tk, gen)
    q_pos = torch.tensor([[8], [50 + Tk], [44], [70]])
    for qp, kp in ((q_pos, k_pos), (q_pos, torch.arange(Tk)), (torch.tensor([30]), k_pos)):
        z = torch.full((B, 1, H, DH), float("nan"))
        sink = torch.full((B, H), float("nan"))
        pattern = torch.full((B, H, Tk), float("nan"))
        _, sink_mass, pat = kernels.attention_decode(q, k, v, sinks, qp, kp, window, need_pattern=True, block_n=16,
                                                     splits=splits, out=z, sink_out=sink, pattern_out=pattern)
        ref_z, ref_sink, ref_pat = ops.attention(q, k, v, sinks, qp, kp, window, need_pattern=True)
        assert rel(z, ref_z) < 1e-5
        torch.testing.assert_close(sink_mass, ref_sink)
        torch.testing.assert_close(pat, ref_pat)
        z2, sink2, none = kernels.attention_decode(q, k, v, sinks, qp, kp, window, block_n=16, splits=splits)
        assert none is None and rel(z2, ref_z) < 1e-5
        torch.testing.assert_close(sink2, ref_sink)


def test_attention_dispatch_with_positions_per_row(gen):
    B, Tk = 4, 30
    k_pos = ragged_k_pos(Tk, gen)
    for Tq, need_pattern in ((1, False), (1, True), (5, False), (5, True)):
        q, k, v, sinks = qkv_tensors(gen, B, Tq, Tk)
        q_pos = torch.stack([torch.arange(Tq) + start for start in (8, 50 + Tk, 25, 40)])
        z, sink, pat = kernels.attention(q, k, v, sinks, q_pos, k_pos, 6, need_pattern)
        ref_z, ref_sink, ref_pat = ops.attention(q, k, v, sinks, q_pos, k_pos, 6, need_pattern=need_pattern)
        assert rel(z, ref_z) < 1e-5
        torch.testing.assert_close(sink, ref_sink)
        assert (pat is None) == (not need_pattern)
        if need_pattern:
            torch.testing.assert_close(pat, ref_pat)


@pytest.mark.parametrize("Tq", [1, 6])
def test_positions_repeated_per_row_equal_shared_positions_exactly(gen, Tq):
    """The same positions given per row ([B, T], every row alike) or shared ([T]) run the same arithmetic."""
    B, Tk = 3, 37
    q, k, v, sinks = qkv_tensors(gen, B, Tq, Tk)
    k_pos = ragged_k_pos(Tk, gen)[1]  # the wrapped ring
    q_pos = torch.arange(50 + Tk, 50 + Tk + Tq)
    rows = (q_pos.repeat(B, 1), k_pos.repeat(B, 1))
    if Tq == 1:
        shared = kernels.attention_decode(q, k, v, sinks, q_pos, k_pos, 9, True, block_n=16, splits=3)
        per_row = kernels.attention_decode(q, k, v, sinks, *rows, 9, True, block_n=16, splits=3)
    else:
        shared = kernels.attention_prefill(q, k, v, sinks, q_pos, k_pos, 9, block_m=16, block_n=16)
        per_row = kernels.attention_prefill(q, k, v, sinks, *rows, 9, block_m=16, block_n=16)
    for a, b in zip(shared, per_row, strict=True):
        assert torch.equal(a, b)


def test_wrong_position_shapes_are_refused(gen):
    q, k, v, sinks = qkv_tensors(gen, 3, 4, 20)
    pos, k_pos = torch.arange(4), torch.arange(20)
    for qp, kp, words in ((pos.repeat(2, 1), k_pos, "q_pos must be an integer tensor [4] or [3, 4]"),
                          (pos, k_pos.repeat(2, 1), "k_pos must be an integer tensor [20] or [3, 20]"),
                          (pos, k_pos[:19], "k_pos must be"),
                          (pos.float(), k_pos, "q_pos must be an integer tensor"),
                          (pos, k_pos.repeat(3, 2)[:, ::2], "k_pos must be contiguous")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[")):
            kernels.attention_prefill(q, k, v, sinks, qp, kp, None)
    with pytest.raises(ValueError, match=r"k_pos must be an integer tensor \[20\] or \[3, 20\]"):
        kernels.attention_decode(q[:, :1], k, v, sinks, pos[:1], k_pos.repeat(4, 1), None)


# -- (b) attention_decode_step per row against each row alone ---------------------------------------------


def step_inputs(gen, B: int, S: int):
    """A decode step's inputs with everything per row: qkv [B, W], the cache, k_pos [B, S], slot and position [B]
    and cos/sin [B, Dh/2]. Row 1 is a ring buffer (slot = position % S) that overwrites an older key."""
    qkv = torch.randn(B, (H + 2 * HKV) * DH, generator=gen)
    k_cache, v_cache = torch.randn(B, S, HKV, DH, generator=gen), torch.randn(B, S, HKV, DH, generator=gen)
    k_pos = ragged_k_pos(S, gen)[:B].clone()
    position = torch.tensor([8, 50 + S, 30, 70])[:B]
    slot = torch.tensor([8, (50 + S) % S, 31, 7])[:B]  # rows 2 and 3: any free or reused slot
    cos, sin = torch.randn(B, DH // 2, generator=gen), torch.randn(B, DH // 2, generator=gen)
    return qkv, k_cache, v_cache, k_pos, slot, position, cos, sin, torch.randn(H, generator=gen)


@pytest.mark.parametrize("window,splits,pattern", [(None, 3, True), (6, 1, False), (None, 4, False),
                                                    (6, 3, True)])
def test_decode_step_per_row_equals_each_row_alone(gen, window, splits, pattern):
    """Rows are independent, so the batch gives exactly what each row gives alone at batch 1 with shared [1]
    slot and position, [S] k_pos and [1, Dh/2] tables (same splits, so the same chunks and sums)."""
    B, S = 4, 45
    qkv, k_cache, v_cache, k_pos, slot, position, cos, sin, sinks = step_inputs(gen, B, S)
    alone = []
    for b in range(B):
        k1, v1, p1 = k_cache[b:b + 1].clone(), v_cache[b:b + 1].clone(), k_pos[b].clone()
        out = kernels.attention_decode_step(qkv[b:b + 1], cos[b:b + 1], sin[b:b + 1], k1, v1, p1, slot[b:b + 1],
                                            position[b:b + 1], sinks, window, H, need_pattern=pattern, block_n=16,
                                            splits=splits)
        alone.append((k1, v1, p1, *out))
    counters = kernels.decode_counters(B, HKV, "cpu")
    z, sm = torch.full((B, 1, H, DH), float("nan")), torch.full((B, H), float("nan"))
    pattern_out = torch.full((B, H, S), float("nan")) if pattern else None
    _, sink_mass, pat = kernels.attention_decode_step(
        qkv, cos, sin, k_cache, v_cache, k_pos, slot, position, sinks, window, H, need_pattern=pattern, block_n=16,
        splits=splits, out=z, sink_out=sm, pattern_out=pattern_out, counters=counters)
    for b, (k1, v1, p1, z1, s1, pat1) in enumerate(alone):
        assert torch.equal(k_cache[b], k1[0]) and torch.equal(v_cache[b], v1[0]) and torch.equal(k_pos[b], p1)
        assert int(k_pos[b, slot[b]]) == int(position[b])
        assert torch.equal(z[b], z1[0]) and torch.equal(sink_mass[b], s1[0])
        if pattern:
            assert torch.equal(pat[b], pat1[0])
    assert not counters.any()  # left zeroed for the next call


@pytest.mark.parametrize("window", [None, 6])
def test_decode_step_per_row_matches_twin(gen, window):
    """The same step against the torch twin: RoPE per row (ops.apply_rope with [B, 1, Dh/2] tables), the cache
    written row by row, then ops.attention with positions per row."""
    B, S = 4, 45
    qkv, k_cache, v_cache, k_pos, slot, position, cos, sin, sinks = step_inputs(gen, B, S)
    q, k_new, v_new = qkv.view(B, 1, H + 2 * HKV, DH).split([H, HKV, HKV], dim=2)
    q, k_new = ops.apply_rope(q, cos[:, None], sin[:, None]), ops.apply_rope(k_new, cos[:, None], sin[:, None])
    ref_k, ref_v, ref_pos = k_cache.clone(), v_cache.clone(), k_pos.clone()
    rows = torch.arange(B)
    ref_k[rows, slot], ref_v[rows, slot], ref_pos[rows, slot] = k_new[:, 0], v_new[:, 0], position
    ref_z, ref_sink, ref_pat = ops.attention(q, ref_k, ref_v, sinks, position[:, None], ref_pos, window,
                                             need_pattern=True)
    z, sink_mass, pat = kernels.attention_decode_step(qkv, cos, sin, k_cache, v_cache, k_pos, slot, position,
                                                      sinks, window, H, need_pattern=True, block_n=16, splits=3)
    assert torch.allclose(k_cache, ref_k, atol=1e-6) and torch.equal(v_cache, ref_v) and torch.equal(k_pos, ref_pos)
    assert rel(z, ref_z) < 1e-5
    torch.testing.assert_close(sink_mass, ref_sink)
    torch.testing.assert_close(pat, ref_pat)


def test_decode_step_shared_slot_with_k_pos_per_row(gen):
    """Shared slot and position with k_pos [B, S]: every row's k_pos gets the new position (not just row 0's);
    per-row RoPE tables with shared positions are fine too."""
    B, S = 3, 20
    qkv, k_cache, v_cache, k_pos, _, _, cos, sin, sinks = step_inputs(gen, B, S)
    k_pos = torch.where(torch.arange(S) < 12, torch.arange(S), -1).repeat(B, 1)
    slot, position = torch.tensor([12]), torch.tensor([12])
    shared_pos = k_pos[0].clone()
    k2, v2 = k_cache.clone(), v_cache.clone()
    z, sm, _ = kernels.attention_decode_step(qkv, cos[:1], sin[:1], k_cache, v_cache, k_pos, slot, position, sinks,
                                             None, H, block_n=16, splits=2)
    z2, sm2, _ = kernels.attention_decode_step(qkv, cos[:1].expand(B, -1), sin[:1].expand(B, -1), k2, v2,
                                               shared_pos, slot, position, sinks, None, H, block_n=16, splits=2)
    assert torch.equal(k_pos, shared_pos.repeat(B, 1)) and int(shared_pos[12]) == 12
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    assert torch.equal(z, z2) and torch.equal(sm, sm2)


def test_decode_step_refuses_inconsistent_shapes(gen):
    B, S = 3, 20
    qkv, k_cache, v_cache, k_pos, slot, position, cos, sin, sinks = step_inputs(gen, B, S)
    k_pos = k_pos[:B]
    cases = (
        (dict(k_pos=k_pos[:2]), r"k_pos must be an integer tensor \[20\] or \[3, 20\]"),
        (dict(k_pos=k_pos[0]), r"k_pos must be \[3, 20\] with a row per sequence"),  # per-row slots, shared k_pos
        (dict(k_pos=k_pos[:1].expand(B, -1)), "with a row per sequence"),  # rows would race on one row
        (dict(slot=slot[:2]), r"slot must be an integer tensor \[1\] or \[3\]"),
        (dict(position=position.float()), "position must be an integer tensor"),
        (dict(cos=cos[:2], sin=sin[:2]), r"cos and sin must be \[1, 8\] or \[3, 8\]"),
        (dict(sin=sin[:1]), "cos and sin must be"),
    )
    args = dict(qkv=qkv, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, k_pos=k_pos, slot=slot,
                position=position, sinks=sinks, window=None, num_heads=H)
    for change, words in cases:
        with pytest.raises(ValueError, match=words):
            kernels.attention_decode_step(**{**args, **change})


# -- (c) keys_in_order: each row stops at its own slot -----------------------------------------------------


@pytest.mark.parametrize("splits", [1, 3, None])
def test_keys_in_order_stops_each_row_at_its_own_slot(gen, splits):
    """Full-attention rows at different lengths (slot = position), the slots after each row's new one empty
    (k_pos -1) and holding NaN: a kernel that read one of them would turn that row's output into NaN (0 * NaN),
    so equality with the clean cache shows each row stops at its own slot + 1, not at another row's."""
    B, S = 4, 45
    lengths = torch.tensor([30, 3, 44, 0])  # the new token's position and slot per row
    qkv = torch.randn(B, (H + 2 * HKV) * DH, generator=gen)
    k_cache, v_cache = torch.randn(B, S, HKV, DH, generator=gen), torch.randn(B, S, HKV, DH, generator=gen)
    after = torch.arange(S)[None, :] > lengths[:, None]  # [B, S]: slots after the new one
    k_pos = torch.where(torch.arange(S)[None, :] < lengths[:, None], torch.arange(S), -1)
    cos, sin, sinks = torch.randn(B, DH // 2, generator=gen), torch.randn(B, DH // 2, generator=gen), torch.randn(
        H, generator=gen)
    garbage_k = k_cache.masked_fill(after[:, :, None, None], float("nan"))
    garbage_v = v_cache.masked_fill(after[:, :, None, None], float("nan"))
    kp_in_order = k_pos.clone()
    z, sm, _ = kernels.attention_decode_step(qkv, cos, sin, garbage_k, garbage_v, kp_in_order, lengths, lengths,
                                             sinks, None, H, block_n=16, splits=splits, keys_in_order=True)
    # The reference reads every slot of a clean cache: the slots after the new one hold large values, not NaN.
    clean_k = k_cache.masked_fill(after[:, :, None, None], 1e4)
    clean_v = v_cache.masked_fill(after[:, :, None, None], -1e4)
    kp_all = k_pos.clone()
    z0, sm0, _ = kernels.attention_decode_step(qkv, cos, sin, clean_k, clean_v, kp_all, lengths, lengths, sinks,
                                               None, H, block_n=16, splits=splits)
    assert not z.isnan().any()
    assert rel(z, z0) < 1e-6
    torch.testing.assert_close(sm, sm0)
    assert torch.equal(kp_in_order, kp_all) and (kp_all[torch.arange(B), lengths] == lengths).all()
    assert torch.equal(garbage_k[~after], clean_k[~after]) and torch.equal(garbage_v[~after], clean_v[~after])


# -- the kernel engine over ragged and continuous batches ------------------------------------------------------


def test_kernel_engine_continuous_batching_equals_the_torch_engine():
    """generate over prompts of different lengths, two rows at a time, on the kernel engine (fused prefill per
    row; the decoder's batched step, eager on the CPU, with per-row positions and rows left out once they stop)
    gives the torch engine's tokens and records; so does the same batch with one row per prompt."""
    import ossscope
    from ossscope.engine import KernelEngine, TorchEngine
    from ossscope.generation import generate

    cfg = ossscope.PRESETS["tiny"].replace(num_hidden_layers=2, sliding_window=4)
    model = ossscope.random_model(cfg, seed=5, device="cpu", engine="torch")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 5)]
    ref = generate(model, prompts, max_new_tokens=6, stop_tokens=(), engine=TorchEngine(model))
    stop = ref.tokens[1][2]  # prompt 1 stops early; the others may too
    ref = generate(model, prompts, max_new_tokens=6, stop_tokens=(stop,), engine=TorchEngine(model))
    for batch_size in (2, 3):
        engine = KernelEngine(model, graphs=False)
        got = generate(model, prompts, max_new_tokens=6, stop_tokens=(stop,), engine=engine, batch_size=batch_size)
        assert got.tokens == ref.tokens and got.stop_reasons == ref.stop_reasons
        assert torch.equal(got.router_indices, ref.router_indices)
        torch.testing.assert_close(got.sink, ref.sink, atol=1e-5, rtol=1e-5)
        assert engine.graph_steps == engine.steps > 0
    ossscope.fast.use_kernels(model, False)
