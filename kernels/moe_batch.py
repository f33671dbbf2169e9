"""MoE decode for batches: route, group the (token, choice) slots by expert, and read each expert once.

The per-slot decode kernels (kernels/moe.py `moe_decode_routed`, kernels/moe_tc.py `moe_decode_slices`) stream an
expert's weights once for every slot that chose it: at batch B the MoE reads about B * k experts' bytes instead of
the (at most E) distinct experts the batch uses, and decode stops scaling (2,265 tok/s at B = 64 on an H200, 2,336
at B = 128). Here a decode step's slots are grouped by expert as in prefill, and each expert's weight tiles are
multiplied on the tensor cores with all its tokens at once, in row blocks of BLOCK_M (16 or 32: a decode batch
gives each expert only ~N*k/E tokens, so prefill's 128 would waste most of each tile).

Three launches per layer, none waiting on the host (CUDA-graph capturable):
1. `_route_group_kernel`, one program: the routing of every token (`routing.top_k_softmax`, the choice `route` and
   `moe_decode_routed` make, masks included) into `indices_out` / `weights_out`, then the grouping that
   `moe.group_by_expert` does (row_slot, block_expert, blocks padded to BLOCK_M, token order within an expert).
   At decode sizes (N * k <= a few hundred slots, E <= 1024) one program does it in a few microseconds, and one
   launch replaces group_by_expert's dozen torch ops.
2. `moe._gate_up_grouped_kernel` (the prefill kernel, new block sizes): x [N, D] rows gathered per block, SwiGLU.
3. `moe._down_grouped_kernel`: each slot's unweighted expert output (bias included) to its own fp32
   row, n * k + j, with no atomics: the layout of `moe_decode_parts` with one split, so the decoder's residual
   norm sums it with the routing weights (`add_rms_norm(weights=...)`), as it does for the per-slot path.
The grid is the worst case, cdiv(N * k, BLOCK_M) + min(E, N * k) row blocks; unused blocks exit at once.

Weight decode (`decode=`): at BLOCK_M 16-32 these kernels are bound by decoding weights on the CUDA cores, not by
memory (an H200 at N = 64: 401 us a layer, 1.06 TB/s). "dequant" is the prefill's `moe._dequant_tile`, about 10
operations per code (nibble split, e2m1_to_f32 through fp16 bits, an fp32 scale multiply, a bf16 convert, and
the join/permute that puts features back in order). "direct" (`moe._direct_tile`, the default for bf16 on a GPU)
writes each code's bits straight into a bf16 and folds the block scale in with one packed FMA per two codes: 2.5
operations per code, exact (the notes above `moe._direct_codes`), the low nibbles multiplying the even input
features and the high nibbles the odd ones. fp32 models keep "dequant"; fp16 runs "direct" only when asked (its
scale range is narrow, codes 105..128); in Triton's interpreter "direct" takes plain Triton ops (no assembly).
OSSSCOPE_MOE_GROUPED=dequant switches the default off (e.g. if a GPU's check against the twin fails).

"fp8" (opt-in, bf16 only; untimed: never the default until a GPU sweep says so) runs both grouped matmuls on fp8
tensor cores as kernels/moe_tc.py does for one slot (read its notes): codes moved to e4m3 bytes (2**-6 exact,
`moe_tc._e4m3_codes`), inputs as 4 fixed-point slices per 32-feature group, every MMA sum exact. moe_tc's
block-diagonal input (N = 4 * 8 columns per token) would spend 8x the MMA work once many tokens share a weight
tile, so here each dot is ONE group: weights [BLOCK_N, K = 32] (fp8 MMA's native K) times the slices of the
block's tokens [32, N = 4 * BLOCK_M] (column p * BLOCK_M + m: slice p of token m). Each column's 32 products share
one weight scale and one input factor, so the exact sum is then combined and scaled in fp32: t = sum_p S_p * c[p, m]
with c = 2**(h + 3 - 4p) per (token, group), acc += t * 2**(s - 127) per (row, group) (`_fp8_grouped_matmul`).
Inputs: h goes through `moe_tc.input_slices(tile_groups=1)` (one launch, [N, 4, D] fp8: moe_tc's slice format
with one group per tile, so each group's 32 bytes per slice are contiguous and no zeros are stored); gate/up's
epilogue writes each slot's SwiGLU output with `moe_tc.store_slices` ([N * k, 4, I], row = slot), which down reads.
Static buffers, the same worst-case grid, unused blocks exit: graph-capturable like the other decodes.
Instruction count per weight code per row block (thread instructions, the notes' unit; sm_90 estimate, not
compiled yet): decode ~1 on the integer pipe (9 PTX ops per 4 bytes = 8 codes, fewer after LOP3 fusion; the two
outputs are already the MMA's A registers: low codes k = 4t..4t+3, high codes k = 16 + 4t..), MMA 4 * BLOCK_M / 128
(m16n8k32: 4096 products each), and the epilogue 5 fp32 operations per (row, token, group) = 5 * BLOCK_M / 32 per
code, on the FMA pipe; plus ~0.3-0.5 for loads, scales (prefetched a group ahead) and addresses. BLOCK_M 16:
~1 + 0.5 + 2.5 + 0.4 = 4.4 per code, ALU ~1.2 (direct: 4.4, ALU 2.7, ALU-bound); BLOCK_M 8: ~2.9. The epilogue, not
the decode, is the cost and it grows with BLOCK_M, while smaller blocks re-decode the weights of an expert with
more tokens: per expert with c tokens, cdiv(c, BLOCK_M) * (1.4 + 0.19 * BLOCK_M) per code. Hence BLOCK_M 8 up to
~4 slots per expert (N <= 32 at the 20b shape), 16 above (`grouped_blocks`; 8 also keeps each thread's MMA
columns for all 4 slices in its own registers), BLOCK_N 128 (the [128, 64] fp32 dot result is 64 registers a
thread at 4 warps; the slices read per group, 4 * BLOCK_M * 32 bytes from L2, are then at most the weights'
16 * BLOCK_N).

Torch twin: `routing.route_reference`, then `ossscope.ops.moe_experts(per_expert=True)`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import moe_tc
from ._common import check, check_float, check_runnable, check_same_device, interpreting
from .moe import (
    DIRECT_X,
    _check_decode_weights,
    _direct_tile,
    _down_grouped_kernel,
    _gate_up_grouped_kernel,
    _routing_outputs,
)
from .routing import check_routing, top_k_softmax

# Tile sizes of the grouped decode per weight decode; `blocks=` overrides any of them. BLOCK_M is chosen per call
# from the slots per expert (`grouped_blocks`) unless given. Measured on an H200 (scripts/moe_batch_sweep.py, 20b
# shape, us per layer at N = 16 / 32 / 64 / 128 tokens): "direct" with BLOCK_N 128, BLOCK_K 64 took 241 / 276 /
# 288 / 369 against 265 / 301 / 320 / 450 with dequant's BLOCK_N 64, BLOCK_K 128 (BK 256 and 8 warps were
# slower); dequant's tiles are its best of that sweep. The direct kernels' flags (docs/notes/moe_batch_decode.md):
# PREFETCH_S (each step's scales read a step ahead) is on: 235 / 257 / 274 / 338 us against 246 / 274 / 291 / 369
# without it (2026-12-04 sweep). SPLIT_X (inputs split into even and odd features once per layer) was slower at
# every N (318 against 291 at N = 64) and stays off; so does BLOCK_N2 64 (no better with PREFETCH_S at 64, worse
# at 128).
GROUPED_BLOCKS = {
    "dequant": {"BLOCK_N1": 64, "BLOCK_N2": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    "direct": {"BLOCK_N1": 128, "BLOCK_N2": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3,
               "SPLIT_X": False, "PREFETCH_S": True},
    # Untimed (module notes): BLOCK_N 128 keeps the dot's [128, 4 * BLOCK_M] fp32 result at 64 registers a thread
    # (BLOCK_M 16, 4 warps) and the slices read per group no larger than the weights.
    "fp8": {"BLOCK_N1": 128, "BLOCK_N2": 128, "num_warps": 4, "num_stages": 3},
}
ROUTE_TOKENS = 32  # tokens per step of the routing program's loops


def grouped_blocks(slots: int, experts: int, blocks: dict | None = None, decode: str = "direct") -> dict:
    """The grouped decode's tile sizes for `slots` (token, choice) slots over `experts` experts with weight decode
    `decode`: GROUPED_BLOCKS[decode] updated by `blocks`, and BLOCK_M (unless given) about twice the mean slots
    per expert (routing is uneven), a power of two in 16..64 (tl.dot needs M >= 16); for "fp8", in 8..16 (its
    epilogue costs grow with BLOCK_M: module notes)."""
    cfg = {**GROUPED_BLOCKS[decode], **(blocks or {})}
    if "BLOCK_M" not in cfg:
        lo, hi = (8, 16) if decode == "fp8" else (16, 64)
        cfg["BLOCK_M"] = min(hi, max(lo, triton.next_power_of_2(triton.cdiv(2 * slots, experts))))
    return cfg


def default_decode(h: torch.Tensor) -> str:
    """The weight decode `moe_decode_grouped` uses for inputs like h (module notes): "direct" for bf16 on a GPU
    unless OSSSCOPE_MOE_GROUPED=dequant, else "dequant"."""
    if h.dtype == torch.bfloat16 and h.is_cuda and os.environ.get("OSSSCOPE_MOE_GROUPED", "") != "dequant":
        return "direct"
    return "dequant"


def max_row_blocks(slots: int, experts: int, block_m: int) -> int:
    """The most row blocks any routing of `slots` slots can need: every used expert (at most min(E, slots)) may
    leave one block partly filled."""
    return triton.cdiv(slots, block_m) + min(experts, slots)


@triton.jit
def _route_group_kernel(
    logits_ptr, reroute_ptr, zero_ptr, idx_ptr, wts_ptr, row_slot_ptr, block_expert_ptr, N, E, n_rows, n_blocks,
    K_ACT: tl.constexpr, K_P2: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_REROUTE: tl.constexpr, HAS_ZERO: tl.constexpr,
):
    """One program: route every token, count slots per expert, lay the slots out by expert (kernel notes above).

    row_slot [n_rows] int32 (slot n * k + j or -1), block_expert [n_blocks] int32 (expert or -1), as
    `moe.group_by_expert` lays them out."""
    experts = tl.arange(0, BLOCK_E)
    kcol = tl.arange(0, K_P2)
    # Pass 1: the routing (stored), and how many slots chose each expert.
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for t0 in range(0, N, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        tmask = tokens < N
        logits = tl.load(logits_ptr + tokens[:, None] * E + experts[None, :],
                         mask=tmask[:, None] & (experts < E)[None, :], other=float("-inf")).to(tl.float32)
        chosen, weights = top_k_softmax(logits, reroute_ptr, zero_ptr, E, K_ACT, K_P2, HAS_REROUTE, HAS_ZERO)
        smask = tmask[:, None] & (kcol < K_ACT)[None, :]  # [BLOCK_T, K_P2]: real slots
        offs = tokens[:, None] * K_ACT + kcol[None, :]
        tl.store(idx_ptr + offs, chosen.to(idx_ptr.dtype.element_ty), mask=smask)
        tl.store(wts_ptr + offs, weights, mask=smask)
        hit = (chosen[:, :, None] == experts[None, None, :]) & smask[:, :, None]  # [BLOCK_T, K_P2, BLOCK_E]
        counts += tl.sum(tl.sum(hit.to(tl.int32), axis=1), axis=0)
    # Each expert's run of blocks: first_block[e] .. first_block[e] + cdiv(counts[e], BLOCK_M) - 1.
    n_exp_blocks = (counts + BLOCK_M - 1) // BLOCK_M  # [BLOCK_E], 0 past E
    block_end = tl.cumsum(n_exp_blocks, axis=0)
    first_block = block_end - n_exp_blocks
    for b0 in range(0, n_blocks, BLOCK_R):
        blk = b0 + tl.arange(0, BLOCK_R)
        # the expert of block b: how many experts' runs end at or before it (E for blocks past the last run)
        owner = tl.sum(((block_end[None, :] <= blk[:, None]) & (experts < E)[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blk, tl.where(owner < E, owner, -1), mask=blk < n_blocks)
    for r0 in range(0, n_rows, BLOCK_R):  # every row padding first; pass 2 then fills the used ones
        rows = r0 + tl.arange(0, BLOCK_R)
        tl.store(row_slot_ptr + rows, tl.full([BLOCK_R], -1, dtype=tl.int32), mask=rows < n_rows)
    tl.debug_barrier()  # the padding is written (by all threads) before any row is filled below
    # Pass 2: each slot's row, first_block[e] * BLOCK_M + its rank among the slots of expert e (token order). The
    # routing is recomputed rather than read back (no barrier needed, and it is cheap).
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)  # slots of each expert placed so far
    for t0 in range(0, N, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        tmask = tokens < N
        logits = tl.load(logits_ptr + tokens[:, None] * E + experts[None, :],
                         mask=tmask[:, None] & (experts < E)[None, :], other=float("-inf")).to(tl.float32)
        chosen, _ = top_k_softmax(logits, reroute_ptr, zero_ptr, E, K_ACT, K_P2, HAS_REROUTE, HAS_ZERO)
        smask = tmask[:, None] & (kcol < K_ACT)[None, :]
        slot = tl.reshape(tokens[:, None] * K_ACT + kcol[None, :], [BLOCK_T * K_P2])  # slot order = token order
        hit = ((chosen[:, :, None] == experts[None, None, :]) & smask[:, :, None]).to(tl.int32)
        hit = tl.reshape(hit, [BLOCK_T * K_P2, BLOCK_E])  # [slots, BLOCK_E]: one-hot expert of each real slot
        before = tl.cumsum(hit, axis=0) - hit  # [slots, BLOCK_E]: earlier slots of this tile on each expert
        rank = tl.sum(hit * (before + seen[None, :]), axis=1)
        start = tl.sum(hit * first_block[None, :], axis=1) * BLOCK_M
        valid = tl.sum(hit, axis=1) > 0
        tl.store(row_slot_ptr + start + rank, slot, mask=valid)
        seen += tl.sum(hit, axis=0)


@triton.jit
def _direct_dequantize_kernel(b_ptr, s_ptr, out_ptr, rows, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                              dtype: tl.constexpr, X: tl.constexpr, ASM: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    k0 = tl.program_id(1) * BLOCK_K
    low, high = _direct_tile(b_ptr, s_ptr, r, rmask, k0, K, K // 2, K // 32, BLOCK_K, dtype, X, ASM)
    i = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    m = rmask[:, None] & (i < K // 2)[None, :]
    at = out_ptr + r[:, None] * K + 2 * i[None, :]
    tl.store(at, low.to(tl.float32) * 2.0**X, mask=m)
    tl.store(at + 1, high.to(tl.float32) * 2.0**X, mask=m)


def direct_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                      asm: bool | None = None) -> torch.Tensor:
    """The "direct" decoder on its own (for checks): blocks uint8 [R, G, 16], scales uint8 [R, G] -> fp32
    [R, G * 32], the weights `moe._direct_tile` gives the dot (in `dtype`), times 2**X back. Equals
    `ossscope.mxfp4.dequantize` for scale codes in the format's range. asm: the GPU's inline assembly (bf16; the
    default on a GPU) or plain Triton."""
    check(blocks.dtype == torch.uint8 and scales.dtype == torch.uint8 and blocks.dim() == 3
          and blocks.shape[2] == 16 and tuple(scales.shape) == tuple(blocks.shape[:2]),
          f"need blocks uint8 [R, G, 16] and scales uint8 [R, G], got {tuple(blocks.shape)}, {tuple(scales.shape)}")
    check(dtype in (torch.bfloat16, torch.float16), f"dtype must be bfloat16 or float16, got {dtype}")
    check_runnable(blocks)
    asm = (dtype == torch.bfloat16 and not interpreting()) if asm is None else asm
    blocks, scales = blocks.contiguous(), scales.contiguous()
    R, G = scales.shape
    out = torch.empty(R, G * 32, device=blocks.device, dtype=torch.float32)
    name = str(dtype).removeprefix("torch.")
    if R and G:
        _direct_dequantize_kernel[(triton.cdiv(R, 16), triton.cdiv(G, 2))](
            blocks, scales, out, R, G * 32, BLOCK_R=16, BLOCK_K=64, dtype=getattr(tl, name), X=DIRECT_X[name],
            ASM=asm)
    return out


def direct_reference(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Torch twin of the "direct" decode's bit trick, step by step: blocks uint8 [..., G, 16], scales uint8
    [..., G] -> the 16-bit weights [..., G * 32] in `dtype` that the dot multiplies (the MXFP4 values times
    2**-X), features in order."""
    bf16 = dtype == torch.bfloat16
    man, bias, X = (6, 127, DIRECT_X["bfloat16"]) if bf16 else (9, 15, DIRECT_X["float16"])
    w = blocks.to(torch.int32)
    low = ((w & 7) << man) | ((w & 8) << 12)  # v * 2**(1 - bias): the 3 magnitude bits, the sign at bit 15
    high = ((w & 0x70) << (man - 4)) | ((w & 0x80) << 8)
    codes = torch.stack([low, high], dim=-1).flatten(-2)  # [..., G, 32]: features 2i, 2i + 1
    as16 = (codes - ((codes >> 15) << 16)).to(torch.int16).view(dtype)  # the same 16 bits (signed)
    field = scales.to(torch.int32) + (2 * bias - 128 - X)  # M = 2**(s - 128 + 2 bias - X)
    mult = (field << (man + 1)).to(torch.int16).view(dtype)
    return (as16 * mult[..., None]).flatten(-2)


