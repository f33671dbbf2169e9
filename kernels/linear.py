"""A linear layer for decode-sized batches: y = x @ W.T + b with bf16/fp16/fp32 weights, as a streaming GEMV.

At batch 1 a projection is a pure weight read, and cuBLAS reaches about 1.9 TB/s on the attention projections of
gpt-oss-20b (2880 x 5120 and 4096 x 2880, 64% of an H100's 3.0 TB/s; docs/PERFORMANCE.md), short of the floor
because so small a matrix leaves few bytes in flight per SM. Here each one-warp program keeps ROWS rows x BLOCK_K
inputs of loads in flight (16-byte vectors, each lane a different stretch of the row), multiplies in fp32 and
reduces across the warp once at the end; the bias is added in fp32 before the single rounding, as cuBLAS's
epilogue does. The batch (a few rows of x) shares each weight tile, so the weights are read once.
Measured on an H100 (docs/bench/h100-linear-sweep.json): qkv 12.5 us (2.36 TB/s, cuBLAS 13.3 us), out
10.3 us (2.30 TB/s, cuBLAS 14.5 us).
Torch twin: `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import await_inputs, check, check_float, check_runnable, check_same_device, use_pdl

# Up to this many rows of x use the GEMV; beyond it `linear` calls torch (a GEMM is then the right tool).
GEMV_MAX_BATCH = 8


def default_blocks(N: int) -> dict:
    """Tiles for N output features, from a sweep on an H100 (scripts/linear_sweep.py, docs/bench/): 4 rows x 512
    inputs for gpt-oss-20b's qkv projection (N = 5120), 2 x 1024 for its out projection (N = 2880). Either way
    each lane keeps 128 bytes of loads in flight and there are over 1,000 one-warp programs to spread them."""
    rows = 4 if N >= 4096 else 2
    return {"ROWS": rows, "BLOCK_K": 2048 // rows}


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xb, stride_wn, stride_yb,
    BATCH: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # output features, [ROWS]
    rmask = rows < N
    first = tl.arange(0, BLOCK_K)
    # The first weight tile is read before waiting on the kernel that writes x (see _common.await_inputs).
    w_first = tl.load(w_ptr + rows[:, None] * stride_wn + first[None, :],
                      mask=rmask[:, None] & (first < K)[None, :], other=0.0)
    await_inputs(PDL)
    for b in tl.static_range(BATCH):  # the batch shares the weight tiles through L1
        x = tl.load(x_ptr + b * stride_xb + first, mask=first < K, other=0.0)
        acc = w_first.to(tl.float32) * x.to(tl.float32)[None, :]  # [ROWS, BLOCK_K]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            kmask = cols < K
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            x = tl.load(x_ptr + b * stride_xb + cols, mask=kmask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + b * stride_yb + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
    blocks: dict | None = None, pdl: bool = False,
) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N] in x's dtype; twin of `torch.nn.functional.linear`.

    Batches of up to GEMV_MAX_BATCH rows take the GEMV kernel; larger ones go to torch. `out` [..., N] receives
    the result (for CUDA graphs); `blocks` overrides the tiles of `default_blocks(N)`. `pdl=True` launches with
    programmatic dependent launch on Hopper (kernels._common): the first weight tile is read while the kernel
    before still runs, so `weight` must not be written by the kernel just before.
    """
    check_float("x", x)
    check_float("weight", weight)
    check_runnable(x)
    check(weight.dim() == 2 and x.shape[-1] == weight.shape[1],
          f"weight must be [N, K={x.shape[-1]}], got {tuple(weight.shape)}")
    N, K = weight.shape
    if bias is not None:
        check(tuple(bias.shape) == (N,), f"bias must be [{N}], got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)
    check(weight.stride(1) == 1, "weight must be contiguous along its rows")
    xf = x.reshape(-1, K)
    if xf.stride(-1) != 1:
        xf = xf.contiguous()
    B = xf.shape[0]
    out = out if out is not None else torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    check(tuple(out.shape) == (*x.shape[:-1], N), f"out must be {(*x.shape[:-1], N)}, got {tuple(out.shape)}")
    yf = out.view(-1, N)
    check(yf.stride(-1) == 1, "out must be contiguous along its last dimension")
    if B > GEMV_MAX_BATCH:
        yf.copy_(torch.nn.functional.linear(xf, weight, bias))
        return out
    cfg = {**default_blocks(N), **(blocks or {})}
    if B:
        _gemv_kernel[(triton.cdiv(N, cfg["ROWS"]),)](
            xf, weight, bias if bias is not None else weight, yf, N, K, xf.stride(0), weight.stride(0),
            yf.stride(0), BATCH=B, ROWS=cfg["ROWS"], BLOCK_K=cfg["BLOCK_K"], HAS_BIAS=bias is not None,
            PDL=use_pdl(pdl, x), num_warps=1, launch_pdl=use_pdl(pdl, x),
        )
    return out
