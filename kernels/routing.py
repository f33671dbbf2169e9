"""MoE routing: top-k of the router logits, softmax over the k chosen, with expert ablation masks.

Torch twin: `ossscope.ops.route` followed by the zero mask, exactly as `ossscope.model.MoE.forward` does it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_float, check_runnable, check_same_device


@triton.jit
def top_k_softmax(
    logits, reroute_ptr, zero_ptr, E, K_ACT: tl.constexpr, K_P2: tl.constexpr, HAS_REROUTE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
):
    """fp32 logits [T, BLOCK_E] (padding columns and rows -inf) -> (chosen int32 [T, K_P2], weights fp32 [T, K_P2]).

    Columns past K_ACT hold index 0 and weight 0. Shared by `route` and the decoder's MoE kernels, which route
    inside their own programs (kernels.moe.moe_decode_routed), so both choose identically.
    """
    BLOCK_E: tl.constexpr = logits.shape[1]
    cols = tl.arange(0, BLOCK_E)
    if HAS_REROUTE:  # a rerouted expert is never chosen: the next best takes its place
        rerouted = tl.load(reroute_ptr + cols, mask=cols < E, other=0) != 0
        logits = tl.where(rerouted[None, :], float("-inf"), logits)
    kcol = tl.arange(0, K_P2)
    chosen = tl.zeros([logits.shape[0], K_P2], dtype=tl.int32)
    values = tl.full([logits.shape[0], K_P2], float("-inf"), dtype=tl.float32)
    for j in tl.static_range(K_ACT):  # k rounds of arg-max, lowest index first among equals
        best = tl.max(logits, axis=1)
        pick = tl.min(tl.where(logits == best[:, None], cols[None, :], BLOCK_E), axis=1)
        chosen = tl.where(kcol[None, :] == j, pick[:, None], chosen)
        values = tl.where(kcol[None, :] == j, best[:, None], values)
        logits = tl.where(cols[None, :] == pick[:, None], float("-inf"), logits)
    top = tl.max(values, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)  # rows that are all padding: no NaN
    p = tl.exp(values - top[:, None])  # padding columns hold -inf -> 0
    weights = p / tl.sum(p, axis=1)[:, None]
    weights = tl.where(kcol[None, :] < K_ACT, weights, 0.0)
    chosen = tl.where(chosen < E, chosen, 0)  # rows that are all padding pick BLOCK_E
    if HAS_ZERO:  # routing unchanged; the ablated expert's share is dropped, the rest not renormalized
        zeroed = tl.load(zero_ptr + chosen, mask=kcol[None, :] < K_ACT, other=0) != 0
        weights = tl.where(zeroed, 0.0, weights)
    return chosen, weights


@triton.jit
def _route_kernel(
    logits_ptr, reroute_ptr, zero_ptr, idx_ptr, w_ptr, N, E, stride_ln,
    K_ACT: tl.constexpr, K_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_REROUTE: tl.constexpr, HAS_ZERO: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + rows[:, None] * stride_ln + cols[None, :],
                     mask=rmask[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
    chosen, weights = top_k_softmax(logits, reroute_ptr, zero_ptr, E, K_ACT, K_P2, HAS_REROUTE, HAS_ZERO)
    kcol = tl.arange(0, K_P2)
    kmask = rmask[:, None] & (kcol[None, :] < K_ACT)
    offs = rows[:, None] * K_ACT + kcol[None, :]
    tl.store(idx_ptr + offs, chosen.to(idx_ptr.dtype.element_ty), mask=kmask)
    tl.store(w_ptr + offs, weights.to(w_ptr.dtype.element_ty), mask=kmask)


def check_routing(E: int, k: int, reroute_mask: torch.Tensor | None, zero_mask: torch.Tensor | None) -> None:
    """Raise a ValueError unless k, E and the ablation masks make a valid routing."""
    check(1 <= k <= E, f"k must be in 1..{E} (the number of experts), got {k}")
    check(E <= 1024, f"routing supports up to 1024 experts, got {E}")
    for name, mask in (("reroute_mask", reroute_mask), ("zero_mask", zero_mask)):
        if mask is not None:
            check(mask.dtype == torch.bool and tuple(mask.shape) == (E,),
                  f"{name} must be a bool tensor [{E}], got {mask.dtype} {tuple(mask.shape)}")


def route(
    router_logits: torch.Tensor, k: int, reroute_mask: torch.Tensor | None = None,
    zero_mask: torch.Tensor | None = None, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose k experts per token and their mixing weights.

    router_logits [..., E] -> indices [..., k] int64 (best first), weights [..., k] fp32 (softmax over the k
    chosen logits). reroute_mask [E] bool: those experts are never chosen. zero_mask [E] bool: chosen as usual,
    but their weight becomes 0 and the others keep theirs. `out` = (indices, weights) buffers to write into
    (CUDA graphs capture them); they must be contiguous with the result's shape.
    """
    check_float("router_logits", router_logits)
    check_runnable(router_logits)
    E = router_logits.shape[-1]
    check_routing(E, k, reroute_mask, zero_mask)
    check_same_device(router_logits=router_logits, reroute_mask=reroute_mask, zero_mask=zero_mask)
    lead = router_logits.shape[:-1]
    logits = router_logits.reshape(-1, E)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N = logits.shape[0]
    if out is None:
        indices = torch.empty(*lead, k, device=logits.device, dtype=torch.int64)
        weights = torch.empty(*lead, k, device=logits.device, dtype=torch.float32)
    else:
        indices, weights = out
        check(tuple(indices.shape) == (*lead, k) and tuple(weights.shape) == (*lead, k)
              and indices.is_contiguous() and weights.is_contiguous(),
              f"out buffers must be contiguous [{', '.join(map(str, (*lead, k)))}]")
    if N:
        block_t = 16
        _route_kernel[(triton.cdiv(N, block_t),)](
            logits, reroute_mask if reroute_mask is not None else logits,
            zero_mask if zero_mask is not None else logits, indices, weights, N, E, logits.stride(0),
            K_ACT=k, K_P2=triton.next_power_of_2(k), BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(E),
            HAS_REROUTE=reroute_mask is not None, HAS_ZERO=zero_mask is not None, num_warps=4,
        )
    return indices, weights


def route_reference(
    router_logits: torch.Tensor, k: int, reroute_mask: torch.Tensor | None = None,
    zero_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of `route`: `ossscope.ops.route`, then the zero mask."""
    from ossscope import ops

    indices, weights = ops.route(router_logits, k, reroute_mask)
    if zero_mask is not None:
        weights = weights.masked_fill(zero_mask[indices], 0.0)
    return indices, weights