# -- decode="fp8": the grouped kernels on fp8 tensor cores (notes in the module docstring) -------------------


@triton.jit
def _fp8_scales(s_base, xe_ptr, in_row, valid, cols, cmask, g, n_run, stride_xe, stride_sr, P: tl.constexpr):
    """Group g's factors (zeros at g >= n_run): ws [BLOCK_N] = 2**(s - 127) from the weight rows' scale codes, and
    c [P, BLOCK_M] = 2**(h + 3 - 4 p) from the input rows' exponents (xe = h + 3), so that ws * c is the
    2**(s - 124 + h - 4 p) that turns slice p's exact sum into a value (moe_tc's factor times 16**-p)."""
    # (masks built as vectors: the interpreter rejects a scalar condition in them)
    s = tl.load(s_base + cols * stride_sr + g, mask=cmask & (cols * 0 + g < n_run), other=0).to(tl.int32)
    ws = (s << 23).to(tl.float32, bitcast=True)  # the fp32 with exponent field s: 2**(s - 127), 0 for s = 0
    xe = tl.load(xe_ptr + in_row * stride_xe + g, mask=valid & (in_row * 0 + g < n_run), other=0)
    c = ((xe[None, :] + (127 - 4 * tl.arange(0, P))[:, None]) << 23).to(tl.float32, bitcast=True)
    return ws, c


