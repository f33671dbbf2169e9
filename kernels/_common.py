"""Pieces the kernels share: MXFP4 decoding in registers, the dot product, and input checks.

Decoding E2M1 (sign, 2 exponent bits, 1 mantissa bit) costs a few integer operations: the 3 magnitude bits,
shifted to the top of an fp16's exponent and mantissa fields, make an fp16 equal to the E2M1 value times
2**-14 (the subnormal 0.5 included), which widens exactly to fp32. The block's E8M0 scale then multiplies as
an fp32 power of two built from its exponent bits, with the 2**14 folded in.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def e2m1_to_f32(nibble):
    """int32 tile of E2M1 codes (0..15) -> fp32 tile of their values times 2**-14 (exact)."""
    bits = ((nibble & 7) << 9) | ((nibble & 8) << 12)  # magnitude into fp16 exponent/mantissa, sign to bit 15
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e8m0_factor(scale):
    """uint8 tile of E8M0 scale codes -> fp32 2**(scale - 127) * 2**14, the factor for `e2m1_to_f32` values.

    Exact for codes up to 240 (2**113); real checkpoints stay far below (their scales sit around 2**-7).
    """
    return ((scale.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


# The MoE decode kernels take their inputs in "word order" (kernels/moe.py explains why): fp32, times 2**64.
INPUT_SCALE = tl.constexpr(2.0**64)


@triton.jit
def word_order(f):
    """Input feature f -> its place in word order: feature 32 g + 8 j + k (code k of word j) goes to 32 g + 4 k + j."""
    return (f // 32) * 32 + (f % 8) * 4 + (f // 8) % 4


# -- the residual update and RMSNorm of one row ------------------------------------------------------------


@triton.jit
def normed_row(
    x_ptr, delta_ptr, extra_ptr, scale_ptr, res_ptr, out_ptr, wts_ptr, dout_ptr, words_ptr, row, cols, mask, first,
    D, eps, stride_x, stride_d, stride_r, stride_o, BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_EXTRA: tl.constexpr, PARTS: tl.constexpr, DELTA_OUT: tl.constexpr, WORDS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """The residual update and the norm of one row -> normed [BLOCK_D] (the model's dtype); the outputs are
    stored where `first` (by one program of the row). Used by kernels/norm.py, and by the MoE down projection
    on the tensor cores, whose last program to finish does the residual update after it (kernels/moe_tc.py):
    so delta is read from L2 (`.cg`), where the other programs' writes are, not from a stale L1."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual update, rounded to the stream's dtype at each step like the torch path
        if PARTS > 0:  # delta = sum over PARTS fp32 rows (the chosen experts' outputs, SPLIT rows each) x weights
            d = tl.zeros([BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(PARTS):
                weight = tl.load(wts_ptr + row * (PARTS // SPLIT) + j // SPLIT).to(tl.float32)
                part = tl.load(delta_ptr + (row * PARTS + j) * stride_d + cols, mask=mask, other=0.0,
                               cache_modifier=".cg")
                d += weight * part
            d = d.to(res_ptr.dtype.element_ty)
            if DELTA_OUT:
                tl.store(dout_ptr + row * D + cols, d, mask=mask & first)
        else:
            d = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(res_ptr.dtype.element_ty)
        if HAS_EXTRA:
            x = (x.to(tl.float32) + tl.load(extra_ptr + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask & first)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    scale = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (xf * rstd * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, normed, mask=mask & first)
    if WORDS:  # the same, as the MoE decode kernels want their input (kernels.moe.input_words)
        tl.store(words_ptr + row * D + word_order(cols), normed.to(tl.float32) * INPUT_SCALE, mask=mask & first)
    return normed



# -- programmatic dependent launch (PDL) -------------------------------------------------------------------
#
# A decode step is ~250 small dependent kernels, and each boundary costs the GPU a drain, a launch and a ramp
# (the first weight loads' full latency). On Hopper a kernel launched with `launch_pdl=True` may start while the
# one before is still running: its programs read what no earlier kernel of the step writes (the weights) and
# then wait in `await_inputs` until the kernel before has finished and its writes are visible. Each kernel lets
# the next one launch as soon as its own wait is over; waits chain, so everything earlier is finished too.
# The decoder asks for it with `pdl=True` (its weights never change inside a step); elsewhere it is off.


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """Under PDL: wait for the kernel before (and so every earlier one), then let the next kernel launch.
    Nothing before this call may read what earlier kernels write, or write anything. A no-op without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(wanted: bool, t: torch.Tensor) -> bool:
    """Whether a kernel on t's device launches with PDL: asked for, a CUDA GPU of compute capability 9.0 or
    newer, and not switched off with OSSSCOPE_PDL=0 (for comparisons and debugging)."""
    if not wanted or not t.is_cuda or interpreting() or os.environ.get("OSSSCOPE_PDL", "1") == "0":
        return False
    return _hopper_or_newer(t.device.index if t.device.index is not None else torch.cuda.current_device())


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b; fp32 operands multiply exactly (no tf32) when IEEE is set."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def check(condition: bool, message: str) -> None:
    """Raise a ValueError naming the problem unless `condition` holds."""
    if not condition:
        raise ValueError(message)


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.dtype in (torch.bfloat16, torch.float16, torch.float32),
          f"{name} must be bfloat16, float16 or float32, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    check(len(set(devices.values())) <= 1,
          "tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_mxfp4(name: str, blocks: torch.Tensor, scales: torch.Tensor, experts: int, rows: int, K: int) -> None:
    """Packed expert weights [E, rows, K/32, 16] uint8 with scales [E, rows, K/32] uint8, blocks contiguous."""
    check(blocks.dtype == torch.uint8 and scales.dtype == torch.uint8,
          f"{name} blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    want_b, want_s = (experts, rows, K // 32, 16), (experts, rows, K // 32)
    check(tuple(blocks.shape) == want_b and tuple(scales.shape) == want_s,
          f"{name} must be blocks {want_b} and scales {want_s}, got {tuple(blocks.shape)} and "
          f"{tuple(scales.shape)}")
    check(blocks.stride(-1) == 1 and blocks.stride(-2) == 16 and blocks.stride(-3) == K // 2,
          f"{name} blocks must be contiguous within each row (call .contiguous())")
    check(scales.stride(-1) == 1, f"{name} scales must be contiguous along the blocks")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_runnable(t: torch.Tensor) -> None:
    check(t.is_cuda or interpreting(),
          f"the Triton kernels need CUDA tensors (got {t.device}); on CPU use the torch reference in "
          "ossscope.ops, or set TRITON_INTERPRET=1 before importing triton to run them in the interpreter")
