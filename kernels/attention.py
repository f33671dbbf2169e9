"""Attention with a learned sink per head and an optional sliding window: a prefill and a decode kernel.

Index legend: B batch, Tq queries, Tk keys, H query heads, Hkv key/value heads, G = H / Hkv, Dh head dim.
Visibility follows positions, as in `ossscope.ops.attention` (the torch twin): key j is visible to query i iff
0 <= k_pos[j] <= q_pos[i] and (no window or q_pos[i] - k_pos[j] < window); k_pos = -1 is an empty cache slot.
Positions are shared by the batch (q_pos [Tq], k_pos [Tk]) or per sequence (q_pos [B, Tq], k_pos [B, Tk]: a ragged
batch, each row at its own length). The kernels read row b's positions at b * row stride, with stride 0 for
shared ones, so both cases run the same code.

The sink is one more logit in each row's softmax with no value vector. The kernels start the online softmax
with the sink as the running maximum (denominator 1, output 0), or merge it in at the end, so the sink sits in
the denominator for free, a row that sees no key ends with z = 0 and sink mass 1, and the sink mass is
exp(sink - max) / denominator.

- prefill: flash-attention style, one program per (query block, query head); it reads kv head h // G in
  place (repeated K/V are never materialized) and skips key blocks that no query of its block can see, using
  each key block's position range, so sliding layers cost O(T * window).
- decode (one query per sequence): the cache is split into chunks; one program per (sequence, kv head, chunk)
  handles all G query heads of that kv head as the rows of one tensor-core tile and leaves its partial softmax
  state; the last program of each (sequence, kv head) to finish (an atomic count) merges the states with the
  sink, so one kernel does it all. With need_pattern, the programs also write the scaled logits and the
  merging program turns them into probabilities. `attention_decode_step` also does the step's RoPE and cache
  write (what `kernels.qkv_rope` does), from the qkv projection: the decoder's attention is one launch a layer.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import await_inputs, check, check_float, check_runnable, check_same_device, dot, use_pdl
from .rope import rotate

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, sink_ptr, qpos_ptr, kpos_ptr, kb_min_ptr, kb_max_ptr, z_ptr, sm_ptr,
    Tq, Tk, H, window, qk_scale,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, szb, szt, szh, sqpb, skpb, skbb,
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
    # Row strides of the positions and of the key blocks' ranges: 0 when the batch shares them.
    qpos = tl.load(qpos_ptr + b * sqpb + offs_m, mask=mmask, other=-1)
    kpos_ptr += b * skpb
    kb_min_ptr += b * skbb
    kb_max_ptr += b * skbb
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
def _attend_chunk(
    q, k_ptr, v_ptr, kpos_ptr, pat_ptr, b, hk, heads, gmask, qpos, start, stop, window, qk_scale,
    skb, skt, skh, svb, svt, svh, spb, sph, new_slot, k_new, v_new,
    G_P2: tl.constexpr, DH: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    WRITE_PATTERN: tl.constexpr, IEEE: tl.constexpr, HAS_NEW: tl.constexpr,
):
    """Online softmax of q [G_P2, DH] (the G query heads of kv head hk; scores scaled by qk_scale) over the
    cache keys start..stop-1 -> (running max m [G_P2], denominator l [G_P2], unnormalized output acc [G_P2, DH]),
    log2 domain, no sink. With HAS_NEW, cache slot new_slot holds k_new / v_new [DH] at position qpos instead of
    what the cache has there (the step's own key, written to the cache by the same kernel)."""
    d = tl.arange(0, DH)
    m_i = tl.full([G_P2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_P2], dtype=tl.float32)
    acc = tl.zeros([G_P2, DH], dtype=tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < stop
        kpos = tl.load(kpos_ptr + offs_n, mask=nmask, other=-1)
        kt = tl.load(k_ptr + b * skb + offs_n[None, :] * skt + hk * skh + d[:, None], mask=nmask[None, :], other=0.0)
        v = tl.load(v_ptr + b * svb + offs_n[:, None] * svt + hk * svh + d[None, :], mask=nmask[:, None], other=0.0)
        if HAS_NEW:
            is_new = offs_n == new_slot
            kpos = tl.where(is_new, qpos, kpos)
            kt = tl.where(is_new[None, :], k_new[:, None], kt)
            v = tl.where(is_new[:, None], v_new[None, :], v)
        visible = (kpos >= 0) & (kpos <= qpos)
        if HAS_WINDOW:
            visible = visible & (qpos - kpos < window)
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
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _finish_heads(
    m_i, l_i, acc, sink_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, count_ptr, z_ptr, sm_ptr, pat_ptr,
    b, hk, split, H, Tk, szb, szh, ssb, spb, sph,
    G: tl.constexpr, G_P2: tl.constexpr, G8: tl.constexpr, DH: tl.constexpr, SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr, MERGE: tl.constexpr, WRITE_PATTERN: tl.constexpr,
):
    """Merge the chunks' softmax states of the G heads of kv head hk with the sink: z, sink mass and (with
    WRITE_PATTERN) the probabilities in place of the scaled logits. With one chunk this program has it all;
    otherwise each program leaves its state and the last of the kv head's programs to arrive (an atomic count,
    reset for the next use) merges them, so no second kernel is needed."""
    d = tl.arange(0, DH)
    g = tl.arange(0, G_P2)
    heads = hk * G + g
    gmask = g < G
    sink = tl.load(sink_ptr + heads, mask=gmask, other=0.0).to(tl.float32) * 1.4426950408889634  # log2 domain
    if SPLITS == 1:
        m_all = tl.maximum(m_i, sink)
        w = tl.exp2(m_i - m_all)  # 0 if no key was visible
        denom = l_i * w + tl.exp2(sink - m_all)
        _store_heads(acc * w[:, None] / denom[:, None], tl.exp2(sink - m_all) / denom, m_all, denom, z_ptr, sm_ptr,
                     pat_ptr, b, heads, gmask, Tk, szb, szh, ssb, spb, sph, DH, WRITE_PATTERN)
    else:
        rows = (b * H + heads) * SPLITS + split  # partial state of (b, head, split)
        tl.store(part_m_ptr + rows, m_i, mask=gmask)
        tl.store(part_l_ptr + rows, l_i, mask=gmask)
        tl.store(part_acc_ptr + rows[:, None] * DH + d[None, :], acc, mask=gmask[:, None])
        tl.debug_barrier()  # every thread's stores before the release below
        arrived = tl.atomic_add(count_ptr + b * (H // G) + hk, 1, sem="acq_rel")
        if arrived == SPLITS - 1:  # the last program of this kv head: the others' states are visible now
            g8 = tl.arange(0, G8)
            heads8 = hk * G + g8
            hmask = g8 < G
            sink8 = tl.load(sink_ptr + heads8, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
            first = (b * H + heads8) * SPLITS  # [G8]
            m_all = sink8
            for s0 in tl.static_range(0, SPLITS_P2, MERGE):
                sp = s0 + tl.arange(0, MERGE)
                mask = hmask[:, None] & (sp < SPLITS)[None, :]
                m = tl.load(part_m_ptr + first[:, None] + sp[None, :], mask=mask, other=float("-inf"),
                            cache_modifier=".cg")
                m_all = tl.maximum(m_all, tl.max(m, axis=1))
            denom = tl.exp2(sink8 - m_all)
            z = tl.zeros([G8, DH], dtype=tl.float32)
            for s0 in tl.static_range(0, SPLITS_P2, MERGE):
                sp = s0 + tl.arange(0, MERGE)
                mask = hmask[:, None] & (sp < SPLITS)[None, :]
                m = tl.load(part_m_ptr + first[:, None] + sp[None, :], mask=mask, other=float("-inf"),
                            cache_modifier=".cg")
                l_part = tl.load(part_l_ptr + first[:, None] + sp[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")
                w = tl.exp2(m - m_all[:, None])  # 0 for chunks that saw no key
                denom += tl.sum(l_part * w, axis=1)
                part = tl.load(part_acc_ptr + (first[:, None, None] + sp[None, :, None]) * DH + d[None, None, :],
                               mask=mask[:, :, None], other=0.0, cache_modifier=".cg")  # [G8, MERGE, DH]
                z += tl.sum(part * w[:, :, None], axis=1)
            _store_heads(z / denom[:, None], tl.exp2(sink8 - m_all) / denom, m_all, denom, z_ptr, sm_ptr, pat_ptr,
                         b, heads8, hmask, Tk, szb, szh, ssb, spb, sph, DH, WRITE_PATTERN)
            tl.store(count_ptr + b * (H // G) + hk, 0)


@triton.jit
def _store_heads(z, sink_mass, m_all, denom, z_ptr, sm_ptr, pat_ptr, b, heads, hmask, Tk, szb, szh, ssb, spb, sph,
                 DH: tl.constexpr, WRITE_PATTERN: tl.constexpr):
    """Write z [R, DH] and the sink mass [R] of heads [R]; with WRITE_PATTERN turn their rows of scaled logits
    (log2 domain) into probabilities."""
    d = tl.arange(0, DH)
    tl.store(z_ptr + b * szb + heads[:, None] * szh + d[None, :], z.to(z_ptr.dtype.element_ty), mask=hmask[:, None])
    tl.store(sm_ptr + b * ssb + heads, sink_mass, mask=hmask)
    if WRITE_PATTERN:
        rows = pat_ptr + b * spb + heads[:, None] * sph
        for n0 in range(0, Tk, 128):
            offs = n0 + tl.arange(0, 128)
            mask = hmask[:, None] & (offs < Tk)[None, :]
            s = tl.load(rows + offs[None, :], mask=mask, other=float("-inf"), cache_modifier=".cg")
            tl.store(rows + offs[None, :], tl.exp2(s - m_all[:, None]) / denom[:, None], mask=mask)


@triton.jit
def _program_heads(Hkv, G: tl.constexpr, G_P2: tl.constexpr):
    """A decode program's sequence b, kv head hk, chunk, and its query heads [G_P2] (mask: the G real ones)."""
    b = tl.program_id(0) // Hkv
    hk = tl.program_id(0) % Hkv
    g = tl.arange(0, G_P2)
    return b, hk, tl.program_id(1), hk * G + g, g < G


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, sink_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, count_ptr, z_ptr,
    sm_ptr, pat_ptr, Tk, H, Hkv, chunk, window, qk_scale,
    sqb, sqh, skb, skt, skh, svb, svt, svh, szb, szh, ssb, spb, sph, sqpb, skpb,
    G: tl.constexpr, G_P2: tl.constexpr, G8: tl.constexpr, DH: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, MERGE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    WRITE_PATTERN: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    await_inputs(PDL)
    b, hk, split, heads, gmask = _program_heads(Hkv, G, G_P2)
    d = tl.arange(0, DH)
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=gmask[:, None], other=0.0)
    qpos = tl.load(qpos_ptr + b * sqpb)  # row strides of the positions: 0 when the batch shares them
    kpos_ptr += b * skpb
    start = split * chunk
    m_i, l_i, acc = _attend_chunk(
        q, k_ptr, v_ptr, kpos_ptr, pat_ptr, b, hk, heads, gmask, qpos, start, tl.minimum(start + chunk, Tk), window,
        qk_scale, skb, skt, skh, svb, svt, svh, spb, sph, -1, q, q, G_P2, DH, BLOCK_N, HAS_WINDOW, WRITE_PATTERN, IEEE,
        False)
    _finish_heads(m_i, l_i, acc, sink_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, count_ptr, z_ptr, sm_ptr, pat_ptr,
                  b, hk, split, H, Tk, szb, szh, ssb, spb, sph, G, G_P2, G8, DH, SPLITS, SPLITS_P2, MERGE,
                  WRITE_PATTERN)


@triton.jit
def _decode_step_kernel(
    qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, kpos_ptr, slot_ptr, pos_ptr, sink_ptr, part_m_ptr, part_l_ptr,
    part_acc_ptr, count_ptr, z_ptr, sm_ptr, pat_ptr, Tk, H, Hkv, chunk, window, qk_scale,
    sqkv, skb, skt, skh, svb, svt, svh, szb, szh, ssb, spb, sph, scb, sslb, sposb, skpb,
    G: tl.constexpr, G_P2: tl.constexpr, G8: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, MERGE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    WRITE_PATTERN: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, KEYS_IN_ORDER: tl.constexpr,
):
    await_inputs(PDL)
    b, hk, split, heads, gmask = _program_heads(Hkv, G, G_P2)
    DH: tl.constexpr = 2 * HALF
    hh = tl.arange(0, HALF)
    # Row b's RoPE tables, slot, position and cache positions; each row stride is 0 when the batch shares it.
    cos = tl.load(cos_ptr + b * scb + hh)
    sin = tl.load(sin_ptr + b * scb + hh)
    kpos_ptr += b * skpb
    row = qkv_ptr + b * sqkv
    # q of the G heads and the new key, rotated and rounded to the model's dtype as `qkv_rope` leaves them
    q1 = tl.load(row + heads[:, None] * DH + hh[None, :], mask=gmask[:, None], other=0.0)
    q2 = tl.load(row + heads[:, None] * DH + HALF + hh[None, :], mask=gmask[:, None], other=0.0)
    r1, r2 = rotate(q1.to(tl.float32), q2.to(tl.float32), cos[None, :], sin[None, :])
    q = tl.reshape(tl.permute(tl.join(r1.to(q1.dtype), r2.to(q1.dtype)), (0, 2, 1)), [G_P2, DH])
    k1 = tl.load(row + (H + hk) * DH + hh)
    k2 = tl.load(row + (H + hk) * DH + HALF + hh)
    kr1, kr2 = rotate(k1.to(tl.float32), k2.to(tl.float32), cos, sin)
    kr1, kr2 = kr1.to(k_ptr.dtype.element_ty), kr2.to(k_ptr.dtype.element_ty)
    k_new = tl.reshape(tl.permute(tl.join(kr1, kr2), (1, 0)), [DH])
    v_new = tl.load(row + (H + Hkv + hk) * DH + tl.arange(0, DH)).to(v_ptr.dtype.element_ty)
    qpos = tl.load(pos_ptr + b * sposb)
    slot = tl.load(slot_ptr + b * sslb)
    start = split * chunk
    stop = tl.minimum(start + chunk, Tk)
    # The program whose chunk holds the new slot writes it to the cache; a row at position -1 takes no token this
    # step (a stopped sequence in a batch: `KVCache.only`) and writes nothing (its query sees no key either).
    if (slot >= start) & (slot < stop) & (qpos >= 0):
        tl.store(k_ptr + b * skb + slot * skt + hk * skh + hh, kr1)
        tl.store(k_ptr + b * skb + slot * skt + hk * skh + HALF + hh, kr2)
        tl.store(v_ptr + b * svb + slot * svt + hk * svh + tl.arange(0, DH), v_new)
        if (hk == 0) & ((b == 0) | (skpb != 0)):  # one writer per k_pos row: the batch's, or each sequence's
            tl.store(kpos_ptr + slot, qpos)
    # The slots after the new one are empty: a cache that is larger than its use costs nothing, and with slots
    # per sequence each row stops at its own, so a short row of a ragged batch reads only its keys.
    if KEYS_IN_ORDER:
        stop = tl.minimum(stop, slot + 1)
    m_i, l_i, acc = _attend_chunk(
        q, k_ptr, v_ptr, kpos_ptr, pat_ptr, b, hk, heads, gmask, qpos, start, stop, window, qk_scale,
        skb, skt, skh, svb, svt, svh, spb, sph, slot, k_new, v_new, G_P2, DH, BLOCK_N, HAS_WINDOW, WRITE_PATTERN,
        IEEE, True)
    _finish_heads(m_i, l_i, acc, sink_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, count_ptr, z_ptr, sm_ptr, pat_ptr,
                  b, hk, split, H, Tk, szb, szh, ssb, spb, sph, G, G_P2, G8, DH, SPLITS, SPLITS_P2, MERGE,
                  WRITE_PATTERN)


def _positions(name: str, pos: torch.Tensor, B: int, T: int) -> int:
    """Check integer positions [T] (shared by the batch) or [B, T] (one row per sequence), contiguous along the
    positions -> the row stride the kernels take: 0 when shared, so the shared case runs the same code."""
    check(not pos.is_floating_point() and not pos.is_complex() and tuple(pos.shape) in ((T,), (B, T)),
          f"{name} must be an integer tensor [{T}] or [{B}, {T}], got {pos.dtype} {tuple(pos.shape)}")
    check(pos.stride(-1) == 1 or T <= 1, f"{name} must be contiguous along the positions")
    return pos.stride(0) if pos.dim() == 2 else 0


def _slot_stride(name: str, t: torch.Tensor, B: int) -> int:
    """A decode step's integer slot or position: [1] (shared by the batch) or [B] (per sequence) -> its row
    stride (0 when shared)."""
    check(not t.is_floating_point() and not t.is_complex() and tuple(t.shape) in ((1,), (B,)),
          f"{name} must be an integer tensor [1] or [{B}], got {t.dtype} {tuple(t.shape)}")
    return t.stride(0) if B > 1 and t.shape[0] == B else 0


def _check_inputs(q, k, v, sinks, q_pos, k_pos, window):
    """Check the attention inputs -> (B, Tq, H, Dh, Hkv, q_pos row stride, k_pos row stride)."""
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
    sqpb = _positions("q_pos", q_pos, B, Tq)
    skpb = _positions("k_pos", k_pos, B, k.shape[1])
    check(window is None or window >= 1, f"window must be None or positive, got {window}")
    check_runnable(q)
    check_same_device(q=q, k=k, v=v, sinks=sinks, q_pos=q_pos, k_pos=k_pos)
    return B, Tq, H, Dh, Hkv, sqpb, skpb


def attention_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_pos: torch.Tensor,
    k_pos: torch.Tensor, window: int | None, *, block_m: int = 128, block_n: int = 64,
    out: torch.Tensor | None = None, sink_out: torch.Tensor | None = None, num_warps: int = 4, num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention with sinks: q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh] -> z [B, Tq, H, Dh], sink_mass [B, H, Tq].

    q_pos [Tq] or [B, Tq], k_pos [Tk] or [B, Tk] (integer; -1 an empty slot), shared by the batch or per
    sequence. Positions are arbitrary (a ring-buffer cache works). Each program visits only the span of key blocks its
    queries can see (the causal or sliding-window band when positions are sorted). Tile defaults are from a
    sweep on an H100 (scripts/moe_sweep.py).
    `out` [B, Tq, H, Dh] (last dimension contiguous) and `sink_out` (contiguous fp32 [B, H, Tq]) are optional
    destinations.
    """
    B, Tq, H, Dh, Hkv, sqpb, skpb = _check_inputs(q, k, v, sinks, q_pos, k_pos, window)
    Tk = k.shape[1]
    z = out if out is not None else torch.empty(B, Tq, H, Dh, device=q.device, dtype=q.dtype)
    check(tuple(z.shape) == (B, Tq, H, Dh) and z.stride(-1) == 1,
          f"out must be [{B}, {Tq}, {H}, {Dh}] with a contiguous last dimension")
    sink_mass = sink_out if sink_out is not None else torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    check(tuple(sink_mass.shape) == (B, H, Tq) and sink_mass.dtype == torch.float32 and sink_mass.is_contiguous(),
          f"sink_out must be a contiguous fp32 [{B}, {H}, {Tq}]")
    if B * Tq * H == 0:
        return z, sink_mass
    # Each key block's position range, so programs skip blocks no query of theirs can see: [1, n_kb] for
    # shared k_pos (row stride 0), [B, n_kb] for k_pos per sequence.
    n_kb = max(1, triton.cdiv(Tk, block_n))
    kp = torch.full((B if skpb else 1, n_kb * block_n), -1, dtype=torch.int64, device=q.device)
    kp[:, :Tk] = k_pos
    kp = kp.view(-1, n_kb, block_n)
    kb_max = kp.amax(dim=2)
    kb_min = torch.where(kp >= 0, kp, torch.iinfo(torch.int64).max).amin(dim=2)
    _prefill_kernel[(triton.cdiv(Tq, block_m), B * H)](
        q, k, v, sinks, q_pos, k_pos, kb_min, kb_max, z, sink_mass,
        Tq, Tk, H, window if window is not None else 0, LOG2E / math.sqrt(Dh),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), z.stride(0), z.stride(1), z.stride(2),
        sqpb, skpb, kb_max.stride(0) if skpb else 0,
        G=H // Hkv, DH=Dh, BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=window is not None,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    return z, sink_mass


# About this many decode programs (sequences x kv heads x chunks of the cache) run; from a sweep on an H100
# (scripts/decode_ab.py --sweep).
DECODE_PROGRAMS = 256


def decode_splits(batch: int, kv_heads: int, keys: int, block_n: int = 64, target_programs: int | None = None) -> int:
    """How many chunks to split `keys` cached keys into so that about `target_programs` (DECODE_PROGRAMS)
    programs run."""
    blocks = max(1, triton.cdiv(keys, block_n))
    target = target_programs or DECODE_PROGRAMS
    return max(1, min(blocks, triton.cdiv(target, max(1, batch * kv_heads)), 64))


def _decode_outputs(B: int, H: int, Dh: int, Hkv: int, Tk: int, splits: int, need_pattern: bool, dev, dtype,
                    out, sink_out, pattern_out, counters):
    """Check or make attention_decode(_step)'s outputs and scratch: z [B, H, Dh] view, sink mass, pattern, the
    chunks' partial states and the arrival counts."""
    z = out if out is not None else torch.empty(B, 1, H, Dh, device=dev, dtype=dtype)
    check(z.shape[0] == B and z.numel() == B * H * Dh and z.stride(-1) == 1,
          f"out must hold [{B}, 1, {H}, {Dh}] with a contiguous last dimension")
    z3 = z.view(B, H, Dh) if z.dim() != 3 else z
    sm = sink_out if sink_out is not None else torch.empty(B, H, device=dev, dtype=torch.float32)
    check(tuple(sm.shape) == (B, H) and sm.dtype == torch.float32 and sm.stride(-1) == 1,
          f"sink_out must be fp32 [{B}, {H}] with a contiguous last dimension")
    pattern = None
    if need_pattern:
        pattern = pattern_out if pattern_out is not None else torch.empty(B, H, Tk, device=dev, dtype=torch.float32)
        check(tuple(pattern.shape) == (B, H, Tk) and pattern.dtype == torch.float32 and pattern.stride(-1) == 1,
              f"pattern_out must be fp32 [{B}, {H}, {Tk}] with a contiguous last dimension")
    if counters is None:
        counters = torch.zeros(B * Hkv, device=dev, dtype=torch.int32)
    check(counters.dtype == torch.int32 and counters.is_contiguous() and counters.numel() >= B * Hkv,
          f"counters must be contiguous int32 with at least {B * Hkv} zeros (from decode_counters)")
    part_m = torch.empty(B * H * splits, device=dev, dtype=torch.float32)
    part_acc = torch.empty(B * H * splits, Dh, device=dev, dtype=torch.float32)
    return z, z3, sm, pattern, (part_m, torch.empty_like(part_m), part_acc, counters)


def decode_counters(batch: int, kv_heads: int, device) -> torch.Tensor:
    """Zeroed arrival counts for `attention_decode(_step)(counters=...)`: the kernels leave them zeroed, so a
    CUDA-graph caller keeps one buffer (for every layer) instead of zeroing a new one each call."""
    return torch.zeros(batch * kv_heads, dtype=torch.int32, device=device)


def _split_plan(B: int, Hkv: int, Tk: int, block_n: int, splits: int | None) -> tuple[int, int, dict]:
    splits = splits or decode_splits(B, Hkv, Tk, block_n)
    chunk = triton.cdiv(triton.cdiv(Tk, splits), block_n) * block_n
    splits = max(1, triton.cdiv(Tk, chunk))
    splits_p2 = triton.next_power_of_2(splits)
    return splits, chunk, dict(SPLITS=splits, SPLITS_P2=splits_p2, MERGE=min(splits_p2, 16))


def attention_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_pos: torch.Tensor,
    k_pos: torch.Tensor, window: int | None, need_pattern: bool = False, *, block_n: int = 64,
    splits: int | None = None, out: torch.Tensor | None = None, sink_out: torch.Tensor | None = None,
    pattern_out: torch.Tensor | None = None, counters: torch.Tensor | None = None, pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention of one new query per sequence over a KV cache, split over the keys.

    q [B, 1, H, Dh], k/v [B, Tk, Hkv, Dh] (the cache), q_pos [1] or [B, 1], k_pos [Tk] or [B, Tk] (shared by
    the batch or per sequence; empty slots at -1) -> z [B, 1, H, Dh],
    sink_mass [B, H, 1] fp32, pattern [B, H, 1, Tk] fp32 or None. `out`, `sink_out` [B, H] and `pattern_out`
    [B, H, Tk] are optional destination buffers (views are fine as long as the last dimension is contiguous),
    so a CUDA graph can capture into static storage; `counters` (`decode_counters`) saves zeroing a new
    buffer each call. No host synchronization: safe inside graph capture.
    `pdl`: programmatic dependent launch on Hopper (kernels._common).
    """
    B, Tq, H, Dh, Hkv, sqpb, skpb = _check_inputs(q, k, v, sinks, q_pos, k_pos, window)
    check(Tq == 1, f"attention_decode takes one query per sequence, got {Tq}; use attention_prefill")
    Tk = k.shape[1]
    G = H // Hkv
    splits, chunk, split_flags = _split_plan(B, Hkv, Tk, block_n, splits)
    z, z3, sm, pattern, scratch = _decode_outputs(B, H, Dh, Hkv, Tk, splits, need_pattern, q.device, q.dtype, out,
                                                  sink_out, pattern_out, counters)
    pat = pattern if pattern is not None else sm
    pat_strides = (pattern.stride(0), pattern.stride(1)) if pattern is not None else (0, 0)
    _decode_split_kernel[(B * Hkv, splits)](
        q, k, v, q_pos, k_pos, sinks, *scratch, z3, sm, pat, Tk, H, Hkv, chunk, window if window is not None else 0,
        LOG2E / math.sqrt(Dh), q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), z3.stride(0), z3.stride(1), sm.stride(0), *pat_strides, sqpb, skpb,
        G=G, G_P2=max(16, triton.next_power_of_2(G)), G8=triton.next_power_of_2(G), DH=Dh, BLOCK_N=block_n,
        HAS_WINDOW=window is not None, WRITE_PATTERN=need_pattern, IEEE=q.dtype == torch.float32,
        PDL=use_pdl(pdl, q), num_warps=4, launch_pdl=use_pdl(pdl, q), **split_flags,
    )
    return z, sm.unsqueeze(-1), (pattern.unsqueeze(2) if pattern is not None else None)


def attention_decode_step(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_pos: torch.Tensor, slot: torch.Tensor, position: torch.Tensor, sinks: torch.Tensor, window: int | None,
    num_heads: int, need_pattern: bool = False, *, block_n: int = 64, splits: int | None = None,
    out: torch.Tensor | None = None, sink_out: torch.Tensor | None = None, pattern_out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None, pdl: bool = False, keys_in_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A decode step's whole attention in one kernel: `qkv_rope` into the cache, then `attention_decode`.

    qkv [B, (H + 2 Hkv) Dh] (the fused projection of one token per sequence), cos/sin [1, Dh/2] or [B, Dh/2]
    fp32 (its position's RoPE tables), the cache k_cache/v_cache [B, S, Hkv, Dh] with positions k_pos [S] or
    [B, S], slot [1] or [B] (integer, the slot the new key and value go to) and position [1] or [B] (integer)
    -> z [B, 1, H, Dh], sink_mass [B, H, 1], pattern [B, H, 1, S] or None, as `attention_decode` returns them.
    The [1]-shaped ones are shared by the batch; [B]-shaped ones are per sequence (a ragged batch), and then
    k_pos must be [B, S]: row b's key and value go to slot[b] and k_pos[b, slot[b]] = position[b]. With shared
    k_pos, k_pos[slot] = position. The cache is written as `qkv_rope(..., k_dst=, v_dst=, slots=, positions=,
    k_pos_dst=)` writes it; q is rotated and rounded to the model's dtype the same way, so the result equals
    that pair's (the twin, with `ossscope.ops.apply_rope` and `ossscope.ops.attention` beneath it). The
    keyword arguments are `attention_decode`'s; `keys_in_order` (a full-attention cache filled in slot order,
    nothing visible after the new slot) stops each row's reading at its own slot + 1, so with slots per sequence
    a short row costs only its own keys.
    """
    check_float("qkv", qkv)
    check_runnable(qkv)
    check(qkv.dim() == 2 and qkv.stride(-1) == 1, f"qkv must be [B, width] with contiguous rows, got "
          f"{tuple(qkv.shape)}")
    check(k_cache.dim() == 4, f"k_cache must be [B, S, Hkv, Dh], got {tuple(k_cache.shape)}")
    B, S, Hkv, Dh = k_cache.shape
    H = num_heads
    check(qkv.shape == (B, (H + 2 * Hkv) * Dh), f"qkv must be [{B}, {(H + 2 * Hkv) * Dh}] for {H} heads, "
          f"{Hkv} kv heads of {Dh}, got {tuple(qkv.shape)}")
    # Row strides (0: shared by the batch) of the RoPE tables, slot, position and k_pos.
    half = Dh // 2
    check(cos.dim() == 2 and cos.shape[0] in (1, B) and cos.shape[1] == half and cos.stride(-1) == 1
          and sin.shape == cos.shape and sin.stride() == cos.stride(),
          f"cos and sin must be [1, {half}] or [{B}, {half}] alike with contiguous rows, got {tuple(cos.shape)} "
          f"and {tuple(sin.shape)}")
    scb = cos.stride(0) if B > 1 and cos.shape[0] == B else 0
    sslb = _slot_stride("slot", slot, B)
    _slot_stride("position", position, B)
    q_pos = position.view(B, 1) if B > 1 and position.shape[0] == B else position  # the attention's: [1] or [B, 1]
    *_, sposb, skpb = _check_inputs(qkv[:, : H * Dh].view(B, 1, H, Dh), k_cache, v_cache, sinks, q_pos, k_pos, window)
    check(not (sslb or sposb) or skpb, f"slot or position per sequence writes a position per sequence: k_pos "
          f"must be [{B}, {S}] with a row per sequence, got {tuple(k_pos.shape)} with strides {k_pos.stride()}")
    check(qkv.dtype == k_cache.dtype, f"qkv and the cache dtypes differ: {qkv.dtype}, {k_cache.dtype}")
    check_same_device(qkv=qkv, cos=cos, sin=sin, slot=slot)
    G = H // Hkv
    splits, chunk, split_flags = _split_plan(B, Hkv, S, block_n, splits)
    z, z3, sm, pattern, scratch = _decode_outputs(B, H, Dh, Hkv, S, splits, need_pattern, qkv.device, qkv.dtype,
                                                  out, sink_out, pattern_out, counters)
    pat = pattern if pattern is not None else sm
    pat_strides = (pattern.stride(0), pattern.stride(1)) if pattern is not None else (0, 0)
    _decode_step_kernel[(B * Hkv, splits)](
        qkv, cos, sin, k_cache, v_cache, k_pos, slot, position, sinks, *scratch, z3, sm, pat, S, H, Hkv, chunk,
        window if window is not None else 0, LOG2E / math.sqrt(Dh), qkv.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), z3.stride(0),
        z3.stride(1), sm.stride(0), *pat_strides, scb, sslb, sposb, skpb,
        G=G, G_P2=max(16, triton.next_power_of_2(G)), G8=triton.next_power_of_2(G), HALF=Dh // 2, BLOCK_N=block_n,
        HAS_WINDOW=window is not None, WRITE_PATTERN=need_pattern, IEEE=qkv.dtype == torch.float32,
        PDL=use_pdl(pdl, qkv), num_warps=4, launch_pdl=use_pdl(pdl, qkv),
        KEYS_IN_ORDER=keys_in_order and not need_pattern, **split_flags,
    )
    return z, sm.unsqueeze(-1), (pattern.unsqueeze(2) if pattern is not None else None)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_pos: torch.Tensor,
    k_pos: torch.Tensor, window: int | None, need_pattern: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Drop-in for `ossscope.ops.attention` (its torch twin): (z [B, Tq, H, Dh], sink_mass [B, H, Tq], pattern).

    q_pos [Tq] or [B, Tq] and k_pos [Tk] or [B, Tk], as the twin takes them (shared by the batch or per sequence).

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