@triton.jit
def _fp8_grouped_matmul(bt_ptr, xe_ptr, in_row, valid, w_base, s_base, cols, cmask, n_run, row_len, stride_bt,
                        stride_xe, stride_wr, stride_sr, BLOCK_M: tl.constexpr, P: tl.constexpr,
                        ASM: tl.constexpr):
    """Input rows `in_row` (valid [BLOCK_M]; their slices in the compact form, `moe_tc.new_slices(tile_groups=1)`,
    rows row_len long) times the packed weight rows `cols` (cmask [BLOCK_N]) over groups 0..n_run-1 (n_run is
    K / 32, or 0 for an unused block) -> [BLOCK_M, BLOCK_N] fp32.

    One dot per 32-feature group: a [BLOCK_N, 32] (the group's e4m3 codes, low nibbles then high, the bytes'
    order) times the slices [32, P * BLOCK_M] (column p * BLOCK_M + m: slice p of row m, its even features then
    its odd ones, matching the codes): each column's 32 products share one weight scale and one input factor, so
    the sum is exact (moe_tc's argument), and the factors are applied to it in fp32.
    """
    BLOCK_N: tl.constexpr = cols.shape[0]
    p = tl.arange(0, P)
    # [P * BLOCK_M] pointers to each dot column's slice row (p-major, so that a thread of the MMA layout holds
    # all P columns of its tokens and the combination below needs no shuffles, for BLOCK_M >= 8)
    x_rows = tl.reshape(bt_ptr + in_row.to(tl.int64)[None, :] * stride_bt + p[:, None] * row_len, [P * BLOCK_M])
    x_ok = tl.reshape(valid[None, :] & (p >= 0)[:, None], [P * BLOCK_M])
    f = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # The factors are read a group ahead: one byte a row, too small for the asynchronous copies that pipeline the
    # weights and slices, they would otherwise wait out a memory latency every group.
    ws_next, c_next = _fp8_scales(s_base, xe_ptr, in_row, valid, cols, cmask, 0, n_run, stride_xe, stride_sr, P)
    for g in range(0, n_run):
        ws, c = ws_next, c_next
        ws_next, c_next = _fp8_scales(s_base, xe_ptr, in_row, valid, cols, cmask, g + 1, n_run, stride_xe,
                                      stride_sr, P)
        b = tl.load(w_base + cols[:, None] * stride_wr + g * 16 + tl.arange(0, 16)[None, :], mask=cmask[:, None],
                    other=0)  # [BLOCK_N, 16] bytes: the group's 32 codes
        low, high = moe_tc._e4m3_codes(b, ASM)
        a = tl.reshape(tl.permute(tl.join(low, high), (0, 2, 1)), [BLOCK_N, 32]).to(tl.float8e4nv, bitcast=True)
        x = tl.load(x_rows[:, None] + g * 32 + f[None, :], mask=x_ok[:, None], other=0.0)  # [P * BLOCK_M, 32]
        sums = tl.dot(a, tl.trans(x))  # [BLOCK_N, P * BLOCK_M], exact integers (in units of 2**-7)
        # The epilogue, 5 fp32 operations per (row, token): 4 to combine the slices, 1 to scale and add.
        t = tl.sum(tl.reshape(sums, [BLOCK_N, P, BLOCK_M]) * c[None, :, :], axis=1)  # [BLOCK_N, BLOCK_M]
        acc += t * ws[:, None]
    return tl.trans(acc)


