"""Mixture-of-experts kernels that read packed MXFP4 expert weights directly.

Index legend: N tokens, D hidden, I expert width, E experts, k experts per token, S = N * k (token, choice)
slots. Weights stay as stored: mlp1 [E, 2I, D/32, 16] (rows interleave gate and linear units), mlp2
[E, D, I/32, 16]; each byte holds element 2i (low nibble) and 2i+1 (high nibble), so a kernel multiplies low
nibbles by the even input features and high nibbles by the odd ones and never interleaves anything.

Two shapes of work, two pairs of kernels:
- decode (few slots, pure bandwidth): `input_words` puts the input in the order the weight words want it,
  then one program per (slot, tile of rows) streams the expert's rows as int32 words and reduces on CUDA cores
  (gate/up with the SwiGLU, then down with its bias, its reduction split SPLIT_D ways), giving each choice's
  expert output in fp32 parts (`moe_decode_parts`); `moe_experts` sums them with the routing weights. The
  decoder has its residual norms do both ends instead (`add_rms_norm(words_out=..., weights=...)`), so they
  cost no launches, and lets the kernels choose their experts from the router logits themselves
  (`moe_decode_routed`), so routing costs none either.
- prefill (many slots): slots are grouped by expert and padded to BLOCK_M rows; each program multiplies a
  BLOCK_M x BLOCK_K token tile by a BLOCK_N x BLOCK_K weight tile on the tensor cores. The weight tile is read
  as packed bytes and decoded in registers, its low and high nibbles joined back into feature order, so the
  token tile loads contiguously. Gate/up computes gate and linear units together (adjacent mlp1 rows) and
  applies the clamped SwiGLU in its epilogue; down adds the bias and writes each slot's output, and the
  decode's combine kernel sums them over k with the routing weights, in a fixed order (run-to-run identical
  results; fp32 atomics were not). The grouping needs no host sync (a fixed worst-case block count).
Measured on an H100 (docs/bench/, scripts/moe_sweep.py, scripts/decode_ab.py): decode 47 us per layer at the
20b shape, 1.1 TB/s, bound by the ~4.7 instructions each weight code costs on CUDA cores; bf16 models on GPUs
with fp8 tensor cores therefore decode with kernels/moe_tc.py (36 us), fp16/fp32 models and older GPUs here.
Prefill 2.3-2.8 ms at 2,048 tokens (145-175 TFLOP/s) and 6.9 ms at 8,192 (237 TFLOP/s).
Torch twin: `ossscope.ops.moe_experts`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INPUT_SCALE,
    await_inputs,
    check,
    check_float,
    check_mxfp4,
    check_runnable,
    check_same_device,
    dot,
    e2m1_to_f32,
    e8m0_factor,
    use_pdl,
    word_order,
)
from .routing import check_routing, top_k_softmax

# Decode-sized inputs, up to this many (token, choice) slots, take the streaming kernels with DECODE_BLOCKS;
# larger inputs group the slots by expert and take the tensor-core kernels with PREFILL_BLOCKS. Tile sizes are
# from sweeps on an H100 (scripts/moe_sweep.py, scripts/decode_ab.py); `blocks=` overrides any of them. Decode:
# BLOCK_I SwiGLU units (2 * BLOCK_I mlp1 rows) or BLOCK_D output rows per program, GROUPS_* 32-feature groups
# per step, WARPS_* warps; SPLIT_D programs share each down row's reduction (split-K), leaving SPLIT_D parts
# that `add_rms_norm(weights=...)` or `moe_experts` add up; PREFETCH_D: under PDL, down reads its first weight
# tile before waiting for gate/up. (Split-K and software pipelining of gate/up were slower: docs/PERFORMANCE.md.)
GEMV_MAX_SLOTS = 16
DECODE_BLOCKS = {"BLOCK_I": 16, "GROUPS_I": 16, "WARPS_I": 2, "BLOCK_D": 16, "GROUPS_D": 16, "WARPS_D": 2,
                 "SPLIT_D": 2, "PREFETCH_D": True}
PREFILL_BLOCKS = {"BLOCK_M": 128, "BLOCK_N1": 128, "BLOCK_N2": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 5}


# -- decode: streaming kernels -------------------------------------------------------------------------------
#
# The weights are read as int32 words, 8 E2M1 codes each (input features 8j..8j+7 of the word, code k in bits
# 4k..4k+3). Codes k and k+4 sit 16 bits apart, so one shift and mask put both magnitudes where a bf16 keeps its
# exponent and mantissa, and one more shift brings both signs to bits 15 and 31: two bf16 values, each the E2M1
# value times 2**-126 (0.5 becomes a subnormal, still exact), which turn into fp32 by keeping the high half or
# moving the low half up. That is about 3 integer operations and 1 FMA per weight, with no conversion
# instructions. The inputs come in "word order" (fp32, times 2**64 so that their products with those tiny
# values stay normal and exact): within each 32-feature group, the 4 words' code-k inputs sit side by side, so
# a thread loads them as one vector in the layout its weight words already have. The block scale gives the
# 2**62 back.

PAIR_MAGNITUDES = tl.constexpr(0x01C001C0)  # bits 6-8 and 22-24: a bf16's low exponent bits and first mantissa bit
PAIR_SIGNS = tl.constexpr(-2147450880)  # 0x80008000 as an int32 (a larger literal would widen the tile to int64)
HIGH_HALF = tl.constexpr(-65536)  # 0xFFFF0000 as an int32


@triton.jit
def _input_words_kernel(x_ptr, out_ptr, K, stride_xn, stride_on, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_xn + f, mask=f < K, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_on + word_order(f), x * INPUT_SCALE, mask=f < K)


@triton.jit
def _code_pair(w, k: tl.constexpr):
    """int32 words -> bf16 pairs: code k in the low half, code k + 4 in the high half, each value * 2**-126."""
    if k <= 1:  # noqa: SIM108 (a static branch: the other shift would be negative)
        magnitudes = (w << (6 - 4 * k)) & PAIR_MAGNITUDES
    else:
        magnitudes = (w >> (4 * k - 6)) & PAIR_MAGNITUDES
    if k == 3:  # noqa: SIM108
        signs = w & PAIR_SIGNS
    else:
        signs = (w << (12 - 4 * k)) & PAIR_SIGNS
    return magnitudes | signs


@triton.jit
def _group_factor(scale):
    """uint8 E8M0 codes -> fp32 2**(scale - 127) * 2**62, undoing the 2**-62 of codes times inputs; exact up to
    code 192. (Checkpoint scales sit around 2**-7, code 120; products stay exact for inputs in [2**-63, 2**64).)"""
    return ((scale.to(tl.int32) + 62) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(w_rows, s_rows, grp, n_groups, rmask):
    """Weight words [R, G, 4] and scale codes [R, G] of 32-feature groups `grp` of the rows."""
    gmask = grp < n_groups
    word = tl.arange(0, 4)
    w = tl.load(w_rows + (grp[:, None] * 4 + word[None, :])[None, :, :],
                mask=rmask[:, None, None] & gmask[None, :, None], other=0)
    s = tl.load(s_rows + grp[None, :], mask=rmask[:, None] & gmask[None, :], other=0)
    return w, s


@triton.jit
def _tile_dot(w, s, x_row, grp, n_groups, acc):
    """acc [R, G] += each group's weights times the word-ordered input, scaled by the group's factor."""
    gmask = grp < n_groups
    x_at = x_row + grp[:, None] * 32 + tl.arange(0, 4)[None, :]  # [G, 4]: code 0 of each word
    part = tl.zeros(w.shape, dtype=tl.float32)
    for k in tl.static_range(4):
        x_low = tl.load(x_at + 4 * k, mask=gmask[:, None], other=0.0)[None, :, :]
        x_high = tl.load(x_at + 4 * (k + 4), mask=gmask[:, None], other=0.0)[None, :, :]
        pair = _code_pair(w, k)
        part += (pair << 16).to(tl.float32, bitcast=True) * x_low  # two FMAs, not mul + fma + add
        part += (pair & HIGH_HALF).to(tl.float32, bitcast=True) * x_high
    return acc + tl.sum(part, axis=2) * _group_factor(s)


@triton.jit
def _rows_dot(w_rows, s_rows, x_row, g_start, g_stop, rmask, GROUPS: tl.constexpr, PDL: tl.constexpr):
    """Packed MXFP4 rows times one word-ordered input, over 32-feature groups g_start..g_stop-1 -> [R] fp32.

    w_rows [R, 1, 1] pointers to each row's int32 words, s_rows [R, 1] to its scale codes, x_row to the input
    (in word order, fp32 * 2**64). With PDL the first tile of weights is read before `await_inputs`, while the
    kernel that writes the input still runs.
    """
    grp = g_start + tl.arange(0, GROUPS)
    w, s = _load_tile(w_rows, s_rows, grp, g_stop, rmask)
    await_inputs(PDL)
    acc = _tile_dot(w, s, x_row, grp, g_stop, tl.zeros([w_rows.shape[0], GROUPS], dtype=tl.float32))
    for g0 in range(g_start + GROUPS, g_stop, GROUPS):
        grp = g0 + tl.arange(0, GROUPS)
        w, s = _load_tile(w_rows, s_rows, grp, g_stop, rmask)
        acc = _tile_dot(w, s, x_row, grp, g_stop, acc)
    return tl.sum(acc, axis=1)


@triton.jit
def _slot_expert(
    slot, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, wts_ptr, E, write,
    K_ACT: tl.constexpr, K_P2: tl.constexpr, BLOCK_E: tl.constexpr, ROUTED: tl.constexpr,
    HAS_REROUTE: tl.constexpr, HAS_ZERO: tl.constexpr,
):
    """The expert of a (token, choice) slot, as int64. Read from the indices, or (ROUTED) chosen here from the
    token's router logits by `routing.top_k_softmax`, exactly as `route` chooses; then, where `write` (int) is 1,
    the token's k indices and weights are stored (one program per token does it, for the capture and the sum)."""
    if ROUTED:
        token = slot // K_ACT
        cols = tl.arange(0, BLOCK_E)
        logits = tl.load(logits_ptr + token * E + cols, mask=cols < E, other=float("-inf")).to(tl.float32)
        chosen, weights = top_k_softmax(logits[None, :], reroute_ptr, zero_ptr, E, K_ACT, K_P2, HAS_REROUTE,
                                        HAS_ZERO)  # [1, K_P2] each
        kcol = tl.arange(0, K_P2)[None, :]
        expert = tl.sum(tl.where(kcol == slot % K_ACT, chosen, 0))
        kmask = (kcol < K_ACT) & ((kcol * 0 + write) != 0)  # a vector mask (the interpreter needs one)
        tl.store(idx_ptr + token * K_ACT + kcol, chosen.to(idx_ptr.dtype.element_ty), mask=kmask)
        tl.store(wts_ptr + token * K_ACT + kcol, weights, mask=kmask)
    else:
        expert = tl.load(idx_ptr + slot)
    return expert.to(tl.int64)


