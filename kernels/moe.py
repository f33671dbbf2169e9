"""Mixture-of-experts kernels that read packed MXFP4 expert weights directly.

Index legend: N tokens, D hidden, I expert width, E experts, k experts per token, S = N * k (token, choice)
slots. Weights stay as stored: mlp1 [E, 2I, D/32, 16] (rows interleave gate and linear units), mlp2
[E, D, I/32, 16]; each byte holds element 2i (low nibble) and 2i+1 (high nibble), so a kernel multiplies low
nibbles by the even input features and high nibbles by the odd ones and never interleaves anything.

Two shapes of work, two pairs of kernels:
- decode (few slots, pure bandwidth): one program per (slot, tile of output units) streams the expert's rows
  and reduces on CUDA cores; the down projection loops over the k choices in one program, so the routing
  weights and the sum over k happen in registers and the output is written once.
- prefill (many slots): slots are grouped by expert and padded to BLOCK_M rows; each program multiplies a
  BLOCK_M x K token tile by a dequantized weight tile on the tensor cores. Gate/up applies the clamped SwiGLU
  in its epilogue; down adds the bias, multiplies by the routing weight and sums over k with fp32 atomics.
Torch twin: `ossscope.ops.moe_experts`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_float, check_mxfp4, check_runnable, check_same_device, dot, e2m1_to_f32, e8m0_factor

# Decode uses the streaming kernels up to this many slots (token, choice) pairs; above, the grouped GEMMs.
GEMV_MAX_SLOTS = 16


# -- decode: streaming kernels -------------------------------------------------------------------------------


@triton.jit
def _row_dot(w_row_ptr, s_row_ptr, xe, xo, grp, gmask, umask, rows, stride_wr, stride_sr):
    """Partial dot products of MXFP4 rows with one step of input: [BLOCK_R, GROUPS] fp32 (scaled).

    rows [BLOCK_R] weight rows, grp [GROUPS] 32-element groups, xe/xo [GROUPS, 16] even/odd input features.
    """
    byte = grp[:, None] * 16 + tl.arange(0, 16)[None, :]  # [GROUPS, 16] byte offsets in a row
    wmask = umask[:, None, None] & gmask[None, :, None]
    w = tl.load(w_row_ptr + rows[:, None, None] * stride_wr + byte[None, :, :], mask=wmask, other=0).to(tl.int32)
    s = tl.load(s_row_ptr + rows[:, None] * stride_sr + grp[None, :], mask=umask[:, None] & gmask[None, :], other=0)
    part = tl.sum(e2m1_to_f32(w & 15) * xe[None, :, :] + e2m1_to_f32(w >> 4) * xo[None, :, :], axis=2)
    return part * e8m0_factor(s)


@triton.jit
def _gate_up_gemv_kernel(
    x_ptr, idx_ptr, w_ptr, s_ptr, b_ptr, act_ptr,
    D, I, stride_xn, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_an,
    limit, alpha,
    K_ACT: tl.constexpr, BLOCK_I: tl.constexpr, GROUPS: tl.constexpr,
):
    slot = tl.program_id(0)
    units = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # output units of the SwiGLU, [BLOCK_I]
    umask = units < I
    token = slot // K_ACT
    expert = tl.load(idx_ptr + slot).to(tl.int64)
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    n_groups = D // 32
    acc_g = tl.zeros([BLOCK_I, GROUPS], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK_I, GROUPS], dtype=tl.float32)
    for g0 in range(0, n_groups, GROUPS):
        grp = g0 + tl.arange(0, GROUPS)
        gmask = grp < n_groups
        feat = grp[:, None] * 32 + 2 * tl.arange(0, 16)[None, :]  # even input features, [GROUPS, 16]
        x_row = x_ptr + token * stride_xn
        xe = tl.load(x_row + feat, mask=gmask[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_row + feat + 1, mask=gmask[:, None], other=0.0).to(tl.float32)
        acc_g += _row_dot(w_base, s_base, xe, xo, grp, gmask, umask, 2 * units, stride_wr, stride_sr)
        acc_l += _row_dot(w_base, s_base, xe, xo, grp, gmask, umask, 2 * units + 1, stride_wr, stride_sr)
    b_base = b_ptr + expert * stride_be
    gate = tl.sum(acc_g, axis=1) + tl.load(b_base + 2 * units, mask=umask, other=0.0).to(tl.float32)
    lin = tl.sum(acc_l, axis=1) + tl.load(b_base + 2 * units + 1, mask=umask, other=0.0).to(tl.float32)
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    h = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    tl.store(act_ptr + slot * stride_an + units, h.to(act_ptr.dtype.element_ty), mask=umask)


@triton.jit
def _down_gemv_kernel(
    act_ptr, idx_ptr, wts_ptr, w_ptr, s_ptr, b_ptr, y_ptr, eo_ptr,
    D, I, stride_an, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_yn,
    K_ACT: tl.constexpr, BLOCK_D: tl.constexpr, GROUPS: tl.constexpr, PER_EXPERT: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # output features, [BLOCK_D]
    rmask = rows < D
    n_groups = I // 32
    y = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(K_ACT):  # the k chosen experts of this token, summed in registers
        slot = token * K_ACT + j
        expert = tl.load(idx_ptr + slot).to(tl.int64)
        w_base = w_ptr + expert * stride_we
        s_base = s_ptr + expert * stride_se
        acc = tl.zeros([BLOCK_D, GROUPS], dtype=tl.float32)
        for g0 in range(0, n_groups, GROUPS):
            grp = g0 + tl.arange(0, GROUPS)
            gmask = grp < n_groups
            feat = grp[:, None] * 32 + 2 * tl.arange(0, 16)[None, :]
            h_row = act_ptr + slot * stride_an
            he = tl.load(h_row + feat, mask=gmask[:, None], other=0.0).to(tl.float32)
            ho = tl.load(h_row + feat + 1, mask=gmask[:, None], other=0.0).to(tl.float32)
            acc += _row_dot(w_base, s_base, he, ho, grp, gmask, rmask, rows, stride_wr, stride_sr)
        out = tl.sum(acc, axis=1) + tl.load(b_ptr + expert * stride_be + rows, mask=rmask, other=0.0).to(tl.float32)
        if PER_EXPERT:
            tl.store(eo_ptr + slot * D + rows, out.to(eo_ptr.dtype.element_ty), mask=rmask)
        y += tl.load(wts_ptr + slot).to(tl.float32) * out
    tl.store(y_ptr + token * stride_yn + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


# -- prefill: grouped GEMMs on the tensor cores --------------------------------------------------------------


@triton.jit
def _dequant_tile(w_base, s_base, rows, rmask, byte, bmask, stride_wr, stride_sr, dtype: tl.constexpr):
    """Rows [BLOCK_R] x bytes [BLOCK_B] of packed MXFP4 -> (even, odd) [BLOCK_R, BLOCK_B] in `dtype`."""
    m = rmask[:, None] & bmask[None, :]
    w = tl.load(w_base + rows[:, None] * stride_wr + byte[None, :], mask=m, other=0).to(tl.int32)
    s = tl.load(s_base + rows[:, None] * stride_sr + (byte // 16)[None, :], mask=m, other=0)
    f = e8m0_factor(s)
    return (e2m1_to_f32(w & 15) * f).to(dtype), (e2m1_to_f32(w >> 4) * f).to(dtype)


@triton.jit
def _gate_up_grouped_kernel(
    x_ptr, row_slot_ptr, block_expert_ptr, w_ptr, s_ptr, b_ptr, act_ptr,
    D, I, stride_xn, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_an,
    limit, alpha,
    K_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_B: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    units = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    umask = units < I
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the expert-grouped, padded layout
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    token = tl.where(valid, slot // K_ACT, 0)
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    dtype = x_ptr.dtype.element_ty
    acc_g = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    for b0 in range(0, D // 2, BLOCK_B):
        byte = b0 + tl.arange(0, BLOCK_B)
        bmask = byte < D // 2
        xm = valid[:, None] & bmask[None, :]
        x_rows = x_ptr + token[:, None] * stride_xn + 2 * byte[None, :]
        xe = tl.load(x_rows, mask=xm, other=0.0)  # even input features [BLOCK_M, BLOCK_B]
        xo = tl.load(x_rows + 1, mask=xm, other=0.0)
        ge, go = _dequant_tile(w_base, s_base, 2 * units, umask, byte, bmask, stride_wr, stride_sr, dtype)
        acc_g = dot(xe, tl.trans(ge), acc_g, IEEE)
        acc_g = dot(xo, tl.trans(go), acc_g, IEEE)
        le, lo = _dequant_tile(w_base, s_base, 2 * units + 1, umask, byte, bmask, stride_wr, stride_sr, dtype)
        acc_l = dot(xe, tl.trans(le), acc_l, IEEE)
        acc_l = dot(xo, tl.trans(lo), acc_l, IEEE)
    b_base = b_ptr + expert * stride_be
    gate = acc_g + tl.load(b_base + 2 * units, mask=umask, other=0.0).to(tl.float32)[None, :]
    lin = acc_l + tl.load(b_base + 2 * units + 1, mask=umask, other=0.0).to(tl.float32)[None, :]
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    h = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    out = act_ptr + rows[:, None] * stride_an + units[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & umask[None, :])


@triton.jit
def _down_grouped_kernel(
    act_ptr, row_slot_ptr, block_expert_ptr, wts_ptr, w_ptr, s_ptr, b_ptr, y_ptr, eo_ptr,
    D, I, stride_an, stride_we, stride_wr, stride_se, stride_sr, stride_be,
    K_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
    IEEE: tl.constexpr, PER_EXPERT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # output features
    cmask = cols < D
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    dtype = act_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, I // 2, BLOCK_B):
        byte = b0 + tl.arange(0, BLOCK_B)
        bmask = byte < I // 2
        am = valid[:, None] & bmask[None, :]
        a_rows = act_ptr + rows[:, None] * stride_an + 2 * byte[None, :]
        he = tl.load(a_rows, mask=am, other=0.0)
        ho = tl.load(a_rows + 1, mask=am, other=0.0)
        we, wo = _dequant_tile(w_base, s_base, cols, cmask, byte, bmask, stride_wr, stride_sr, dtype)
        acc = dot(he, tl.trans(we), acc, IEEE)
        acc = dot(ho, tl.trans(wo), acc, IEEE)
    out = acc + tl.load(b_ptr + expert * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    safe_slot = tl.where(valid, slot, 0)
    m = valid[:, None] & cmask[None, :]
    if PER_EXPERT:
        tl.store(eo_ptr + safe_slot[:, None] * D + cols[None, :], out.to(eo_ptr.dtype.element_ty), mask=m)
    weight = tl.load(wts_ptr + safe_slot, mask=valid, other=0.0).to(tl.float32)
    token = safe_slot // K_ACT
    tl.atomic_add(y_ptr + token[:, None] * D + cols[None, :], out * weight[:, None], mask=m, sem="relaxed")


# -- public wrappers -----------------------------------------------------------------------------------------


def group_by_expert(topk_indices: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay the (token, choice) slots out by expert, each expert's run padded to a multiple of `block_m`.

    topk_indices [N, k] -> row_slot [R] int32 (slot n*k+j of each row, -1 for padding; R = blocks * block_m),
    block_expert [blocks] int32 (the expert of each block of rows). Stable: slots keep token order per expert.
    """
    flat = topk_indices.reshape(-1)
    S = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    blocks = (counts + block_m - 1) // block_m
    first_block = torch.cumsum(blocks, 0) - blocks  # [E]
    total_blocks = int(blocks.sum())
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), blocks).to(torch.int32)
    order = torch.argsort(flat, stable=True)  # slots sorted by expert
    sorted_experts = flat[order]
    first_slot = torch.cumsum(counts, 0) - counts
    rank = torch.arange(S, device=flat.device) - first_slot[sorted_experts]  # position within its expert
    row = first_block[sorted_experts] * block_m + rank
    row_slot = torch.full((total_blocks * block_m,), -1, dtype=torch.int32, device=flat.device)
    row_slot[row] = order.to(torch.int32)
    return row_slot, block_expert


