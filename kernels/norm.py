"""RMSNorm, alone or fused with the residual addition before it.

Torch twins: `ossscope.ops.rms_norm`, and `add_rms_norm_reference` below (the residual update of
`ossscope.model.Block`: x + delta, then + steering, each rounded to x's dtype, then the next norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import await_inputs, check, check_float, check_runnable, normed_row, use_pdl
from .moe_tc import SLICES, TILE_GROUPS, _check_slices, store_slices

# With a router, each program of a row computes this many router logits (and the norm again).
ROUTER_EXPERTS_PER_PROGRAM = 4
# The tensor-core MoE decode's input format (kernels/moe_tc.py), as constants the kernel can read.
_SLICES, _TILE_GROUPS = tl.constexpr(SLICES), tl.constexpr(TILE_GROUPS)


@triton.jit
def _store_row_slices(bt_ptr, xe_ptr, normed, row, D, stride_bt, BLOCK_D: tl.constexpr):
    """The normed row as the MoE tensor-core decode wants it (kernels.moe_tc.input_slices)."""
    grp = tl.arange(0, BLOCK_D // 32)
    store_slices(bt_ptr + row * stride_bt, xe_ptr + row * (D // 32), tl.reshape(normed.to(tl.float32),
                 [BLOCK_D // 32, 32]), grp, grp < D // 32, tl.cdiv(D // 32, _TILE_GROUPS) * 32 * _TILE_GROUPS,
                 _SLICES, _TILE_GROUPS)


@triton.jit
def _rms_norm_kernel(
    x_ptr, delta_ptr, extra_ptr, scale_ptr, res_ptr, out_ptr, wts_ptr, dout_ptr, words_ptr,
    rw_ptr, rb_ptr, logits_ptr, bt_ptr, xe_ptr, D, E, eps, stride_x, stride_d, stride_r, stride_o, stride_bt,
    BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_EXTRA: tl.constexpr, PARTS: tl.constexpr,
    DELTA_OUT: tl.constexpr, WORDS: tl.constexpr, ROUTER: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr,
    SPLIT: tl.constexpr, SLICES: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    # Program (row, 0) writes the outputs; with ROUTER, programs (row, j) each also give BLOCK_E router logits
    # (all of them recompute the norm, which is cheap next to reading their slice of the router's weights),
    # and with SLICES too, the row's last program writes the slices.
    first = (cols * 0 + tl.program_id(1)) == 0  # a vector, not a scalar: the interpreter's masks need that
    args = (x_ptr, delta_ptr, extra_ptr, scale_ptr, res_ptr, out_ptr, wts_ptr, dout_ptr, words_ptr, row, cols, mask,
            first, D, eps, stride_x, stride_d, stride_r, stride_o)
    if ROUTER:  # read while the kernel before still runs (PDL): weights only
        experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        emask = experts < E
        router_w = tl.load(rw_ptr + experts[:, None] * D + cols[None, :], mask=emask[:, None] & mask[None, :],
                           other=0.0)
        router_b = tl.load(rb_ptr + experts, mask=emask, other=0.0)
    await_inputs(PDL)
    if ROUTER:
        if SLICES and tl.program_id(1) == tl.num_programs(1) - 1:
            # Its own program and its own copy of the norm: the router's copy sits in the layout of the router's
            # weights, and regrouping that copy into 32-feature groups costs 10 us.
            normed = normed_row(*args, BLOCK_D, HAS_DELTA, HAS_EXTRA, PARTS, DELTA_OUT, WORDS, SPLIT)
            _store_row_slices(bt_ptr, xe_ptr, normed, row, D, stride_bt, BLOCK_D)
        else:  # the router: logits = normed @ W.T + b, summed in fp32, rounded once to the model's dtype
            normed = normed_row(*args, BLOCK_D, HAS_DELTA, HAS_EXTRA, PARTS, DELTA_OUT, WORDS, SPLIT)
            logits = tl.sum(router_w.to(tl.float32) * normed.to(tl.float32)[None, :], axis=1)
            logits = (logits + router_b.to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
            tl.store(logits_ptr + row * E + experts, logits, mask=emask)
    else:
        normed = normed_row(*args, BLOCK_D, HAS_DELTA, HAS_EXTRA, PARTS, DELTA_OUT, WORDS, SPLIT)
        if SLICES:
            _store_row_slices(bt_ptr, xe_ptr, normed, row, D, stride_bt, BLOCK_D)


def _rows(name: str, t: torch.Tensor, D: int) -> torch.Tensor:
    check(t.shape[-1] == D, f"{name} must end in dimension {D}, got {tuple(t.shape)}")
    flat = t.reshape(-1, D)
    check(flat.stride(-1) == 1, f"{name} must be contiguous along its last dimension")
    return flat


def rms_norm(
    x: torch.Tensor, scale: torch.Tensor, eps: float, *, out: torch.Tensor | None = None, pdl: bool = False
) -> torch.Tensor:
    """RMSNorm in fp32, result in x's dtype: x [..., D], scale [D] -> [..., D]. Twin: `ossscope.ops.rms_norm`.
    `pdl`: programmatic dependent launch on Hopper (kernels._common)."""
    check_float("x", x)
    check_runnable(x)
    D = x.shape[-1]
    check(tuple(scale.shape) == (D,), f"scale must be [{D}], got {tuple(scale.shape)}")
    xf = _rows("x", x, D)
    out = out if out is not None else torch.empty_like(x)
    of = _rows("out", out, D)
    if xf.shape[0]:
        _rms_norm_kernel[(xf.shape[0], 1)](
            xf, xf, xf, scale, xf, of, xf, xf, xf, xf, xf, xf, xf, xf, D, 0, float(eps), xf.stride(0), 0, 0,
            of.stride(0), 0, BLOCK_D=triton.next_power_of_2(D), HAS_DELTA=False, HAS_EXTRA=False, PARTS=0,
            DELTA_OUT=False, WORDS=False, ROUTER=False, BLOCK_E=1, PDL=use_pdl(pdl, x), SPLIT=1, SLICES=False,
            num_warps=4, launch_pdl=use_pdl(pdl, x),
        )
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float, extra: torch.Tensor | None = None,
    *, weights: torch.Tensor | None = None, delta_out: torch.Tensor | None = None,
    words_out: torch.Tensor | None = None, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
    router: tuple[torch.Tensor, torch.Tensor] | None = None, logits_out: torch.Tensor | None = None,
    slices_out: tuple[torch.Tensor, torch.Tensor] | None = None, pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual update and the next norm in one pass.

    x [N, D] or [..., D] (the residual stream), delta like x (a block's output, any float dtype), extra [D] or
    None (a steering vector) -> (x' = (x + delta) + extra, rounded to x's dtype after each addition; rms_norm(x')).
    `residual_out` may be x itself (in-place update).

    For the decoder's MoE, without launches of their own:
    - `weights` [N, k]: delta is then fp32 [N * k * splits, D] (`kernels.moe_decode_parts`, splits 1, or
      `moe_decode_routed`), row (n * k + j) * splits + s weighted by weights[n, j]; the sum, rounded to x's
      dtype, is what `moe_experts` returns; `delta_out` [N, D] receives it.
    - `words_out` fp32 [N, D] receives the normed output as the MoE decode kernels want it
      (`kernels.moe.input_words`); `slices_out` (bt, exponents) from `kernels.moe_tc.new_slices(N, D)` receives
      it as the tensor-core decode wants it (`kernels.moe_tc.input_slices`).
    - `router` (weight [E, D], bias [E]) with `logits_out` fp32 [N, E]: receives the router's logits on the
      normed output (torch's `F.linear(out, weight, bias)`: summed in fp32, rounded to x's dtype), for
      `kernels.moe_decode_routed`. The row is then spread over E / ROUTER_EXPERTS_PER_PROGRAM programs.
    `pdl`: programmatic dependent launch on Hopper (kernels._common).
    """
    check_float("x", x)
    check_runnable(x)
    D = x.shape[-1]
    check(tuple(scale.shape) == (D,), f"scale must be [{D}], got {tuple(scale.shape)}")
    xf = _rows("x", x, D)
    rows = xf.shape[0]
    parts, split = 0, 1
    if weights is not None:
        check(weights.dim() == 2 and weights.shape[0] == rows and weights.is_contiguous(),
              f"weights must be contiguous [{rows}, k], got {tuple(weights.shape)}")
        k = weights.shape[1]
        split = max(1, delta.shape[0] // max(1, rows * k))
        check(delta.dtype == torch.float32 and delta.dim() == 2 and tuple(delta.shape) == (rows * k * split, D),
              f"with weights, delta must be float32 [{rows} * {k} * splits, {D}], got {delta.dtype} "
              f"{tuple(delta.shape)}")
        parts = k * split
        check(delta_out is None or (tuple(delta_out.shape) == (rows, D) and delta_out.is_contiguous()),
              f"delta_out must be contiguous [{rows}, {D}]")
    else:
        check(delta.shape == x.shape, f"delta {tuple(delta.shape)} must match x {tuple(x.shape)}")
        check(delta_out is None, "delta_out goes with weights (a sum of parts)")
    if extra is not None:
        check(tuple(extra.shape) == (D,), f"extra must be [{D}], got {tuple(extra.shape)}")
    if words_out is not None:
        check(D % 32 == 0 and words_out.dtype == torch.float32 and tuple(words_out.shape) == (rows, D)
              and words_out.is_contiguous(), f"words_out must be contiguous float32 [{rows}, {D}], D a multiple of 32")
    if slices_out is not None:
        check(D % 32 == 0, f"slices_out needs D a multiple of 32, got {D}")
        slices_out = _check_slices("slices_out", slices_out, rows, D)
    n_programs = 1
    if router is not None:
        router_w, router_b = router
        E = router_w.shape[0]
        check(router_w.dim() == 2 and router_w.shape[1] == D and router_w.is_contiguous()
              and tuple(router_b.shape) == (E,), f"router must be (weight [E, {D}] contiguous, bias [E]), got "
              f"{tuple(router_w.shape)} and {tuple(router_b.shape)}")
        check(logits_out is not None and logits_out.dtype == torch.float32
              and tuple(logits_out.shape) == (rows, E) and logits_out.is_contiguous(),
              f"with a router, logits_out must be contiguous float32 [{rows}, {E}]")
        n_programs = triton.cdiv(E, ROUTER_EXPERTS_PER_PROGRAM) + (slices_out is not None)
        check(residual_out is None or residual_out.data_ptr() != x.data_ptr(),
              "with a router, residual_out cannot be x itself (several programs read each row of x)")
    else:
        check(logits_out is None, "logits_out goes with router")
    df = _rows("delta", delta, D)
    residual_out = residual_out if residual_out is not None else torch.empty_like(x)
    out = out if out is not None else torch.empty_like(x)
    rf, of = _rows("residual_out", residual_out, D), _rows("out", out, D)
    if rows:
        _rms_norm_kernel[(rows, n_programs)](
            xf, df, extra if extra is not None else xf, scale, rf, of,
            weights if weights is not None else xf, delta_out if delta_out is not None else xf,
            words_out if words_out is not None else xf, router[0] if router is not None else xf,
            router[1] if router is not None else xf, logits_out if logits_out is not None else xf,
            slices_out[0] if slices_out is not None else xf, slices_out[1] if slices_out is not None else xf,
            D, router[0].shape[0] if router is not None else 0, float(eps),
            xf.stride(0), df.stride(0), rf.stride(0), of.stride(0),
            slices_out[0].stride(0) if slices_out is not None else 0,
            BLOCK_D=triton.next_power_of_2(D), HAS_DELTA=True, HAS_EXTRA=extra is not None, PARTS=parts,
            DELTA_OUT=delta_out is not None, WORDS=words_out is not None, ROUTER=router is not None,
            BLOCK_E=ROUTER_EXPERTS_PER_PROGRAM, PDL=use_pdl(pdl, x), SPLIT=split, SLICES=slices_out is not None,
            num_warps=8 if router is not None else 4, launch_pdl=use_pdl(pdl, x),
        )
    return residual_out, out


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float, extra: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `add_rms_norm`."""
    from ossscope import ops

    x = x + delta.to(x.dtype)
    if extra is not None:
        x = x + extra.to(x.dtype)
    return x, ops.rms_norm(x, scale, eps)
