"""Split the fused QKV projection into heads, rotate q and k (RoPE), and store k and v, in one kernel.

Torch twin: `ossscope.ops.apply_rope` on q and k as `ossscope.model.Attention` slices them. With destination
buffers and a slot per token, k and v go straight into a KV cache (and the slot's position is recorded), which
is what a CUDA-graph decode step needs: no host-side indexing.

`qkv_project_rope` does the same for one decode token with the projection itself in the kernel (a GEMV whose
programs each own rows d and d + Dh/2 of a head, so the rotation happens in the epilogue): one launch instead
of two. Its twin is `kernels.linear` followed by `qkv_rope`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import await_inputs, check, check_float, check_runnable, use_pdl
from .linear import GEMV_MAX_BATCH, first_tile, gemv_rows, linear


@triton.jit
def _qkv_rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, kpos_ptr,
    T, H, Hkv, stride_qkv_b, stride_qkv_t, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    HALF: tl.constexpr, HAS_SLOTS: tl.constexpr, PDL: tl.constexpr,
):
    await_inputs(PDL)
    pid_bt = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1 query heads, then Hkv key heads, then Hkv value heads
    b = pid_bt // T
    t = pid_bt % T
    d = tl.arange(0, HALF)
    src = qkv_ptr + b * stride_qkv_b + t * stride_qkv_t + head * 2 * HALF
    first = tl.load(src + d).to(tl.float32)
    second = tl.load(src + HALF + d).to(tl.float32)
    row = t
    if HAS_SLOTS:
        row = tl.load(slot_ptr + t)
    if head < H + Hkv:  # q or k: rotate the first half against the second
        cos = tl.load(cos_ptr + t * HALF + d)
        sin = tl.load(sin_ptr + t * HALF + d)
        r1 = first * cos - second * sin
        r2 = second * cos + first * sin
        if head < H:
            dst = q_ptr + b * sqb + t * sqt + head * sqh
        else:
            dst = k_ptr + b * skb + row * skt + (head - H) * skh
            if HAS_SLOTS:  # one writer per slot position: batch row 0
                tl.store(kpos_ptr + row, tl.load(pos_ptr + t), mask=b == 0)
        tl.store(dst + d, r1.to(dst.dtype.element_ty))
        tl.store(dst + HALF + d, r2.to(dst.dtype.element_ty))
    else:
        dst = v_ptr + b * svb + row * svt + (head - H - Hkv) * svh
        tl.store(dst + d, first.to(dst.dtype.element_ty))
        tl.store(dst + HALF + d, second.to(dst.dtype.element_ty))


def qkv_rope(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
    *, k_dst: torch.Tensor | None = None, v_dst: torch.Tensor | None = None, slots: torch.Tensor | None = None,
    positions: torch.Tensor | None = None, k_pos_dst: torch.Tensor | None = None, q_out: torch.Tensor | None = None,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, (H + 2 Hkv) Dh], cos/sin [T, Dh/2] fp32 -> q [B, T, H, Dh], k, v [B, T, Hkv, Dh] (k, q rotated).

    With k_dst/v_dst [B, S, Hkv, Dh] (a cache), slots [T] (long, on the device) and positions [T] and
    k_pos_dst [S]: token t's key and value go to slot slots[t] and k_pos_dst[slots[t]] = positions[t]; then
    the returned k and v are the whole destination buffers. `pdl`: programmatic dependent launch on Hopper
    (kernels._common).
    """
    check_float("qkv", qkv)
    check_runnable(qkv)
    check(qkv.dim() == 3 and qkv.stride(-1) == 1, f"qkv must be [B, T, width] with contiguous rows, got "
          f"{tuple(qkv.shape)}")
    B, T, width = qkv.shape
    H, Hkv = num_heads, num_kv_heads
    check(width % (H + 2 * Hkv) == 0, f"qkv width {width} is not (H + 2 Hkv) * Dh for H={H}, Hkv={Hkv}")
    Dh = width // (H + 2 * Hkv)
    check(Dh % 2 == 0 and (Dh // 2) & (Dh // 2 - 1) == 0, f"head dim must be twice a power of two, got {Dh}")
    half = Dh // 2
    check(tuple(cos.shape) == (T, half) and tuple(sin.shape) == (T, half) and cos.is_contiguous()
          and sin.is_contiguous(), f"cos and sin must be contiguous [{T}, {half}]")
    q = q_out if q_out is not None else torch.empty(B, T, H, Dh, device=qkv.device, dtype=qkv.dtype)
    check(tuple(q.shape) == (B, T, H, Dh) and q.stride(-1) == 1, f"q_out must be [{B}, {T}, {H}, {Dh}]")
    has_slots = k_dst is not None
    if has_slots:
        check(v_dst is not None and slots is not None and positions is not None and k_pos_dst is not None,
              "writing into a cache needs k_dst, v_dst, slots, positions and k_pos_dst together")
        check(k_dst.shape == v_dst.shape and k_dst.shape[0] == B and k_dst.shape[2:] == (Hkv, Dh)
              and k_dst.stride(-1) == 1 and v_dst.stride(-1) == 1,
              f"k_dst/v_dst must be [{B}, S, {Hkv}, {Dh}] with a contiguous last dimension")
        check(tuple(slots.shape) == (T,) and tuple(positions.shape) == (T,), f"slots and positions must be [{T}]")
        k, v = k_dst, v_dst
    else:
        k = torch.empty(B, T, Hkv, Dh, device=qkv.device, dtype=qkv.dtype)
        v = torch.empty_like(k)
    _qkv_rope_kernel[(B * T, H + 2 * Hkv)](
        qkv, cos, sin, q, k, v, slots if has_slots else cos, positions if has_slots else cos,
        k_pos_dst if has_slots else cos,
        T, H, Hkv, qkv.stride(0), qkv.stride(1), q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HALF=half, HAS_SLOTS=has_slots, PDL=use_pdl(pdl, qkv), num_warps=1, launch_pdl=use_pdl(pdl, qkv),
    )
    return q, k, v


@triton.jit
def _qkv_project_rope_kernel(
    x_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, kpos_ptr,
    K, H, Hkv, stride_xb, stride_wn, sqb, sqh, skb, skt, skh, svb, svt, svh,
    BATCH: tl.constexpr, PAIRS: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    per_head = HALF // PAIRS
    head = tl.program_id(0) // per_head  # 0..H-1 query heads, then Hkv key heads, then Hkv value heads
    j0 = (tl.program_id(0) % per_head) * PAIRS
    r = tl.arange(0, 2 * PAIRS)
    d = j0 + r % PAIRS + (r // PAIRS) * HALF  # features j0.. of the head's first half, then the same of its second
    rows = head * 2 * HALF + d
    rmask = rows >= 0
    w_first = first_tile(w_ptr, rows, rmask, K, stride_wn, BLOCK_K)
    await_inputs(PDL)
    bias = tl.load(b_ptr + rows).to(tl.float32)
    j = j0 + tl.arange(0, PAIRS)
    cos = tl.load(cos_ptr + j)
    sin = tl.load(sin_ptr + j)
    slot = tl.load(slot_ptr)
    for b in tl.static_range(BATCH):
        y = gemv_rows(x_ptr + b * stride_xb, w_ptr, rows, rmask, K, stride_wn, w_first, BLOCK_K) + bias
        y = y.to(q_ptr.dtype.element_ty).to(tl.float32)  # the projection's output, as `linear` rounds it
        first, second = tl.split(tl.permute(tl.reshape(y, [2, PAIRS]), [1, 0]))  # [PAIRS] each
        if head < H + Hkv:  # q or k: rotate the first half against the second
            r1 = first * cos - second * sin
            r2 = second * cos + first * sin
            if head < H:  # noqa: SIM108 (a runtime branch: Triton has no ternary on tensors)
                dst = q_ptr + b * sqb + head * sqh
            else:
                dst = k_ptr + b * skb + slot * skt + (head - H) * skh
        else:
            r1, r2 = first, second
            dst = v_ptr + b * svb + slot * svt + (head - H - Hkv) * svh
        tl.store(dst + j, r1.to(dst.dtype.element_ty))
        tl.store(dst + HALF + j, r2.to(dst.dtype.element_ty))
    if tl.program_id(0) == H * per_head:  # one writer: the slot now holds this position
        tl.store(kpos_ptr + slot, tl.load(pos_ptr))


def qkv_project_rope(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    num_heads: int, num_kv_heads: int, *, k_dst: torch.Tensor, v_dst: torch.Tensor, slot: torch.Tensor,
    position: torch.Tensor, k_pos_dst: torch.Tensor, q_out: torch.Tensor | None = None, pairs: int = 2,
    block_k: int = 512, pdl: bool = False,
) -> torch.Tensor:
    """One decode token per sequence: x [B, D] -> q [B, 1, H, Dh], with k and v written into the cache.

    The same as `qkv_rope(linear(x, weight, bias).view(B, 1, -1), cos, sin, ...)` with `slots=slot`,
    `positions=position`: weight [(H + 2 Hkv) Dh, D], bias [(H + 2 Hkv) Dh], cos/sin [1, Dh/2] fp32, k_dst/v_dst
    [B, S, Hkv, Dh], slot and position [1] (long, on the device), k_pos_dst [S]. Each program computes `pairs`
    feature pairs (d, d + Dh/2) of one head from `block_k`-wide weight tiles. Batches above
    kernels.linear.GEMV_MAX_BATCH take those two kernels instead. `pdl`: programmatic dependent launch on Hopper
    (kernels._common); the first weight tile is read before the wait.
    """
    check_float("x", x)
    check_runnable(x)
    check(x.dim() == 2 and x.stride(-1) == 1, f"x must be [B, D] with contiguous rows, got {tuple(x.shape)}")
    B, D = x.shape
    H, Hkv = num_heads, num_kv_heads
    check(weight.dim() == 2 and weight.shape[1] == D and weight.stride(1) == 1
          and weight.shape[0] % (H + 2 * Hkv) == 0,
          f"weight must be [(H + 2 Hkv) * Dh, {D}] with contiguous rows, got {tuple(weight.shape)}")
    N = weight.shape[0]
    Dh = N // (H + 2 * Hkv)
    half = Dh // 2
    check(Dh % 2 == 0 and half & (half - 1) == 0, f"head dim must be twice a power of two, got {Dh}")
    check(pairs >= 1 and pairs & (pairs - 1) == 0 and half % pairs == 0,
          f"pairs must be a power of two dividing {half}, got {pairs}")
    check(tuple(bias.shape) == (N,), f"bias must be [{N}], got {tuple(bias.shape)}")
    check(tuple(cos.shape) == (1, half) and tuple(sin.shape) == (1, half) and cos.is_contiguous()
          and sin.is_contiguous(), f"cos and sin must be contiguous [1, {half}]")
    check(k_dst.shape == v_dst.shape and k_dst.shape[0] == B and k_dst.shape[2:] == (Hkv, Dh)
          and k_dst.stride(-1) == 1 and v_dst.stride(-1) == 1,
          f"k_dst/v_dst must be [{B}, S, {Hkv}, {Dh}] with a contiguous last dimension")
    check(slot.numel() == 1 and position.numel() == 1, "slot and position must each hold one index")
    q = q_out if q_out is not None else torch.empty(B, 1, H, Dh, device=x.device, dtype=x.dtype)
    check(tuple(q.shape) == (B, 1, H, Dh) and q.stride(-1) == 1, f"q_out must be [{B}, 1, {H}, {Dh}]")
    if B > GEMV_MAX_BATCH:
        qkv = linear(x, weight, bias)
        qkv_rope(qkv.view(B, 1, N), cos, sin, H, Hkv, k_dst=k_dst, v_dst=v_dst, slots=slot.reshape(1),
                 positions=position.reshape(1), k_pos_dst=k_pos_dst, q_out=q)
        return q
    if B:
        _qkv_project_rope_kernel[(N // (2 * pairs),)](
            x, weight, bias, cos, sin, q, k_dst, v_dst, slot, position, k_pos_dst,
            D, H, Hkv, x.stride(0), weight.stride(0), q.stride(0), q.stride(2),
            k_dst.stride(0), k_dst.stride(1), k_dst.stride(2), v_dst.stride(0), v_dst.stride(1), v_dst.stride(2),
            BATCH=B, PAIRS=pairs, HALF=half, BLOCK_K=block_k, PDL=use_pdl(pdl, x), num_warps=1,
            launch_pdl=use_pdl(pdl, x),
        )
    return q
