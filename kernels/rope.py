"""Split the fused QKV projection into heads, rotate q and k (RoPE), and store k and v, in one kernel.

Torch twin: `ossscope.ops.apply_rope` on q and k as `ossscope.model.Attention` slices them. With destination
buffers and a slot per token, k and v go straight into a KV cache (and the slot's position is recorded), which
is what a CUDA-graph decode step needs: no host-side indexing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import await_inputs, check, check_float, check_runnable, use_pdl


@triton.jit
def rotate(first, second, cos, sin):
    """RoPE on a head's two halves (fp32): (first * cos - second * sin, second * cos + first * sin).

    The fused multiply-adds are spelled out so every kernel rounds alike (left to the compiler, contraction can
    differ between kernels, and one bf16 rounding in a few thousand with it)."""
    return tl.fma(first, cos, -(second * sin)), tl.fma(second, cos, first * sin)


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
        r1, r2 = rotate(first, second, cos, sin)
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
