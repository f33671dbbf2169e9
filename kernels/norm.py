"""RMSNorm, alone or fused with the residual addition before it.

Torch twins: `ossscope.ops.rms_norm`, and `add_rms_norm_reference` below (the residual update of
`ossscope.model.Block`: x + delta, then + steering, each rounded to x's dtype, then the next norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_float, check_runnable


@triton.jit
def _rms_norm_kernel(
    x_ptr, delta_ptr, extra_ptr, scale_ptr, res_ptr, out_ptr, D, eps,
    stride_x, stride_d, stride_r, stride_o,
    BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_EXTRA: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual update, rounded to the stream's dtype at each step like the torch path
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_ptr.dtype.element_ty)
        if HAS_EXTRA:
            x = (x.to(tl.float32) + tl.load(extra_ptr + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    scale = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (xf * rstd * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(name: str, t: torch.Tensor, D: int) -> torch.Tensor:
    check(t.shape[-1] == D, f"{name} must end in dimension {D}, got {tuple(t.shape)}")
    flat = t.reshape(-1, D)
    check(flat.stride(-1) == 1, f"{name} must be contiguous along its last dimension")
    return flat


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm in fp32, result in x's dtype: x [..., D], scale [D] -> [..., D]. Twin: `ossscope.ops.rms_norm`."""
    check_float("x", x)
    check_runnable(x)
    D = x.shape[-1]
    check(tuple(scale.shape) == (D,), f"scale must be [{D}], got {tuple(scale.shape)}")
    xf = _rows("x", x, D)
    out = out if out is not None else torch.empty_like(x)
    of = _rows("out", out, D)
    if xf.shape[0]:
        _rms_norm_kernel[(xf.shape[0],)](
            xf, xf, xf, scale, xf, of, D, float(eps), xf.stride(0), 0, 0, of.stride(0),
            BLOCK_D=triton.next_power_of_2(D), HAS_DELTA=False, HAS_EXTRA=False, num_warps=4,
        )
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float, extra: torch.Tensor | None = None,
    *, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual update and the next norm in one pass.

    x [..., D] (the residual stream), delta [..., D] (a block's output, any float dtype), extra [D] or None
    (a steering vector) -> (x' = (x + delta) + extra, rounded to x's dtype after each addition; rms_norm(x')).
    `residual_out` may be x itself (in-place update).
    """
    check_float("x", x)
    check_runnable(x)
    D = x.shape[-1]
    check(tuple(scale.shape) == (D,), f"scale must be [{D}], got {tuple(scale.shape)}")
    check(delta.shape == x.shape, f"delta {tuple(delta.shape)} must match x {tuple(x.shape)}")
    if extra is not None:
        check(tuple(extra.shape) == (D,), f"extra must be [{D}], got {tuple(extra.shape)}")
    xf, df = _rows("x", x, D), _rows("delta", delta, D)
    residual_out = residual_out if residual_out is not None else torch.empty_like(x)
    out = out if out is not None else torch.empty_like(x)
    rf, of = _rows("residual_out", residual_out, D), _rows("out", out, D)
    if xf.shape[0]:
        _rms_norm_kernel[(xf.shape[0],)](
            xf, df, extra if extra is not None else xf, scale, rf, of, D, float(eps),
            xf.stride(0), df.stride(0), rf.stride(0), of.stride(0),
            BLOCK_D=triton.next_power_of_2(D), HAS_DELTA=True, HAS_EXTRA=extra is not None, num_warps=4,
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