def moe_experts(
    x: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor,
    mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, per_expert: bool = False, *, out: torch.Tensor | None = None,
    blocks: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The experts of a MoE layer on packed MXFP4 weights; same contract as `ossscope.ops.moe_experts`.

    x [N, D], topk_indices [N, k] (int), topk_weights [N, k] -> y [N, D] in x's dtype = sum over the k choices
    of weight * (mlp2(swiglu(mlp1(x))) + biases); with per_expert also expert_out [N, k, D] (unweighted).
    `out` [N, D] receives y (for CUDA graphs); `blocks` overrides the tile sizes (tests use small ones).
    Decode-sized inputs (N * k <= GEMV_MAX_SLOTS) take the streaming kernels and launch no host-synchronizing
    op, so they can be captured in a CUDA graph; larger inputs group the slots by expert first.
    """
    check(x.dim() == 2, f"x must be [N, D], got shape {tuple(x.shape)}")
    N, D = x.shape
    check_float("x", x)
    check_runnable(x)
    check(topk_indices.dim() == 2 and topk_indices.shape[0] == N,
          f"topk_indices must be [N={N}, k], got {tuple(topk_indices.shape)}")
    k = topk_indices.shape[1]
    check(tuple(topk_weights.shape) == (N, k), f"topk_weights must be [{N}, {k}], got {tuple(topk_weights.shape)}")
    check(not topk_indices.is_floating_point(), f"topk_indices must be integers, got {topk_indices.dtype}")
    E, two_I = mlp1_blocks.shape[0], mlp1_blocks.shape[1]
    I = two_I // 2
    check(two_I % 2 == 0 and D % 32 == 0 and I % 32 == 0,
          f"need D and I multiples of 32 and an even mlp1 row count, got D={D}, 2I={two_I}")
    check_mxfp4("mlp1", mlp1_blocks, mlp1_scales, E, 2 * I, D)
    check_mxfp4("mlp2", mlp2_blocks, mlp2_scales, E, D, I)
    check(tuple(mlp1_bias.shape) == (E, 2 * I) and tuple(mlp2_bias.shape) == (E, D),
          f"biases must be mlp1 [{E}, {2 * I}] and mlp2 [{E}, {D}], got {tuple(mlp1_bias.shape)} and "
          f"{tuple(mlp2_bias.shape)}")
    check(mlp1_bias.stride(-1) == 1 and mlp2_bias.stride(-1) == 1, "expert biases must be contiguous rows")
    check_same_device(x=x, topk_indices=topk_indices, topk_weights=topk_weights, mlp1_blocks=mlp1_blocks,
                      mlp2_blocks=mlp2_blocks)
    if x.stride(1) != 1:
        x = x.contiguous()
    topk_indices = topk_indices.contiguous()
    topk_weights = topk_weights.contiguous()
    S = N * k
    y = out if out is not None else torch.empty_like(x)
    check(tuple(y.shape) == (N, D) and y.stride(1) == 1, f"out must be [{N}, {D}] with contiguous rows")
    expert_out = torch.empty(N, k, D, device=x.device, dtype=x.dtype) if per_expert else y
    w1 = (mlp1_blocks.stride(0), mlp1_blocks.stride(1), mlp1_scales.stride(0), mlp1_scales.stride(1),
          mlp1_bias.stride(0))
    w2 = (mlp2_blocks.stride(0), mlp2_blocks.stride(1), mlp2_scales.stride(0), mlp2_scales.stride(1),
          mlp2_bias.stride(0))
    if N == 0:
        return (y, expert_out) if per_expert else y
    if S <= GEMV_MAX_SLOTS:
        cfg = {"BLOCK_I": 16, "BLOCK_D": 16, "GROUPS": 8, **(blocks or {})}
        act = torch.empty(S, I, device=x.device, dtype=x.dtype)
        _gate_up_gemv_kernel[(S, triton.cdiv(I, cfg["BLOCK_I"]))](
            x, topk_indices, mlp1_blocks, mlp1_scales, mlp1_bias, act,
            D, I, x.stride(0), *w1, act.stride(0), float(limit), float(alpha),
            K_ACT=k, BLOCK_I=cfg["BLOCK_I"], GROUPS=cfg["GROUPS"], num_warps=4,
        )
        _down_gemv_kernel[(N, triton.cdiv(D, cfg["BLOCK_D"]))](
            act, topk_indices, topk_weights, mlp2_blocks, mlp2_scales, mlp2_bias, y, expert_out,
            D, I, act.stride(0), *w2, y.stride(0),
            K_ACT=k, BLOCK_D=cfg["BLOCK_D"], GROUPS=cfg["GROUPS"], PER_EXPERT=per_expert, num_warps=4,
        )
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_I": 64, "BLOCK_D": 128, "BLOCK_B": 32, "num_warps": 4, "num_stages": 3,
               **(blocks or {})}
        row_slot, block_expert = group_by_expert(topk_indices, E, cfg["BLOCK_M"])
        n_blocks = block_expert.shape[0]
        act = torch.empty(row_slot.shape[0], I, device=x.device, dtype=x.dtype)  # grouped, padded rows
        ieee = x.dtype == torch.float32
        _gate_up_grouped_kernel[(n_blocks, triton.cdiv(I, cfg["BLOCK_I"]))](
            x, row_slot, block_expert, mlp1_blocks, mlp1_scales, mlp1_bias, act,
            D, I, x.stride(0), *w1, act.stride(0), float(limit), float(alpha),
            K_ACT=k, BLOCK_M=cfg["BLOCK_M"], BLOCK_I=cfg["BLOCK_I"], BLOCK_B=cfg["BLOCK_B"], IEEE=ieee,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        y32 = torch.zeros(N, D, device=x.device, dtype=torch.float32)
        _down_grouped_kernel[(n_blocks, triton.cdiv(D, cfg["BLOCK_D"]))](
            act, row_slot, block_expert, topk_weights, mlp2_blocks, mlp2_scales, mlp2_bias, y32, expert_out,
            D, I, act.stride(0), *w2,
            K_ACT=k, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_B=cfg["BLOCK_B"], IEEE=ieee,
            PER_EXPERT=per_expert, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        y.copy_(y32)
    return (y, expert_out) if per_expert else y


# -- MXFP4 decoding on its own (the kernels' decoder, exposed for checking) -----------------------------------


@triton.jit
def _dequantize_kernel(b_ptr, s_ptr, out_ptr, n_groups, BLOCK_G: tl.constexpr):
    grp = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = grp < n_groups
    byte = grp[:, None] * 16 + tl.arange(0, 16)[None, :]
    w = tl.load(b_ptr + byte, mask=gmask[:, None], other=0).to(tl.int32)
    f = e8m0_factor(tl.load(s_ptr + grp, mask=gmask, other=0))[:, None]
    dst = out_ptr + grp[:, None] * 32 + 2 * tl.arange(0, 16)[None, :]
    tl.store(dst, (e2m1_to_f32(w & 15) * f).to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    tl.store(dst + 1, (e2m1_to_f32(w >> 4) * f).to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode packed MXFP4 with the kernels' in-register decoder; twin of `ossscope.mxfp4.dequantize`.

    blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G * 32] in `dtype`.
    """
    check(blocks.dtype == torch.uint8 and scales.dtype == torch.uint8,
          f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    check(blocks.dim() >= 2 and blocks.shape[-1] == 16 and blocks.shape[:-1] == scales.shape,
          f"MXFP4 needs blocks [..., G, 16] with scales [..., G], got {tuple(blocks.shape)} and "
          f"{tuple(scales.shape)}")
    check_runnable(blocks)
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * 32, device=blocks.device, dtype=dtype)
    n_groups = scales.numel()
    if n_groups:
        _dequantize_kernel[(triton.cdiv(n_groups, 64),)](blocks, scales, out, n_groups, BLOCK_G=64)
    return out
