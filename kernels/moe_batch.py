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
3. `moe._down_grouped_kernel` with SUM=False: each slot's unweighted expert output (bias included) to its own fp32
   row, n * k + j, with no atomics: the layout of `moe_decode_parts` with one split, so the decoder's residual
   norm sums it with the routing weights (`add_rms_norm(weights=...)`), as it does for the per-slot path.
The grid is the worst case, cdiv(N * k, BLOCK_M) + min(E, N * k) row blocks; unused blocks exit at once.

Torch twin: `routing.route_reference`, then `ossscope.ops.moe_experts(per_expert=True)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_float, check_runnable, check_same_device
from .moe import _check_decode_weights, _down_grouped_kernel, _gate_up_grouped_kernel, _routing_outputs
from .routing import check_routing, top_k_softmax

# Tile sizes of the grouped decode; `blocks=` overrides any of them. BLOCK_M is chosen per call from the slots per
# expert (`grouped_blocks`) unless given. First guesses for an H200, to be settled by scripts/moe_batch_sweep.py:
# at BLOCK_M 16-32 the kernels are bound by decoding weight tiles on the CUDA cores, so tiles are narrow in N
# (more programs to spread the 32 experts' bytes over 132 SMs) and long in K (64 contiguous bytes a row).
GROUPED_BLOCKS = {"BLOCK_N1": 64, "BLOCK_N2": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
ROUTE_TOKENS = 32  # tokens per step of the routing program's loops


def grouped_blocks(slots: int, experts: int, blocks: dict | None = None) -> dict:
    """The grouped decode's tile sizes for `slots` (token, choice) slots over `experts` experts: BLOCK_M about
    twice the mean slots per expert (routing is uneven), a power of two in 16..64 (tl.dot needs M >= 16)."""
    cfg = {**GROUPED_BLOCKS, **(blocks or {})}
    if "BLOCK_M" not in cfg:
        cfg["BLOCK_M"] = min(64, max(16, triton.next_power_of_2(triton.cdiv(2 * slots, experts))))
    return cfg


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


def moe_decode_grouped(
    h: torch.Tensor, router_logits: torch.Tensor, k: int,
    mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, reroute_mask: torch.Tensor | None = None,
    zero_mask: torch.Tensor | None = None, *, indices_out: torch.Tensor | None = None,
    weights_out: torch.Tensor | None = None, out: torch.Tensor | None = None, blocks: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batched decode MoE in three launches: h [N, D] (the model's dtype: the MoE norm's output), router_logits
    [N, E] fp32 contiguous (what `add_rms_norm(router=...)` writes) -> (parts fp32 [N * k, D], indices int64
    [N, k], weights fp32 [N, k]).

    Routing as `moe_decode_routed` routes (same choice and ties; reroute_mask [E] bool: never chosen; zero_mask
    [E] bool: chosen, weight 0). parts row n * k + j is expert indices[n, j]'s output on token n, bias included,
    not yet weighted: `add_rms_norm(x, parts, ..., weights=weights)` forms the residual update, like the
    per-slot path's parts (one split). `indices_out`, `weights_out`, `out` receive the results (CUDA-graph
    buffers); `blocks` overrides tile sizes (`GROUPED_BLOCKS`, BLOCK_M from `grouped_blocks`). No host sync.
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
    if N == 0:
        return parts, indices, weights
    cfg = grouped_blocks(S, E, blocks)
    BM = cfg["BLOCK_M"]
    n_blocks = max_row_blocks(S, E, BM)
    row_slot = torch.empty(n_blocks * BM, device=h.device, dtype=torch.int32)  # filled by the routing kernel
    block_expert = torch.empty(n_blocks, device=h.device, dtype=torch.int32)
    act = torch.empty(n_blocks * BM, I, device=h.device, dtype=h.dtype)  # SwiGLU outputs, grouped rows
    placeholder = router_logits  # for mask pointers a kernel never reads
    _route_group_kernel[(1,)](
        router_logits, reroute_mask if reroute_mask is not None else placeholder,
        zero_mask if zero_mask is not None else placeholder, indices, weights, row_slot, block_expert,
        N, E, row_slot.shape[0], n_blocks,
        K_ACT=k, K_P2=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(E), BLOCK_T=ROUTE_TOKENS,
        BLOCK_M=BM, BLOCK_R=1024, HAS_REROUTE=reroute_mask is not None, HAS_ZERO=zero_mask is not None,
        num_warps=4,
    )
    ieee = h.dtype == torch.float32
    tiles = dict(K_ACT=k, BLOCK_M=BM, BLOCK_K=cfg["BLOCK_K"], IEEE=ieee, num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"])
    # Grid (row blocks, column tiles): the row blocks of one expert sit next to each other in launch order, so
    # an expert with more than BLOCK_M tokens has its weight tile re-read from L2, not from memory.
    _gate_up_grouped_kernel[(n_blocks, triton.cdiv(2 * I, cfg["BLOCK_N1"]))](
        h, row_slot, block_expert, mlp1_blocks, mlp1_scales, mlp1_bias, act,
        D, I, h.stride(0), mlp1_blocks.stride(0), mlp1_blocks.stride(1), mlp1_scales.stride(0),
        mlp1_scales.stride(1), mlp1_bias.stride(0), act.stride(0), float(limit), float(alpha),
        BLOCK_N=cfg["BLOCK_N1"], **tiles,
    )
    _down_grouped_kernel[(n_blocks, triton.cdiv(D, cfg["BLOCK_N2"]))](
        act, row_slot, block_expert, weights, mlp2_blocks, mlp2_scales, mlp2_bias, parts, parts,
        D, I, act.stride(0), mlp2_blocks.stride(0), mlp2_blocks.stride(1), mlp2_scales.stride(0),
        mlp2_scales.stride(1), mlp2_bias.stride(0),
        BLOCK_N=cfg["BLOCK_N2"], PER_EXPERT=True, SUM=False, **tiles,
    )
    return parts, indices, weights