@triton.jit
def _gate_up_fp8_kernel(
    bt_ptr, xe_ptr, row_slot_ptr, block_expert_ptr, w_ptr, s_ptr, b_ptr, act_bt_ptr, act_xe_ptr,
    D, I, stride_bt, stride_xe, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_abt, stride_axe,
    limit, alpha,
    K_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P: tl.constexpr, ASM: tl.constexpr,
):
    """`moe._gate_up_grouped_kernel` on fp8 tensor cores: x's slices in, each slot's SwiGLU output out as slices
    (compact form, row = slot), BLOCK_N / 64 groups of 32 units per program."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # mlp1 rows: gate and linear units interleaved
    cmask = cols < 2 * I
    block_expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)  # -1: an unused block (no valid row)
    expert = tl.maximum(block_expert, 0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    token = tl.where(valid, slot // K_ACT, 0)
    n_run = tl.where(block_expert >= 0, D // 32, 0)  # no iterations for an unused block
    acc = _fp8_grouped_matmul(bt_ptr, xe_ptr, token, valid, w_ptr + expert * stride_we, s_ptr + expert * stride_se,
                              cols, cmask, n_run, D, stride_bt, stride_xe, stride_wr, stride_sr, BLOCK_M, P, ASM)
    acc += tl.load(b_ptr + expert * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    gate, lin = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # even columns gate, odd linear
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    h = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    h = h.to(b_ptr.dtype.element_ty).to(tl.float32)  # rounded to the model's dtype, as the reference does
    # [BLOCK_M, GPT] (slot, group) pairs flattened, each group's 32 units written as slices (moe_tc.store_slices
    # with per-pair row pointers, tile_groups 1)
    GPT: tl.constexpr = BLOCK_N // 64
    grp = tl.program_id(1) * GPT + tl.arange(0, GPT)
    safe = tl.where(valid, slot, 0).to(tl.int64)
    pairs = tl.reshape(safe[:, None] + 0 * grp[None, :], [BLOCK_M * GPT])
    pair_grp = tl.reshape(grp[None, :] + 0 * rows[:, None], [BLOCK_M * GPT])
    pair_ok = tl.reshape(valid[:, None] & (grp < I // 32)[None, :], [BLOCK_M * GPT])
    moe_tc.store_slices((act_bt_ptr + pairs * stride_abt)[:, None], act_xe_ptr + pairs * stride_axe,
                        tl.reshape(h, [BLOCK_M * GPT, 32]), pair_grp, pair_ok, I, P, 1)


@triton.jit
def _down_fp8_kernel(
    act_bt_ptr, act_xe_ptr, row_slot_ptr, block_expert_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    D, I, stride_abt, stride_axe, stride_we, stride_wr, stride_se, stride_sr, stride_be,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P: tl.constexpr, ASM: tl.constexpr,
):
    """`moe._down_grouped_kernel` on fp8 tensor cores: each slot's SwiGLU slices in, its unweighted
    output (bias included) to parts row `slot`."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    cmask = cols < D
    block_expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    expert = tl.maximum(block_expert, 0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    safe = tl.where(valid, slot, 0)
    n_run = tl.where(block_expert >= 0, I // 32, 0)
    acc = _fp8_grouped_matmul(act_bt_ptr, act_xe_ptr, safe, valid, w_ptr + expert * stride_we,
                              s_ptr + expert * stride_se, cols, cmask, n_run, I, stride_abt, stride_axe, stride_wr,
                              stride_sr, BLOCK_M, P, ASM)
    out = acc + tl.load(b_ptr + expert * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + safe.to(tl.int64)[:, None] * D + cols[None, :], out, mask=valid[:, None] & cmask[None, :])


def _fp8_grouped(h, k, I, packed, limit, alpha, parts, row_slot, block_expert, n_blocks, cfg, act_slices):
    """decode="fp8" after the routing kernel: h's slices, then the two fp8 kernels (moe_decode_grouped)."""
    mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias = packed
    D = h.shape[1]
    BM, BN1, BN2 = cfg["BLOCK_M"], cfg["BLOCK_N1"], cfg["BLOCK_N2"]
    check(BN1 % 64 == 0 and BN2 >= 16, f"decode='fp8' needs BLOCK_N1 a multiple of 64 (whole groups of SwiGLU "
          f"units) and BLOCK_N2 >= 16, got {BN1}, {BN2}")
    check(BM >= 4, f"decode='fp8' needs BLOCK_M >= 4 (the dot's N = {moe_tc.SLICES} * BLOCK_M >= 16), got {BM}")
    x_bt, x_xe = moe_tc.input_slices(h, tile_groups=1)  # [N, P, D] fp8, [N, D / 32] int32
    S = parts.shape[0]
    act_bt, act_xe = (moe_tc._check_slices("act_slices", act_slices, S, I, 1) if act_slices is not None
                      else moe_tc.new_slices(S, I, h.device, 1))
    asm = cfg.get("ASM", not interpreting())
    tiles = dict(BLOCK_M=BM, P=moe_tc.SLICES, ASM=asm, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _gate_up_fp8_kernel[(n_blocks, triton.cdiv(2 * I, BN1))](
        x_bt, x_xe, row_slot, block_expert, mlp1_blocks, mlp1_scales, mlp1_bias, act_bt, act_xe,
        D, I, x_bt.stride(0), x_xe.stride(0), mlp1_blocks.stride(0), mlp1_blocks.stride(1), mlp1_scales.stride(0),
        mlp1_scales.stride(1), mlp1_bias.stride(0), act_bt.stride(0), act_xe.stride(0), float(limit), float(alpha),
        K_ACT=k, BLOCK_N=BN1, **tiles,
    )
    _down_fp8_kernel[(n_blocks, triton.cdiv(D, BN2))](
        act_bt, act_xe, row_slot, block_expert, mlp2_blocks, mlp2_scales, mlp2_bias, parts,
        D, I, act_bt.stride(0), act_xe.stride(0), mlp2_blocks.stride(0), mlp2_blocks.stride(1),
        mlp2_scales.stride(0), mlp2_scales.stride(1), mlp2_bias.stride(0), BLOCK_N=BN2, **tiles,
    )


def moe_decode_grouped(
    h: torch.Tensor, router_logits: torch.Tensor, k: int,
    mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, reroute_mask: torch.Tensor | None = None,
    zero_mask: torch.Tensor | None = None, *, indices_out: torch.Tensor | None = None,
    weights_out: torch.Tensor | None = None, out: torch.Tensor | None = None, blocks: dict | None = None,
    decode: str | None = None, act_slices: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batched decode MoE in three launches: h [N, D] (the model's dtype: the MoE norm's output), router_logits
    [N, E] fp32 contiguous (what `add_rms_norm(router=...)` writes) -> (parts fp32 [N * k, D], indices int64
    [N, k], weights fp32 [N, k]).

    Routing as `moe_decode_routed` routes (same choice and ties; reroute_mask [E] bool: never chosen; zero_mask
    [E] bool: chosen, weight 0). parts row n * k + j is expert indices[n, j]'s output on token n, bias included,
    not yet weighted: `add_rms_norm(x, parts, ..., weights=weights)` forms the residual update, like the
    per-slot path's parts (one split). `indices_out`, `weights_out`, `out` receive the results (CUDA-graph
    buffers); `blocks` overrides tile sizes (`GROUPED_BLOCKS[decode]`, BLOCK_M from `grouped_blocks`; with
    "direct", also ASM: False for plain Triton instead of the inline assembly, and the flags SPLIT_X and
    PREFETCH_S: `moe._direct_matmul`; with "fp8", ASM). `decode`: "direct", "dequant" or "fp8" (bf16 only, on
    fp8 tensor cores; module notes; default `default_decode(h)`, never "fp8"). act_slices (decode="fp8"): the
    SwiGLU outputs' slices, `moe_tc.new_slices(N * k, I, device, tile_groups=1)` (new if None; row n * k + j
    is slot (n, j)'s after the call). No host sync.
    Torch twin: `routing.route_reference`, then `ossscope.ops.moe_experts(per_expert=True)`.
    """
    check(h.dim() == 2 and h.stride(1) == 1, f"h must be [N, D] with contiguous rows, got {tuple(h.shape)}")
    check_float("h", h)
    check_runnable(h)
    N, D = h.shape
    E, I = _check_decode_weights(D, mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales)
    check(tuple(mlp1_bias.shape) == (E, 2 * I) and tuple(mlp2_bias.shape) == (E, D)
          and mlp1_bias.stride(-1) == 1 and mlp2_bias.stride(-1) == 1,
          f"biases must be contiguous rows, mlp1 [{E}, {2 * I}] and mlp2 [{E}, {D}]")
    check(tuple(router_logits.shape) == (N, E) and router_logits.is_contiguous(),
          f"router_logits must be contiguous [N={N}, E={E}], got {tuple(router_logits.shape)}")
    check_float("router_logits", router_logits)
    check_routing(E, k, reroute_mask, zero_mask)
    indices, weights = _routing_outputs(N, k, h.device, indices_out, weights_out)
    S = N * k
    parts = out if out is not None else torch.empty(S, D, device=h.device, dtype=torch.float32)
    check(parts.dtype == torch.float32 and tuple(parts.shape) == (S, D) and parts.is_contiguous(),
          f"out must be contiguous float32 [{S}, {D}]")
    check_same_device(h=h, router_logits=router_logits, mlp1_blocks=mlp1_blocks, mlp2_blocks=mlp2_blocks,
                      reroute_mask=reroute_mask, zero_mask=zero_mask, indices_out=indices, weights_out=weights,
                      out=parts)
    decode = default_decode(h) if decode is None else decode
    check(decode in ("direct", "dequant", "fp8"), f"decode must be 'direct', 'dequant' or 'fp8', got {decode!r}")
    check(decode != "direct" or h.dtype in (torch.bfloat16, torch.float16),
          f"decode='direct' needs bf16 or fp16 inputs, got {h.dtype}")
    check(decode != "fp8" or h.dtype == torch.bfloat16,
          f"decode='fp8' needs bf16 inputs (4 slices hold 8 significant bits), got {h.dtype}")
    check(decode == "fp8" or act_slices is None, "act_slices is for decode='fp8'")
    if N == 0:
        return parts, indices, weights
    cfg = grouped_blocks(S, E, blocks, decode)
    check(decode == "direct" or not (cfg.get("SPLIT_X") or cfg.get("PREFETCH_S")),
          "SPLIT_X and PREFETCH_S are flags of decode='direct'")
    BM = cfg["BLOCK_M"]
    n_blocks = max_row_blocks(S, E, BM)
    row_slot = torch.empty(n_blocks * BM, device=h.device, dtype=torch.int32)  # filled by the routing kernel
    block_expert = torch.empty(n_blocks, device=h.device, dtype=torch.int32)
    placeholder = router_logits  # for mask pointers a kernel never reads
    _route_group_kernel[(1,)](
        router_logits, reroute_mask if reroute_mask is not None else placeholder,
        zero_mask if zero_mask is not None else placeholder, indices, weights, row_slot, block_expert,
        N, E, row_slot.shape[0], n_blocks,
        K_ACT=k, K_P2=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(E), BLOCK_T=ROUTE_TOKENS,
        BLOCK_M=BM, BLOCK_R=1024, HAS_REROUTE=reroute_mask is not None, HAS_ZERO=zero_mask is not None,
        num_warps=4,
    )
    if decode == "fp8":
        _fp8_grouped(h, k, I, (mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias), limit,
                     alpha, parts, row_slot, block_expert, n_blocks, cfg, act_slices)
        return parts, indices, weights
    act = torch.empty(n_blocks * BM, I, device=h.device, dtype=h.dtype)  # SwiGLU outputs, grouped rows (SPLIT_X:
    # each row's even units, then its odd ones)
    ieee = h.dtype == torch.float32
    direct = decode == "direct"
    asm = cfg.get("ASM", h.dtype == torch.bfloat16 and not interpreting()) if direct else False
    check(not asm or h.dtype == torch.bfloat16, "the direct decode's assembly is for bf16 (pass ASM=False)")
    split = bool(cfg.get("SPLIT_X", False))
    tiles = dict(BLOCK_M=BM, BLOCK_K=cfg["BLOCK_K"], IEEE=ieee, num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"], DIRECT=direct,
                 X=DIRECT_X[str(h.dtype).removeprefix("torch.")] if direct else 0, ASM=asm, SPLIT_X=split,
                 PREFETCH_S=bool(cfg.get("PREFETCH_S", False)))
    if split:  # x [N, D] -> [N, 2, D / 2] (even features, then odd): one copy a layer, N * D * 2 bytes
        h = h.view(N, D // 2, 2).transpose(1, 2).contiguous()
    # Grid (row blocks, column tiles): the row blocks of one expert sit next to each other in launch order, so
    # an expert with more than BLOCK_M tokens has its weight tile re-read from L2, not from memory.
    _gate_up_grouped_kernel[(n_blocks, triton.cdiv(2 * I, cfg["BLOCK_N1"]))](
        h, row_slot, block_expert, mlp1_blocks, mlp1_scales, mlp1_bias, act,
        D, I, h.stride(0), mlp1_blocks.stride(0), mlp1_blocks.stride(1), mlp1_scales.stride(0),
        mlp1_scales.stride(1), mlp1_bias.stride(0), act.stride(0), float(limit), float(alpha),
        K_ACT=k, BLOCK_N=cfg["BLOCK_N1"], **tiles,
    )
    _down_grouped_kernel[(n_blocks, triton.cdiv(D, cfg["BLOCK_N2"]))](
        act, row_slot, block_expert, mlp2_blocks, mlp2_scales, mlp2_bias, parts,
        D, I, act.stride(0), mlp2_blocks.stride(0), mlp2_blocks.stride(1), mlp2_scales.stride(0),
        mlp2_scales.stride(1), mlp2_bias.stride(0),
        BLOCK_N=cfg["BLOCK_N2"], **tiles,
    )
    return parts, indices, weights
