"""RMSNorm, alone or fused with the residual addition before it.

Torch twins: `ossscope.ops.rms_norm`, and `add_rms_norm_reference` below (the residual update of
`ossscope.model.Block`: x + delta, then + steering, each rounded to x's dtype, then the next norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INPUT_SCALE, check, check_float, check_runnable, word_order


@triton.jit
def _rms_norm_kernel(
    x_ptr, delta_ptr, extra_ptr, scale_ptr, res_ptr, out_ptr, wts_ptr, dout_ptr, words_ptr, D, eps,
    stride_x, stride_d, stride_r, stride_o,
    BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_EXTRA: tl.constexpr, PARTS: tl.constexpr,
    DELTA_OUT: tl.constexpr, WORDS: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual update, rounded to the stream's dtype at each step like the torch path
        if PARTS > 0:  # delta = sum over PARTS fp32 rows (the chosen experts' outputs) times their weights
            d = tl.zeros([BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(PARTS):
                weight = tl.load(wts_ptr + row * PARTS + j).to(tl.float32)
                d += weight * tl.load(delta_ptr + (row * PARTS + j) * stride_d + cols, mask=mask, other=0.0)
            d = d.to(res_ptr.dtype.element_ty)
            if DELTA_OUT:
                tl.store(dout_ptr + row * D + cols, d, mask=mask)
        else:
            d = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(res_ptr.dtype.element_ty)
        if HAS_EXTRA:
            x = (x.to(tl.float32) + tl.load(extra_ptr + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    scale = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (xf * rstd * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, normed, mask=mask)
    if WORDS:  # the same, as the MoE decode kernels want their input (kernels.moe.input_words)
        tl.store(words_ptr + row * D + word_order(cols), normed.to(tl.float32) * INPUT_SCALE, mask=mask)


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
            xf, xf, xf, scale, xf, of, xf, xf, xf, D, float(eps), xf.stride(0), 0, 0, of.stride(0),
            BLOCK_D=triton.next_power_of_2(D), HAS_DELTA=False, HAS_EXTRA=False, PARTS=0, DELTA_OUT=False,
            WORDS=False, num_warps=4,
        )
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float, extra: torch.Tensor | None = None,
    *, weights: torch.Tensor | None = None, delta_out: torch.Tensor | None = None,
    words_out: torch.Tensor | None = None, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual update and the next norm in one pass.

    x [N, D] or [..., D] (the residual stream), delta like x (a block's output, any float dtype), extra [D] or
    None (a steering vector) -> (x' = (x + delta) + extra, rounded to x's dtype after each addition; rms_norm(x')).
    `residual_out` may be x itself (in-place update).

    For the decoder's MoE, without launches of their own:
    - `weights` [N, k]: delta is then fp32 [N * k, D] (`kernels.moe_decode_parts`), summed with these weights
      and rounded to x's dtype (what `moe_experts` returns); `delta_out` [N, D] receives that sum.
    - `words_out` fp32 [N, D] receives the normed output as the MoE decode kernels want it
      (`kernels.moe.input_words`).
    """
    check_float("x", x)
    check_runnable(x)
    D = x.shape[-1]
    check(tuple(scale.shape) == (D,), f"scale must be [{D}], got {tuple(scale.shape)}")
    xf = _rows("x", x, D)
    rows = xf.shape[0]
    parts = 0
    if weights is not None:
        check(weights.dim() == 2 and weights.shape[0] == rows and weights.is_contiguous(),
              f"weights must be contiguous [{rows}, k], got {tuple(weights.shape)}")
        parts = weights.shape[1]
        check(delta.dtype == torch.float32 and tuple(delta.shape) == (rows * parts, D),
              f"with weights, delta must be float32 [{rows * parts}, {D}], got {delta.dtype} {tuple(delta.shape)}")
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
    df = _rows("delta", delta, D)
    residual_out = residual_out if residual_out is not None else torch.empty_like(x)
    out = out if out is not None else torch.empty_like(x)
    rf, of = _rows("residual_out", residual_out, D), _rows("out", out, D)
    if rows:
        _rms_norm_kernel[(rows,)](
            xf, df, extra if extra is not None else xf, scale, rf, of,
            weights if weights is not None else xf, delta_out if delta_out is not None else xf,
            words_out if words_out is not None else xf, D, float(eps),
            xf.stride(0), df.stride(0), rf.stride(0), of.stride(0),
            BLOCK_D=triton.next_power_of_2(D), HAS_DELTA=True, HAS_EXTRA=extra is not None, PARTS=parts,
            DELTA_OUT=delta_out is not None, WORDS=words_out is not None, num_warps=4,
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
