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
  BLOCK_M x BLOCK_K token tile by a BLOCK_N x BLOCK_K weight tile on the tensor cores. The weight tile is read
  as packed bytes and decoded in registers, its low and high nibbles joined back into feature order, so the
  token tile loads contiguously. Gate/up computes gate and linear units together (adjacent mlp1 rows) and
  applies the clamped SwiGLU in its epilogue; down adds the bias, multiplies by the routing weight and sums
  over k with fp32 atomics. The grouping needs no host sync (a fixed worst-case block count).
Measured on an H100 (docs/bench/h100-moe-sweep.json, scripts/moe_sweep.py): decode 65 us per layer at the
20b shape (0.82 TB/s; the nibble decoding on CUDA cores, not memory, bounds it); prefill 2.4 ms at 2,048
tokens (169 TFLOP/s) and 6.9 ms at 8,192 (237 TFLOP/s).
Torch twin: `ossscope.ops.moe_experts`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_float, check_mxfp4, check_runnable, check_same_device, dot, e2m1_to_f32, e8m0_factor

# Decode-sized inputs, up to this many (token, choice) slots, take the streaming kernels with DECODE_BLOCKS;
# larger inputs group the slots by expert and take the tensor-core kernels with PREFILL_BLOCKS. Tile sizes are
# from a sweep on an H100 (scripts/moe_sweep.py); `moe_experts(blocks=...)` overrides any of them.
GEMV_MAX_SLOTS = 16
DECODE_BLOCKS = {"BLOCK_I": 8, "BLOCK_D": 8, "GROUPS": 16, "num_warps": 8}
PREFILL_BLOCKS = {"BLOCK_M": 128, "BLOCK_N1": 128, "BLOCK_N2": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 5}


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
def _dequant_tile(w_base, s_base, rows, rmask, k0, K, stride_wr, stride_sr,
                  BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """Packed MXFP4 rows [BLOCK_N] x input features k0..k0+BLOCK_K -> [BLOCK_N, BLOCK_K] in `dtype`.

    Reads BLOCK_K/2 contiguous bytes per row and BLOCK_K/32 scales; the low and high nibbles are joined back
    into feature order (2i, 2i+1), so the tile multiplies a contiguous input tile on the tensor cores.
    """
    BLOCK_N: tl.constexpr = rows.shape[0]
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // 32
    byte = k0 // 2 + tl.arange(0, HALF)
    m = rmask[:, None] & (byte < K // 2)[None, :]
    w = tl.load(w_base + rows[:, None] * stride_wr + byte[None, :], mask=m, other=0).to(tl.int32)
    grp = k0 // 32 + tl.arange(0, GROUPS)
    s = tl.load(s_base + rows[:, None] * stride_sr + grp[None, :],
                mask=rmask[:, None] & (grp < K // 32)[None, :], other=0)
    pairs = tl.join(e2m1_to_f32(w & 15), e2m1_to_f32(w >> 4))  # [BLOCK_N, HALF, 2]: features 2i, 2i+1
    values = tl.reshape(pairs, (BLOCK_N, GROUPS, 32)) * e8m0_factor(s)[:, :, None]
    return tl.reshape(values, (BLOCK_N, BLOCK_K)).to(dtype)


@triton.jit
def _gate_up_grouped_kernel(
    x_ptr, row_slot_ptr, block_expert_ptr, w_ptr, s_ptr, b_ptr, act_ptr,
    D, I, stride_xn, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_an,
    limit, alpha,
    K_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # mlp1 rows: gate and linear units interleaved
    cmask = cols < 2 * I
    block_expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)  # -1: an unused block (no valid row)
    expert = tl.maximum(block_expert, 0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the expert-grouped, padded layout
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    token = tl.where(valid, slot // K_ACT, 0)
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.where(block_expert >= 0, D, 0), BLOCK_K):  # no iterations for an unused block
        feat = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token[:, None] * stride_xn + feat[None, :], mask=valid[:, None] & (feat < D)[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w = _dequant_tile(w_base, s_base, cols, cmask, k0, D, stride_wr, stride_sr, BLOCK_K, dtype)
        acc = dot(x, tl.trans(w), acc, IEEE)
    acc += tl.load(b_ptr + expert * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    gate, lin = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # even columns gate, odd linear
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    h = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    units = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    out = act_ptr + rows[:, None] * stride_an + units[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (units < I)[None, :])


@triton.jit
def _down_grouped_kernel(
    act_ptr, row_slot_ptr, block_expert_ptr, wts_ptr, w_ptr, s_ptr, b_ptr, y_ptr, eo_ptr,
    D, I, stride_an, stride_we, stride_wr, stride_se, stride_sr, stride_be,
    K_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, PER_EXPERT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    cmask = cols < D
    block_expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)  # -1: an unused block (no valid row)
    expert = tl.maximum(block_expert, 0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    dtype = act_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.where(block_expert >= 0, I, 0), BLOCK_K):  # no iterations for an unused block
        feat = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(act_ptr + rows[:, None] * stride_an + feat[None, :], mask=valid[:, None] & (feat < I)[None, :],
                    other=0.0)
        w = _dequant_tile(w_base, s_base, cols, cmask, k0, I, stride_wr, stride_sr, BLOCK_K, dtype)
        acc = dot(h, tl.trans(w), acc, IEEE)
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
    block_expert [blocks] int32 (the expert of each block of rows, -1 for an unused block). Stable: slots keep
    token order per expert. The number of blocks is the most any routing can need, cdiv(N*k, block_m) +
    num_experts, so nothing waits for the GPU to count (no host sync); the kernels skip the unused blocks at
    the end.
    """
    flat = topk_indices.reshape(-1).long()
    S = flat.numel()
    max_blocks = triton.cdiv(S, block_m) + num_experts
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_end = torch.cumsum(blocks, 0)  # [E]
    first_block = block_end - blocks
    block_ids = torch.arange(max_blocks, device=flat.device)
    block_expert = torch.searchsorted(block_end, block_ids, right=True)  # E for blocks past the last one
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    order = torch.argsort(flat, stable=True)  # slots sorted by expert
    sorted_experts = flat[order]
    first_slot = torch.cumsum(counts, 0) - counts
    rank = torch.arange(S, device=flat.device) - first_slot[sorted_experts]  # position within its expert
    row = first_block[sorted_experts] * block_m + rank
    row_slot = torch.full((max_blocks * block_m,), -1, dtype=torch.int32, device=flat.device)
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
    Decode-sized inputs (N * k <= GEMV_MAX_SLOTS) take the streaming kernels (captured in the decoder's CUDA
    graph); larger inputs group the slots by expert first and run the tensor-core GEMMs. Neither path waits for
    the GPU (no host-synchronizing op), so prefill queues the next layers while this one runs.
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
    cfg = {**(DECODE_BLOCKS if S <= GEMV_MAX_SLOTS else PREFILL_BLOCKS), **(blocks or {})}
    ieee = x.dtype == torch.float32
    if S <= GEMV_MAX_SLOTS:
        act = torch.empty(S, I, device=x.device, dtype=x.dtype)
        _gate_up_gemv_kernel[(S, triton.cdiv(I, cfg["BLOCK_I"]))](
            x, topk_indices, mlp1_blocks, mlp1_scales, mlp1_bias, act,
            D, I, x.stride(0), *w1, act.stride(0), float(limit), float(alpha),
            K_ACT=k, BLOCK_I=cfg["BLOCK_I"], GROUPS=cfg["GROUPS"], num_warps=cfg["num_warps"],
        )
        _down_gemv_kernel[(N, triton.cdiv(D, cfg["BLOCK_D"]))](
            act, topk_indices, topk_weights, mlp2_blocks, mlp2_scales, mlp2_bias, y, expert_out,
            D, I, act.stride(0), *w2, y.stride(0),
            K_ACT=k, BLOCK_D=cfg["BLOCK_D"], GROUPS=cfg["GROUPS"], PER_EXPERT=per_expert,
            num_warps=cfg["num_warps"],
        )
        return (y, expert_out) if per_expert else y
    row_slot, block_expert = group_by_expert(topk_indices, E, cfg["BLOCK_M"])
    n_blocks = block_expert.shape[0]
    act = torch.empty(row_slot.shape[0], I, device=x.device, dtype=x.dtype)  # grouped, padded rows
    _gate_up_grouped_kernel[(n_blocks, triton.cdiv(2 * I, cfg["BLOCK_N1"]))](
        x, row_slot, block_expert, mlp1_blocks, mlp1_scales, mlp1_bias, act,
        D, I, x.stride(0), *w1, act.stride(0), float(limit), float(alpha),
        K_ACT=k, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K"], IEEE=ieee,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    y32 = torch.zeros(N, D, device=x.device, dtype=torch.float32)
    _down_grouped_kernel[(n_blocks, triton.cdiv(D, cfg["BLOCK_N2"]))](
        act, row_slot, block_expert, topk_weights, mlp2_blocks, mlp2_scales, mlp2_bias, y32, expert_out,
        D, I, act.stride(0), *w2,
        K_ACT=k, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K"], IEEE=ieee,
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
