"""Attention with a learned sink per head and an optional sliding window, in two kernels.

Index legend: B batch, Tq queries, Tk keys, H query heads, Hkv key/value heads, G = H / Hkv, Dh head dim.
Visibility follows positions, as in `ossscope.ops.attention` (the torch twin): key j is visible to query i iff
0 <= k_pos[j] <= q_pos[i] and (no window or q_pos[i] - k_pos[j] < window); k_pos = -1 is an empty cache slot.

The sink is one more logit in each row's softmax with no value vector. Both kernels start the online softmax
with the sink as the running maximum (denominator 1, output 0), so the sink sits in the denominator for free,
a row that sees no key ends with z = 0 and sink mass 1, and the sink mass is exp(sink - max) / denominator.

- prefill: flash-attention style, one program per (query block, query head); it reads kv head h // G in
  place (repeated K/V are never materialized) and skips key blocks that no query of its block can see, using
  each key block's position range, so sliding layers cost O(T * window).
- decode (one query per sequence): the cache is split into chunks; one program per (sequence, kv head, chunk)
  handles all G query heads of that kv head as the rows of one tensor-core tile, and a second kernel merges
  the chunks' partial softmax states with the sink. With need_pattern, the first kernel also writes the
  scaled logits and the second turns them into probabilities, so the pattern costs one extra pass over Tk.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import await_inputs, check, check_float, check_runnable, check_same_device, dot, use_pdl

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, sink_ptr, qpos_ptr, kpos_ptr, kb_min_ptr, kb_max_ptr, z_ptr, sm_ptr,
    Tq, Tk, H, window, qk_scale,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, szb, szt, szh,
    G: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, SCAN: tl.constexpr = 256,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < Tq
    d = tl.arange(0, DH)
    q = tl.load(q_ptr + b * sqb + offs_m[:, None] * sqt + h * sqh + d[None, :], mask=mmask[:, None], other=0.0)
    qpos = tl.load(qpos_ptr + offs_m, mask=mmask, other=-1)
    q_hi = tl.max(qpos, axis=0)
    q_lo = tl.min(tl.where(mmask, qpos, q_hi), axis=0)
    sink = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634  # log2 domain
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, DH], dtype=tl.float32)
    # The span of key blocks some query of this block can see (a causal or sliding-window band), found by a
    # vector scan of the blocks' position ranges, so the main loop never visits blocks outside it.
    n_kb = tl.cdiv(Tk, BLOCK_N)
    kb_first = n_kb
    kb_last = -1
    for c0 in range(0, n_kb, SCAN):
        kbs = c0 + tl.arange(0, SCAN)
        lo = tl.load(kb_min_ptr + kbs, mask=kbs < n_kb, other=0)
        hi = tl.load(kb_max_ptr + kbs, mask=kbs < n_kb, other=-1)
        seen = (hi >= 0) & (lo <= q_hi)
        if HAS_WINDOW:
            seen = seen & (q_lo - hi < window)
        kb_first = tl.minimum(kb_first, tl.min(tl.where(seen, kbs, n_kb), axis=0))
        kb_last = tl.maximum(kb_last, tl.max(tl.where(seen, kbs, -1), axis=0))
    # Blocks inside the span that no query sees (possible only for scattered ring-buffer positions) cost a
    # masked pass; the masks below keep the result exact either way.
    for kb in range(kb_first, kb_last + 1):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < Tk
        kpos = tl.load(kpos_ptr + offs_n, mask=nmask, other=-1)
        kt = tl.load(k_ptr + b * skb + offs_n[None, :] * skt + hk * skh + d[:, None], mask=nmask[None, :],
                     other=0.0)  # [DH, BLOCK_N]
        s = dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
        visible = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            visible = visible & (qpos[:, None] - kpos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: it starts at the sink
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + offs_n[:, None] * svt + hk * svh + d[None, :], mask=nmask[:, None],
                    other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    z = acc / l_i[:, None]
    tl.store(z_ptr + b * szb + offs_m[:, None] * szt + h * szh + d[None, :], z.to(z_ptr.dtype.element_ty),
             mask=mmask[:, None])
    tl.store(sm_ptr + pid_bh * Tq + offs_m, tl.exp2(sink - m_i) / l_i, mask=mmask)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, pat_ptr,
    Tk, Hkv, chunk, window, qk_scale,
    sqb, sqh, skb, skt, skh, svb, svt, svh, spb, sph,
    G: tl.constexpr, G_P2: tl.constexpr, DH: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, WRITE_PATTERN: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    await_inputs(PDL)
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    g = tl.arange(0, G_P2)
    gmask = g < G
    heads = hk * G + g
    d = tl.arange(0, DH)
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=gmask[:, None], other=0.0)
    qpos = tl.load(qpos_ptr)
    m_i = tl.full([G_P2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_P2], dtype=tl.float32)
    acc = tl.zeros([G_P2, DH], dtype=tl.float32)
    start = split * chunk
    stop = tl.minimum(start + chunk, Tk)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < stop
        kpos = tl.load(kpos_ptr + offs_n, mask=nmask, other=-1)
        visible = (kpos >= 0) & (kpos <= qpos)
        if HAS_WINDOW:
            visible = visible & (qpos - kpos < window)
        kt = tl.load(k_ptr + b * skb + offs_n[None, :] * skt + hk * skh + d[:, None], mask=nmask[None, :], other=0.0)
        s = dot(q, kt, tl.zeros([G_P2, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
        s = tl.where(visible[None, :], s, float("-inf"))
        if WRITE_PATTERN:
            tl.store(pat_ptr + b * spb + heads[:, None] * sph + offs_n[None, :], s,
                     mask=gmask[:, None] & nmask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: keep exp2 away from -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + offs_n[:, None] * svt + hk * svh + d[None, :], mask=nmask[:, None], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    row = (b * Hkv * G + heads) * SPLITS + split  # partial state of (b, head, split)
    tl.store(part_m_ptr + row, m_i, mask=gmask)
    tl.store(part_l_ptr + row, l_i, mask=gmask)
    tl.store(part_acc_ptr + row[:, None] * DH + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _decode_combine_kernel(
    sink_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, z_ptr, sm_ptr, pat_ptr,
    H, Tk, szb, szh, ssb, spb, sph,
    DH: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_PATTERN: tl.constexpr, PDL: tl.constexpr,
):
    await_inputs(PDL)
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    h = pid % H
    sp = tl.arange(0, SPLITS_P2)
    spmask = sp < SPLITS
    d = tl.arange(0, DH)
    m = tl.load(part_m_ptr + pid * SPLITS + sp, mask=spmask, other=float("-inf"))
    l_part = tl.load(part_l_ptr + pid * SPLITS + sp, mask=spmask, other=0.0)
    acc = tl.load(part_acc_ptr + (pid * SPLITS + sp)[:, None] * DH + d[None, :], mask=spmask[:, None], other=0.0)
    sink = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
    m_all = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp2(m - m_all)  # 0 for chunks that saw no key
    denom = tl.sum(l_part * w, axis=0) + tl.exp2(sink - m_all)
    z = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(z_ptr + b * szb + h * szh + d, z.to(z_ptr.dtype.element_ty))
    tl.store(sm_ptr + b * ssb + h, tl.exp2(sink - m_all) / denom)
    if WRITE_PATTERN:
        row = pat_ptr + b * spb + h * sph
        for n0 in range(0, Tk, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            nmask = offs < Tk
            s = tl.load(row + offs, mask=nmask, other=float("-inf"))
            tl.store(row + offs, tl.exp2(s - m_all) / denom, mask=nmask)


def _check_inputs(q, k, v, sinks, q_pos, k_pos, window):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(t.dim() == 4, f"{name} must be [B, T, heads, Dh], got shape {tuple(t.shape)}")
        check_float(name, t)
        check(t.stride(-1) == 1, f"{name} must be contiguous along the head dimension")
    B, Tq, H, Dh = q.shape
    check(k.shape == v.shape, f"k and v shapes differ: {tuple(k.shape)} and {tuple(v.shape)}")
    check(k.shape[0] == B and k.shape[3] == Dh,
          f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    Hkv = k.shape[2]
    check(H % Hkv == 0, f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    check(Dh >= 16 and Dh & (Dh - 1) == 0, f"head dim must be a power of two >= 16, got {Dh}")
    check(tuple(sinks.shape) == (H,), f"sinks must be [{H}], got {tuple(sinks.shape)}")
    check(tuple(q_pos.shape) == (Tq,) and not q_pos.is_floating_point(),
          f"q_pos must be an integer tensor [{Tq}], got {q_pos.dtype} {tuple(q_pos.shape)}")
    check(tuple(k_pos.shape) == (k.shape[1],) and not k_pos.is_floating_point(),
          f"k_pos must be an integer tensor [{k.shape[1]}], got {k_pos.dtype} {tuple(k_pos.shape)}")
    check(window is None or window >= 1, f"window must be None or positive, got {window}")
    check_runnable(q)
    check_same_device(q=q, k=k, v=v, sinks=sinks, q_pos=q_pos, k_pos=k_pos)
    return B, Tq, H, Dh, Hkv


def attention_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_pos: torch.Tensor,
    k_pos: torch.Tensor, window: int | None, *, block_m: int = 128, block_n: int = 64,
    out: torch.Tensor | None = None, sink_out: torch.Tensor | None = None, num_warps: int = 4, num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention with sinks: q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh] -> z [B, Tq, H, Dh], sink_mass [B, H, Tq].

    Positions are arbitrary (a ring-buffer cache works). Each program visits only the span of key blocks its
    queries can see (the causal or sliding-window band when positions are sorted). Tile defaults are from a
    sweep on an H100 (scripts/moe_sweep.py).
    `out` [B, Tq, H, Dh] (last dimension contiguous) and `sink_out` (contiguous fp32 [B, H, Tq]) are optional
    destinations.
    """
    B, Tq, H, Dh, Hkv = _check_inputs(q, k, v, sinks, q_pos, k_pos, window)
    Tk = k.shape[1]
    z = out if out is not None else torch.empty(B, Tq, H, Dh, device=q.device, dtype=q.dtype)
    check(tuple(z.shape) == (B, Tq, H, Dh) and z.stride(-1) == 1,
          f"out must be [{B}, {Tq}, {H}, {Dh}] with a contiguous last dimension")
    sink_mass = sink_out if sink_out is not None else torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    check(tuple(sink_mass.shape) == (B, H, Tq) and sink_mass.dtype == torch.float32 and sink_mass.is_contiguous(),
          f"sink_out must be a contiguous fp32 [{B}, {H}, {Tq}]")
    if B * Tq * H == 0:
        return z, sink_mass
    # Each key block's position range, so programs skip blocks no query of theirs can see.
    n_kb = max(1, triton.cdiv(Tk, block_n))
    kp = torch.full((n_kb * block_n,), -1, dtype=torch.int64, device=q.device)
    kp[:Tk] = k_pos
    kp = kp.view(n_kb, block_n)
    kb_max = kp.amax(dim=1)
    kb_min = torch.where(kp >= 0, kp, torch.iinfo(torch.int64).max).amin(dim=1)
    _prefill_kernel[(triton.cdiv(Tq, block_m), B * H)](
        q, k, v, sinks, q_pos, k_pos, kb_min, kb_max, z, sink_mass,
        Tq, Tk, H, window if window is not None else 0, LOG2E / math.sqrt(Dh),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), z.stride(0), z.stride(1), z.stride(2),
        G=H // Hkv, DH=Dh, BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=window is not None,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    return z, sink_mass