@triton.jit
def _split_range(K, SPLIT: tl.constexpr):
    """This program's share of the K / 32 feature groups when the reduction is split SPLIT ways (grid axis 2)."""
    n_groups = K // 32
    chunk = tl.cdiv(n_groups, SPLIT)
    g_start = tl.program_id(2) * chunk
    return g_start, tl.minimum(g_start + chunk, n_groups)


@triton.jit
def _swiglu(out, expert, rows, rmask, b_ptr, stride_be, limit, alpha, BLOCK_I: tl.constexpr):
    """Gate/up rows' sums [2 BLOCK_I] -> bias, clamped SwiGLU, rounded to the model's dtype: [BLOCK_I] fp32."""
    out += tl.load(b_ptr + expert * stride_be + rows, mask=rmask, other=0.0).to(tl.float32)
    gate, lin = tl.split(tl.reshape(out, [BLOCK_I, 2]))  # [BLOCK_I] each
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    h = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    return h.to(b_ptr.dtype.element_ty).to(tl.float32)  # rounded to the model's dtype, as the reference does


@triton.jit
def _swiglu_store(out, expert, rows, rmask, slot, b_ptr, actw_ptr, I, stride_be, stride_an, limit, alpha,
                  BLOCK_I: tl.constexpr):
    """Gate/up rows' sums -> `_swiglu`, stored in word order."""
    h = _swiglu(out, expert, rows, rmask, b_ptr, stride_be, limit, alpha, BLOCK_I)
    units = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    tl.store(actw_ptr + slot * stride_an + word_order(units), h * INPUT_SCALE, mask=units < I)