def decode_splits(batch: int, kv_heads: int, keys: int, block_n: int = 64, target_programs: int = 256) -> int:
    """How many chunks to split `keys` cached keys into so that about `target_programs` programs run."""
    blocks = max(1, triton.cdiv(keys, block_n))
    return max(1, min(blocks, triton.cdiv(target_programs, max(1, batch * kv_heads)), 64))


def attention_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_pos: torch.Tensor,
    k_pos: torch.Tensor, window: int | None, need_pattern: bool = False, *, block_n: int = 64,
    splits: int | None = None, out: torch.Tensor | None = None, sink_out: torch.Tensor | None = None,
    pattern_out: torch.Tensor | None = None, pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention of one new query per sequence over a KV cache, split over the keys.

    q [B, 1, H, Dh], k/v [B, Tk, Hkv, Dh] (the cache, empty slots at k_pos -1) -> z [B, 1, H, Dh],
    sink_mass [B, H, 1] fp32, pattern [B, H, 1, Tk] fp32 or None. `out`, `sink_out` [B, H] and `pattern_out`
    [B, H, Tk] are optional destination buffers (views are fine as long as the last dimension is contiguous),
    so a CUDA graph can capture into static storage. No host synchronization: safe inside graph capture.
    `pdl`: programmatic dependent launch on Hopper (kernels._common).
    """
    B, Tq, H, Dh, Hkv = _check_inputs(q, k, v, sinks, q_pos, k_pos, window)
    check(Tq == 1, f"attention_decode takes one query per sequence, got {Tq}; use attention_prefill")
    Tk = k.shape[1]
    G = H // Hkv
    splits = splits or decode_splits(B, Hkv, Tk, block_n)
    chunk = triton.cdiv(triton.cdiv(Tk, splits), block_n) * block_n
    splits = max(1, triton.cdiv(Tk, chunk))
    z = out if out is not None else torch.empty(B, 1, H, Dh, device=q.device, dtype=q.dtype)
    check(z.shape[0] == B and z.numel() == B * H * Dh and z.stride(-1) == 1,
          f"out must hold [{B}, 1, {H}, {Dh}] with a contiguous last dimension")
    z3 = z.view(B, H, Dh) if z.dim() == 4 else z
    sm = sink_out if sink_out is not None else torch.empty(B, H, device=q.device, dtype=torch.float32)
    check(tuple(sm.shape) == (B, H) and sm.dtype == torch.float32 and sm.stride(-1) == 1,
          f"sink_out must be fp32 [{B}, {H}] with a contiguous last dimension")
    pattern = None
    if need_pattern:
        pattern = pattern_out if pattern_out is not None else torch.empty(B, H, Tk, device=q.device,
                                                                          dtype=torch.float32)
        check(tuple(pattern.shape) == (B, H, Tk) and pattern.dtype == torch.float32 and pattern.stride(-1) == 1,
              f"pattern_out must be fp32 [{B}, {H}, {Tk}] with a contiguous last dimension")
    part_m = torch.empty(B * H * splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B * H * splits, Dh, device=q.device, dtype=torch.float32)
    pat = pattern if pattern is not None else part_m
    pat_strides = (pattern.stride(0), pattern.stride(1)) if pattern is not None else (0, 0)
    ieee = q.dtype == torch.float32
    _decode_split_kernel[(B * Hkv, splits)](
        q, k, v, q_pos, k_pos, part_m, part_l, part_acc, pat,
        Tk, Hkv, chunk, window if window is not None else 0, LOG2E / math.sqrt(Dh),
        q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *pat_strides,
        G=G, G_P2=max(16, triton.next_power_of_2(G)), DH=Dh, BLOCK_N=block_n, SPLITS=splits,
        HAS_WINDOW=window is not None, WRITE_PATTERN=need_pattern, IEEE=ieee, PDL=use_pdl(pdl, q), num_warps=4,
        launch_pdl=use_pdl(pdl, q),
    )
    _decode_combine_kernel[(B * H,)](
        sinks, part_m, part_l, part_acc, z3, sm, pat,
        H, Tk, z3.stride(0), z3.stride(1), sm.stride(0), *pat_strides,
        DH=Dh, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), BLOCK_N=256,
        WRITE_PATTERN=need_pattern, PDL=use_pdl(pdl, q), num_warps=4, launch_pdl=use_pdl(pdl, q),
    )
    return z, sm.unsqueeze(-1), (pattern.unsqueeze(2) if pattern is not None else None)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_pos: torch.Tensor,
    k_pos: torch.Tensor, window: int | None, need_pattern: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Drop-in for `ossscope.ops.attention` (its torch twin): (z [B, Tq, H, Dh], sink_mass [B, H, Tq], pattern).

    One query per sequence goes to the split decode kernel (which can also return the pattern); more go to the
    flash prefill kernel, and a requested pattern for them comes from the torch twin, since it is O(Tq * Tk)
    memory anyway.
    """
    if q.shape[1] == 1:
        return attention_decode(q, k, v, sinks, q_pos, k_pos, window, need_pattern)
    if need_pattern:
        from ossscope import ops

        return ops.attention(q, k, v, sinks, q_pos, k_pos, window, need_pattern=True)
    z, sink_mass = attention_prefill(q, k, v, sinks, q_pos, k_pos, window)
    return z, sink_mass, None