@triton.jit
def _gate_up_gemv_kernel(
    xw_ptr, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, wts_ptr, w_ptr, s_ptr, b_ptr, actw_ptr,
    D, I, E, stride_xn, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_an,
    limit, alpha,
    K_ACT: tl.constexpr, K_P2: tl.constexpr, BLOCK_I: tl.constexpr, GROUPS: tl.constexpr, BLOCK_E: tl.constexpr,
    ROUTED: tl.constexpr, HAS_REROUTE: tl.constexpr, HAS_ZERO: tl.constexpr, PDL: tl.constexpr,
):
    await_inputs(PDL)  # which expert's rows to read depends on the kernel before
    slot = tl.program_id(0)
    rows = tl.program_id(1) * (2 * BLOCK_I) + tl.arange(0, 2 * BLOCK_I)  # mlp1 rows: gate, linear, gate, ...
    rmask = rows < 2 * I
    write = ((slot % K_ACT == 0) & (tl.program_id(1) == 0)).to(tl.int32)  # one writer per token
    expert = _slot_expert(slot, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, wts_ptr, E, write, K_ACT, K_P2,
                          BLOCK_E, ROUTED, HAS_REROUTE, HAS_ZERO)
    w_rows = w_ptr + expert * stride_we + rows[:, None, None] * stride_wr
    s_rows = s_ptr + expert * stride_se + rows[:, None] * stride_sr
    out = _rows_dot(w_rows, s_rows, xw_ptr + (slot // K_ACT) * stride_xn, 0, D // 32, rmask, GROUPS, False)
    _swiglu_store(out, expert, rows, rmask, slot, b_ptr, actw_ptr, I, stride_be, stride_an, limit, alpha, BLOCK_I)


@triton.jit
def _down_gemv_kernel(
    actw_ptr, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    D, I, E, stride_an, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_on,
    K_ACT: tl.constexpr, K_P2: tl.constexpr, BLOCK_D: tl.constexpr, GROUPS: tl.constexpr, BLOCK_E: tl.constexpr,
    ROUTED: tl.constexpr, HAS_REROUTE: tl.constexpr, HAS_ZERO: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
):
    # Under PDL this kernel starts while gate/up runs. The routing was written two kernels back (gate/up waited
    # for it before letting this kernel launch), so with PREFETCH the expert and its first weight tile are read
    # before the wait inside _rows_dot; the activations, from gate/up, after it.
    await_inputs(PDL and not PREFETCH)
    slot = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # output features
    rmask = rows < D
    expert = _slot_expert(slot, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, idx_ptr, E, 0, K_ACT, K_P2,
                          BLOCK_E, ROUTED, HAS_REROUTE, HAS_ZERO)
    w_rows = w_ptr + expert * stride_we + rows[:, None, None] * stride_wr
    s_rows = s_ptr + expert * stride_se + rows[:, None] * stride_sr
    g_start, g_stop = _split_range(I, SPLIT)
    out = _rows_dot(w_rows, s_rows, actw_ptr + slot * stride_an, g_start, g_stop, rmask, GROUPS, PDL and PREFETCH)
    # Split-K: part s of slot j goes to row j * SPLIT + s (the bias in part 0); the reader adds them up.
    first = (rows * 0 + tl.program_id(2)) == 0  # a vector, not a scalar: the interpreter's masks need that
    bias = tl.load(b_ptr + expert * stride_be + rows, mask=rmask & first, other=0.0)
    out += bias.to(tl.float32)
    tl.store(out_ptr + (slot * SPLIT + tl.program_id(2)) * stride_on + rows, out, mask=rmask)


@triton.jit
def _combine_kernel(
    parts_ptr, wts_ptr, y_ptr, eo_ptr, D, stride_pn, stride_yn,
    K_ACT: tl.constexpr, K_POW2: tl.constexpr, BLOCK: tl.constexpr, PER_EXPERT: tl.constexpr, SPLIT: tl.constexpr,
):
    """y[token] = sum over its k choices of routing weight * expert output, from fp32 parts [N * k * SPLIT, D]
    (each expert output the sum of its SPLIT rows, in order)."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    choice = tl.arange(0, K_POW2)
    slot = token * K_ACT + choice
    mask = (choice < K_ACT)[:, None] & (cols < D)[None, :]
    parts = tl.zeros([K_POW2, BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        parts += tl.load(parts_ptr + (slot * SPLIT + s)[:, None] * stride_pn + cols[None, :], mask=mask, other=0.0)
    if PER_EXPERT:
        tl.store(eo_ptr + slot[:, None] * D + cols[None, :], parts.to(eo_ptr.dtype.element_ty), mask=mask)
    wts = tl.load(wts_ptr + slot, mask=choice < K_ACT, other=0.0).to(tl.float32)
    y = tl.sum(parts * wts[:, None], axis=0)
    tl.store(y_ptr + token * stride_yn + cols, y.to(y_ptr.dtype.element_ty), mask=cols < D)


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


# The batched decode's faster weight decode (kernels/moe_batch.py `moe_decode_grouped`, DIRECT=True): each code goes
# straight to a 16-bit float bit pattern (no fp32 detour, no nibble join), with its block scale folded in by one
# packed multiply. Exactness: the 3 magnitude bits placed at the top of the exponent/mantissa fields ((n & 7) << 6
# for bf16, << 9 for fp16) and the sign at bit 15 make the E2M1 value v times 2**(1 - bias), the code 0.5 a
# subnormal; times M = 2**(s - 128 + 2 bias - X), a power of two, that is v * 2**(s - 127) * 2**-X exactly (a
# 2-bit significand, a normal number), and the kernel multiplies its fp32 sums by 2**X at the end. X keeps M and
# the weights inside the 16-bit format's range: bf16 (X = 32) takes scale codes s in 34..160 (2**-93..2**33),
# fp16 (X = 0) codes 105..128. (Checkpoint scales sit around 2**-7, code 120.) Both inputs of the tensor-core dot
# are then normal 16-bit floats, their products exact in fp32, as in `_dequant_tile`'s path.
# Cost per code on the GPU (bf16, `_direct_codes` with ASM): per 4 bytes (8 codes), 2 byte permutes, 4 x 3-4
# integer ops (shifts, masks; ptxas fuses and/or into LOP3) and 4 packed FMAs (2 codes each) = 20, i.e. 2.5 per
# code, against ~10 for `_dequant_tile` (nibble split, e2m1_to_f32, an fp32 scale multiply, a bf16 convert,
# join/permute shuffles). The scale's M is 2 ops per (row, group), ~0.1 per code. The dot takes low nibbles
# against even input features and high nibbles against odd ones, so no weights are interleaved; the input tile
# is split into its even and odd features instead (BLOCK_M / BLOCK_N of the work).
DIRECT_X = {"bfloat16": 32, "float16": 0}


@triton.jit
def _direct_codes(b, mult, dtype: tl.constexpr, ASM: tl.constexpr):
    """uint8 bytes [...] (two codes each) and multipliers `mult` (M in `dtype`, broadcastable) -> (low-nibble
    weights, high-nibble weights) in `dtype`, each v * 2**(s - 127 - X)."""
    if ASM:  # bf16 on a GPU: 4 bytes a register, two codes per instruction
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, u, v, z;
            mov.b32 z, 0x80008000;
            prmt.b32 t, $4, 0, 0x1404;
            shr.b32 u, t, 2;
            and.b32 u, u, 0x01C001C0;
            shl.b32 v, t, 4;
            and.b32 v, v, 0x80008000;
            or.b32 u, u, v;
            fma.rn.bf16x2 $0, u, $5, z;
            shr.b32 u, t, 6;
            and.b32 u, u, 0x01C001C0;
            and.b32 v, t, 0x80008000;
            or.b32 u, u, v;
            fma.rn.bf16x2 $2, u, $5, z;
            prmt.b32 t, $4, 0, 0x3424;
            shr.b32 u, t, 2;
            and.b32 u, u, 0x01C001C0;
            shl.b32 v, t, 4;
            and.b32 v, v, 0x80008000;
            or.b32 u, u, v;
            fma.rn.bf16x2 $1, u, $6, z;
            shr.b32 u, t, 6;
            and.b32 u, u, 0x01C001C0;
            and.b32 v, t, 0x80008000;
            or.b32 u, u, v;
            fma.rn.bf16x2 $3, u, $6, z;
            }""",
            # Elementwise (output i from byte i and multiplier i, whatever elements Triton packs together):
            # $0,$1: low codes of bytes 0-1, 2-3 (bf16x2); $2,$3: their high codes; $4: the 4 bytes; $5,$6: the
            # multipliers of elements 0-1, 2-3 (bf16x2). prmt 0x1404 puts bytes 0 and 1 at bits 8-15 and 24-31
            # (0x3424: bytes 2 and 3), so in either half a low code's magnitude moves down 2 to bits 6-8 and its
            # sign up 4 to bit 15, a high code's magnitude down 6 and its sign stays. fma with -0 is the multiply
            # (sm_80+; mul.bf16x2 needs sm_90); it keeps the subnormal 0.5 (FMA units take bf16 subnormals).
            constraints="=r,=r,=r,=r,r,r,r", args=[b, mult], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
            pack=4)
    else:  # the same bits in plain Triton (the interpreter, fp16)
        w = b.to(tl.int32)
        if dtype == tl.bfloat16:  # the magnitude's top bit at bit 8 (bf16) or 11 (fp16), the sign at 15
            low = ((w & 7) << 6) | ((w & 8) << 12)
            high = ((w & 0x70) << 2) | ((w & 0x80) << 8)
        else:
            low = ((w & 7) << 9) | ((w & 8) << 12)
            high = ((w & 0x70) << 5) | ((w & 0x80) << 8)
        return low.to(tl.int16).to(dtype, bitcast=True) * mult, high.to(tl.int16).to(dtype, bitcast=True) * mult


@triton.jit
def _direct_multipliers(scale, dtype: tl.constexpr, X: tl.constexpr):
    """uint8 E8M0 codes -> M = 2**(s - 128 + 2 bias - X) in `dtype` (2 integer ops: an add, a shift)."""
    if dtype == tl.bfloat16:
        bits = (scale.to(tl.int32) + (2 * 127 - 128 - X)) << 7
    else:
        bits = (scale.to(tl.int32) + (2 * 15 - 128 - X)) << 10
    return bits.to(tl.int16).to(dtype, bitcast=True)


@triton.jit
def _direct_scales(s_base, rows, rmask, k0, K, stride_sr, BLOCK_K: tl.constexpr):
    """Scale codes [BLOCK_N, BLOCK_K / 32] (uint8) of rows `rows`, features k0..k0+BLOCK_K (0 past K)."""
    grp = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    return tl.load(s_base + rows[:, None] * stride_sr + grp[None, :], mask=rmask[:, None] & (grp < K // 32)[None, :],
                   other=0)


@triton.jit
def _direct_codes_tile(w_base, s, rows, rmask, k0, K, stride_wr,
                       BLOCK_K: tl.constexpr, dtype: tl.constexpr, X: tl.constexpr, ASM: tl.constexpr):
    """`_direct_tile` with its scale codes s [BLOCK_N, BLOCK_K / 32] already loaded (`_direct_scales`)."""
    BLOCK_N: tl.constexpr = rows.shape[0]
    GROUPS: tl.constexpr = BLOCK_K // 32
    grp = k0 // 32 + tl.arange(0, GROUPS)
    gmask = rmask[:, None] & (grp < K // 32)[None, :]  # [BLOCK_N, GROUPS]
    byte = grp[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]  # a group's 16 bytes, contiguous in its row
    b = tl.load(w_base + rows[:, None, None] * stride_wr + byte, mask=gmask[:, :, None], other=0)  # [BN, G, 16]
    low, high = _direct_codes(b, _direct_multipliers(s, dtype, X)[:, :, None], dtype, ASM)
    return tl.reshape(low, (BLOCK_N, BLOCK_K // 2)), tl.reshape(high, (BLOCK_N, BLOCK_K // 2))


@triton.jit
def _direct_tile(w_base, s_base, rows, rmask, k0, K, stride_wr, stride_sr,
                 BLOCK_K: tl.constexpr, dtype: tl.constexpr, X: tl.constexpr, ASM: tl.constexpr):
    """Packed MXFP4 rows [BLOCK_N] x input features k0..k0+BLOCK_K -> (even features' weights, odd features'
    weights), [BLOCK_N, BLOCK_K / 2] each in `dtype`, times 2**-X (block scales folded in; notes above)."""
    s = _direct_scales(s_base, rows, rmask, k0, K, stride_sr, BLOCK_K)
    return _direct_codes_tile(w_base, s, rows, rmask, k0, K, stride_wr, BLOCK_K, dtype, X, ASM)


@triton.jit
def _direct_inputs(x_ptr, row, valid, k0, K, stride_xn, BLOCK_K: tl.constexpr, SPLIT_X: tl.constexpr):
    """The input rows `row` (valid [BLOCK_M]) over features k0..k0+BLOCK_K, as the direct decode multiplies them:
    (even features, odd features), [BLOCK_M, BLOCK_K / 2] each. x_ptr rows are in feature order (split here, in
    registers: 2 byte permutes per 4 inputs, in every warp) or, SPLIT_X, already split ([rows, 2, K / 2]: the K / 2
    even features, then the odd ones), read as two contiguous tiles."""
    if SPLIT_X:
        half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        m = valid[:, None] & (half < K // 2)[None, :]
        at = x_ptr + row[:, None] * stride_xn + half[None, :]
        x_even = tl.load(at, mask=m, other=0.0)
        x_odd = tl.load(at + K // 2, mask=m, other=0.0)
    else:
        feat = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row[:, None] * stride_xn + feat[None, :], mask=valid[:, None] & (feat < K)[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], BLOCK_K // 2, 2)))
    return x_even, x_odd


@triton.jit
def _direct_matmul(x_ptr, row, valid, w_base, s_base, cols, cmask, n_k, K, stride_xn, stride_wr, stride_sr, acc,
                   BLOCK_K: tl.constexpr, X: tl.constexpr, ASM: tl.constexpr, SPLIT_X: tl.constexpr,
                   PREFETCH_S: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x rows `row` times the weight rows `cols` over features 0..n_k (n_k is K, or 0 for
    an unused block), with the direct decode (acc holds sums times 2**-X). PREFETCH_S: each step's scale codes are
    read one step ahead, into registers: the scales (BLOCK_K / 32 bytes a row, too few for the asynchronous
    copies that pipeline the weights) otherwise wait a full memory latency inside every step."""
    dtype = x_ptr.dtype.element_ty
    if PREFETCH_S:
        s_next = _direct_scales(s_base, cols, cmask, 0, K, stride_sr, BLOCK_K)  # (an unused block: expert 0's)
    for k0 in range(0, n_k, BLOCK_K):
        x_even, x_odd = _direct_inputs(x_ptr, row, valid, k0, K, stride_xn, BLOCK_K, SPLIT_X)
        if PREFETCH_S:
            low, high = _direct_codes_tile(w_base, s_next, cols, cmask, k0, K, stride_wr, BLOCK_K, dtype, X, ASM)
            s_next = _direct_scales(s_base, cols, cmask, k0 + BLOCK_K, K, stride_sr, BLOCK_K)  # 0 past the end
        else:
            low, high = _direct_tile(w_base, s_base, cols, cmask, k0, K, stride_wr, stride_sr, BLOCK_K, dtype, X,
                                     ASM)
        acc = tl.dot(x_even, tl.trans(low), acc)
        acc = tl.dot(x_odd, tl.trans(high), acc)
    return acc * 2.0**X  # exact: a power of two


@triton.jit
def _grouped_step(x, w_base, s_base, cols, cmask, k0, K, stride_wr, stride_sr, acc,
                  BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, BLOCK_K] times the weight rows `cols` over features k0..k0+BLOCK_K,
    dequantized in feature order (`_dequant_tile`). (The direct decode's loop is `_direct_matmul`.)"""
    w = _dequant_tile(w_base, s_base, cols, cmask, k0, K, stride_wr, stride_sr, BLOCK_K, x.dtype)
    return dot(x, tl.trans(w), acc, IEEE)


@triton.jit
def _gate_up_grouped_kernel(
    x_ptr, row_slot_ptr, block_expert_ptr, w_ptr, s_ptr, b_ptr, act_ptr,
    D, I, stride_xn, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_an,
    limit, alpha,
    K_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, DIRECT: tl.constexpr = False, X: tl.constexpr = 0, ASM: tl.constexpr = False,
    SPLIT_X: tl.constexpr = False, PREFETCH_S: tl.constexpr = False,
):
    # DIRECT: the weights decoded by `_direct_matmul` (the batched decode's), else by `_dequant_tile`. SPLIT_X
    # (direct only): x is [N, 2, D / 2] (even features, then odd), and act is written the same way ([rows, 2,
    # I / 2]) for the down kernel's SPLIT_X. PREFETCH_S: `_direct_matmul`.
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_k = tl.where(block_expert >= 0, D, 0)  # no iterations for an unused block
    if DIRECT:
        acc = _direct_matmul(x_ptr, token, valid, w_base, s_base, cols, cmask, n_k, D, stride_xn, stride_wr,
                             stride_sr, acc, BLOCK_K, X, ASM, SPLIT_X, PREFETCH_S)
    else:
        for k0 in range(0, n_k, BLOCK_K):
            feat = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token[:, None] * stride_xn + feat[None, :],
                        mask=valid[:, None] & (feat < D)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            acc = _grouped_step(x, w_base, s_base, cols, cmask, k0, D, stride_wr, stride_sr, acc, BLOCK_K, IEEE)
    acc += tl.load(b_ptr + expert * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    gate, lin = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # even columns gate, odd linear
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    h = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    units = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    if SPLIT_X:  # unit u to column u // 2 (even u) or I / 2 + u // 2 (odd u)
        out = act_ptr + rows[:, None] * stride_an + ((units % 2) * (I // 2) + units // 2)[None, :]
    else:
        out = act_ptr + rows[:, None] * stride_an + units[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (units < I)[None, :])


@triton.jit
def _down_grouped_kernel(
    act_ptr, row_slot_ptr, block_expert_ptr, w_ptr, s_ptr, b_ptr, parts_ptr,
    D, I, stride_an, stride_we, stride_wr, stride_se, stride_sr, stride_be,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    DIRECT: tl.constexpr = False, X: tl.constexpr = 0, ASM: tl.constexpr = False, SPLIT_X: tl.constexpr = False,
    PREFETCH_S: tl.constexpr = False,
):
    # DIRECT, SPLIT_X (act [rows, 2, I / 2], as gate/up writes it with SPLIT_X), PREFETCH_S: as in gate/up.
    # Each slot's unweighted expert output (bias included) goes to its own fp32 row of parts [N * k, D]; the
    # weighted sum over k is the reader's, in a fixed order (the combine kernel, or the decoder's residual norm).
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_k = tl.where(block_expert >= 0, I, 0)  # no iterations for an unused block
    if DIRECT:
        acc = _direct_matmul(act_ptr, rows, valid, w_base, s_base, cols, cmask, n_k, I, stride_an, stride_wr,
                             stride_sr, acc, BLOCK_K, X, ASM, SPLIT_X, PREFETCH_S)
    else:
        for k0 in range(0, n_k, BLOCK_K):
            feat = k0 + tl.arange(0, BLOCK_K)
            h = tl.load(act_ptr + rows[:, None] * stride_an + feat[None, :],
                        mask=valid[:, None] & (feat < I)[None, :], other=0.0)
            acc = _grouped_step(h, w_base, s_base, cols, cmask, k0, I, stride_wr, stride_sr, acc, BLOCK_K, IEEE)
    out = acc + tl.load(b_ptr + expert * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    safe_slot = tl.where(valid, slot, 0)
    tl.store(parts_ptr + safe_slot[:, None] * D + cols[None, :], out, mask=valid[:, None] & cmask[None, :])


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


def _as_words(name: str, blocks: torch.Tensor) -> torch.Tensor:
    """Packed MXFP4 bytes [E, rows, G, 16] viewed as int32 words [E, rows, G, 4] (no copy)."""
    check(blocks.storage_offset() % 4 == 0 and all(st % 4 == 0 for st in blocks.stride()[:-2]),
          f"{name} blocks must start on a 4-byte boundary with whole-word strides for the decode kernels; "
          f"got storage offset {blocks.storage_offset()} and strides {blocks.stride()} (use .clone())")
    return blocks.view(torch.int32)


def input_words(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, D] -> fp32 [N, D] in the decode kernels' word order, times 2**64 (see the decode notes above).

    `add_rms_norm(words_out=...)` writes the same thing as a by-product of the norm."""
    check(x.dim() == 2 and x.shape[1] % 32 == 0, f"x must be [N, D] with D a multiple of 32, got {tuple(x.shape)}")
    check_float("x", x)
    check_runnable(x)
    N, D = x.shape
    out = out if out is not None else torch.empty(N, D, device=x.device, dtype=torch.float32)
    check(out.dtype == torch.float32 and tuple(out.shape) == (N, D) and out.stride(1) == 1,
          f"out must be float32 [{N}, {D}] with contiguous rows")
    if N:
        _input_words_kernel[(N, triton.cdiv(D, 1024))](x, out, D, x.stride(0), out.stride(0), BLOCK=1024)
    return out


def _check_decode_inputs(x_words, mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales):
    check(x_words.dim() == 2 and x_words.dtype == torch.float32 and x_words.stride(1) == 1,
          f"x_words must be float32 [N, D] with contiguous rows (from input_words), got {x_words.dtype} "
          f"{tuple(x_words.shape)}")
    check_runnable(x_words)
    _check_decode_weights(x_words.shape[1], mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales)


def _check_decode_weights(D: int, mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales) -> tuple[int, int]:
    """Packed expert weights for inputs of D features -> (E, I), both projections checked."""
    E, I = mlp1_blocks.shape[0], mlp1_blocks.shape[1] // 2
    check(D % 32 == 0 and I % 32 == 0, f"need D and I multiples of 32, got D={D}, I={I}")
    check_mxfp4("mlp1", mlp1_blocks, mlp1_scales, E, 2 * I, D)
    check_mxfp4("mlp2", mlp2_blocks, mlp2_scales, E, D, I)
    return E, I


def _parts_buffer(out: torch.Tensor | None, slots: int, split_d: int, D: int, device) -> torch.Tensor:
    """The decode kernels' fp32 output parts [slots * split_d, D]: `out`, checked, or a new tensor."""
    check(split_d >= 1, f"SPLIT_D must be positive, got {split_d}")
    parts = out if out is not None else torch.empty(slots * split_d, D, device=device, dtype=torch.float32)
    check(parts.dtype == torch.float32 and tuple(parts.shape) == (slots * split_d, D) and parts.stride(1) == 1,
          f"out must be float32 [{slots * split_d}, {D}] with contiguous rows")
    return parts


def _routing_outputs(N: int, k: int, device, indices_out: torch.Tensor | None,
                     weights_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where self-routing kernels write the routing: indices int [N, k], weights fp32 [N, k] (given, or new)."""
    indices = indices_out if indices_out is not None else torch.empty(N, k, device=device, dtype=torch.int64)
    weights = weights_out if weights_out is not None else torch.empty(N, k, device=device, dtype=torch.float32)
    check(tuple(indices.shape) == (N, k) and indices.is_contiguous() and not indices.is_floating_point(),
          f"indices_out must be contiguous integers [{N}, {k}]")
    check(tuple(weights.shape) == (N, k) and weights.is_contiguous() and weights.dtype == torch.float32,
          f"weights_out must be contiguous float32 [{N}, {k}]")
    return indices, weights


def _launch_decode(
    x_words, indices, logits, reroute_mask, zero_mask, weights_out, k,
    mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit, alpha, out, cfg, pdl,
) -> torch.Tensor:
    """Gate/up then down for every (token, choice) slot -> fp32 parts [N * k * cfg["SPLIT_D"], D]. With `logits`
    the kernels route themselves (and gate/up writes `indices` and `weights_out`); otherwise they read
    `indices`."""
    N, D = x_words.shape
    E, I = mlp1_blocks.shape[0], mlp1_blocks.shape[1] // 2
    split_d = cfg["SPLIT_D"]
    S = N * k
    parts = _parts_buffer(out, S, split_d, D, x_words.device)
    if S == 0:
        return parts
    actw = torch.empty(S, I, device=x_words.device, dtype=torch.float32)  # SwiGLU outputs in word order
    words1, words2 = _as_words("mlp1", mlp1_blocks), _as_words("mlp2", mlp2_blocks)
    routed = logits is not None
    logits = logits if routed else x_words  # placeholders for pointers a kernel never reads
    reroute = reroute_mask if reroute_mask is not None else logits
    zero = zero_mask if zero_mask is not None else logits
    weights_out = weights_out if weights_out is not None else logits
    flags = dict(K_ACT=k, K_P2=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(E), ROUTED=routed,
                 HAS_REROUTE=reroute_mask is not None, HAS_ZERO=zero_mask is not None, PDL=use_pdl(pdl, x_words),
                 launch_pdl=use_pdl(pdl, x_words))
    _gate_up_gemv_kernel[(S, triton.cdiv(I, cfg["BLOCK_I"]))](
        x_words, indices, logits, reroute, zero, weights_out, words1, mlp1_scales, mlp1_bias, actw,
        D, I, E, x_words.stride(0), words1.stride(0), words1.stride(1), mlp1_scales.stride(0),
        mlp1_scales.stride(1), mlp1_bias.stride(0), actw.stride(0), float(limit), float(alpha),
        BLOCK_I=cfg["BLOCK_I"], GROUPS=cfg["GROUPS_I"], num_warps=cfg["WARPS_I"], **flags,
    )
    _down_gemv_kernel[(S, triton.cdiv(D, cfg["BLOCK_D"]), split_d)](
        actw, indices, logits, reroute, zero, words2, mlp2_scales, mlp2_bias, parts,
        D, I, E, actw.stride(0), words2.stride(0), words2.stride(1), mlp2_scales.stride(0), mlp2_scales.stride(1),
        mlp2_bias.stride(0), parts.stride(0),
        BLOCK_D=cfg["BLOCK_D"], GROUPS=cfg["GROUPS_D"], num_warps=cfg["WARPS_D"], PREFETCH=cfg["PREFETCH_D"],
        SPLIT=split_d, **flags,
    )
    return parts


def moe_decode_parts(
    x_words: torch.Tensor, topk_indices: torch.Tensor,
    mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, *, out: torch.Tensor | None = None, blocks: dict | None = None,
) -> torch.Tensor:
    """The decode kernels up to each chosen expert's output: x_words [N, D] (`input_words(x)`), topk_indices
    [N, k] -> fp32 [N * k * splits, D], splits = DECODE_BLOCKS["SPLIT_D"] (or `blocks`): the down projection's
    reduction is split that many ways, and row (n * k + j) * splits + s holds part s of expert
    topk_indices[n, j]'s output on token n (its bias in part 0), not yet weighted. `moe_experts` sums these with
    the routing weights; `add_rms_norm(weights=...)` does it as part of the residual update, costing no launch of
    its own."""
    _check_decode_inputs(x_words, mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales)
    N = x_words.shape[0]
    check(topk_indices.dim() == 2 and topk_indices.shape[0] == N and not topk_indices.is_floating_point(),
          f"topk_indices must be integers [N={N}, k], got {topk_indices.dtype} {tuple(topk_indices.shape)}")
    check_same_device(x_words=x_words, topk_indices=topk_indices, mlp1_blocks=mlp1_blocks, mlp2_blocks=mlp2_blocks)
    cfg = {**DECODE_BLOCKS, **(blocks or {})}
    return _launch_decode(x_words, topk_indices.contiguous(), None, None, None, None, topk_indices.shape[1],
                          mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit, alpha,
                          out, cfg, False)


def moe_decode_routed(
    x_words: torch.Tensor, router_logits: torch.Tensor, k: int,
    mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, reroute_mask: torch.Tensor | None = None,
    zero_mask: torch.Tensor | None = None, *, indices_out: torch.Tensor | None = None,
    weights_out: torch.Tensor | None = None, out: torch.Tensor | None = None, blocks: dict | None = None,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route` and `moe_decode_parts` in the same two launches: router_logits [N, E] (contiguous; what
    `add_rms_norm(router=...)` writes) -> (parts fp32 [N * k * splits, D], indices int64 [N, k], weights fp32
    [N, k]), the parts laid out as `moe_decode_parts` lays them out.

    Every program chooses its slot's expert from the logits itself (`routing.top_k_softmax`, the choice `route`
    makes, masks included), which spares the decoder a routing launch. `indices_out`/`weights_out` receive the
    routing (CUDA graph buffers). Torch twin: `route_reference`, then `ossscope.ops.moe_experts(per_expert=True)`.
    """
    _check_decode_inputs(x_words, mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales)
    N = x_words.shape[0]
    E = mlp1_blocks.shape[0]
    check(tuple(router_logits.shape) == (N, E) and router_logits.is_contiguous(),
          f"router_logits must be contiguous [N={N}, E={E}], got {tuple(router_logits.shape)}")
    check_float("router_logits", router_logits)
    check_routing(E, k, reroute_mask, zero_mask)
    indices, weights = _routing_outputs(N, k, x_words.device, indices_out, weights_out)
    check_same_device(x_words=x_words, router_logits=router_logits, mlp1_blocks=mlp1_blocks,
                      reroute_mask=reroute_mask, zero_mask=zero_mask, indices_out=indices, weights_out=weights)
    cfg = {**DECODE_BLOCKS, **(blocks or {})}
    parts = _launch_decode(x_words, indices, router_logits, reroute_mask, zero_mask, weights, k, mlp1_blocks,
                           mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit, alpha, out, cfg,
                           pdl)
    return parts, indices, weights


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
    graph): bf16 on fp8 tensor cores where the GPU has them (`moe_tc`), else on CUDA cores. Larger inputs group
    the slots by expert first and run the tensor-core GEMMs. Neither path waits for the GPU (no
    host-synchronizing op), so prefill queues the next layers while this one runs.
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
    if N == 0:
        return (y, expert_out) if per_expert else y
    if S <= GEMV_MAX_SLOTS:
        from . import moe_tc  # imports this module

        if moe_tc.available(x):  # bf16 on fp8 tensor cores
            parts, _, _ = moe_tc.moe_decode_slices(moe_tc.input_slices(x), topk_indices, mlp1_blocks, mlp1_scales,
                                                   mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit, alpha,
                                                   blocks=blocks)
        else:
            parts = moe_decode_parts(input_words(x), topk_indices, mlp1_blocks, mlp1_scales, mlp1_bias,
                                     mlp2_blocks, mlp2_scales, mlp2_bias, limit, alpha, blocks=blocks)
        _combine_kernel[(N, triton.cdiv(D, 1024))](
            parts, topk_weights, y, expert_out, D, parts.stride(0), y.stride(0),
            K_ACT=k, K_POW2=triton.next_power_of_2(k), BLOCK=1024, PER_EXPERT=per_expert,
            SPLIT=parts.shape[0] // (N * k),
        )
        return (y, expert_out) if per_expert else y
    cfg = {**PREFILL_BLOCKS, **(blocks or {})}
    ieee = x.dtype == torch.float32
    w1 = (mlp1_blocks.stride(0), mlp1_blocks.stride(1), mlp1_scales.stride(0), mlp1_scales.stride(1),
          mlp1_bias.stride(0))
    w2 = (mlp2_blocks.stride(0), mlp2_blocks.stride(1), mlp2_scales.stride(0), mlp2_scales.stride(1),
          mlp2_bias.stride(0))
    row_slot, block_expert = group_by_expert(topk_indices, E, cfg["BLOCK_M"])
    n_blocks = block_expert.shape[0]
    act = torch.empty(row_slot.shape[0], I, device=x.device, dtype=x.dtype)  # grouped, padded rows
    _gate_up_grouped_kernel[(n_blocks, triton.cdiv(2 * I, cfg["BLOCK_N1"]))](
        x, row_slot, block_expert, mlp1_blocks, mlp1_scales, mlp1_bias, act,
        D, I, x.stride(0), *w1, act.stride(0), float(limit), float(alpha),
        K_ACT=k, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K"], IEEE=ieee,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # Each slot's unweighted output to its own fp32 row, then the weighted sum over k in a fixed order (the
    # combine kernel): fp32 atomics would add the k outputs in whatever order the programs finish, so the same
    # prompt could round differently run to run and, at a router near-tie, pick other experts downstream.
    parts = torch.empty(S, D, device=x.device, dtype=torch.float32)
    _down_grouped_kernel[(n_blocks, triton.cdiv(D, cfg["BLOCK_N2"]))](
        act, row_slot, block_expert, mlp2_blocks, mlp2_scales, mlp2_bias, parts, D, I, act.stride(0), *w2,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K"], IEEE=ieee,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _combine_kernel[(N, triton.cdiv(D, 1024))](
        parts, topk_weights, y, expert_out, D, parts.stride(0), y.stride(0),
        K_ACT=k, K_POW2=triton.next_power_of_2(k), BLOCK=1024, PER_EXPERT=per_expert, SPLIT=1,
    )
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
