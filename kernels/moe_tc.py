"""MoE decode on fp8 tensor cores: packed MXFP4 expert weights times bf16 inputs, exactly enough to match fp32.

The CUDA-core decode kernels (kernels/moe.py) spend about 4.7 instructions on every weight code, and on an H100
that, not memory, bounds them at about 1.1 TB/s. Here the codes go to the tensor cores instead:

- Weights: an E2M1 code (sign, 2 exponent bits, 1 mantissa bit) becomes an e4m3 byte by moving its bits: sign
  to bit 7, the other three to bits 2-4. That byte is the E2M1 value times 2**-6 exactly (the subnormal 0.5
  included). Four bytes of packed codes give eight e4m3 bytes in about 7 integer operations (`_e4m3_codes`),
  and each tile of weights is one fp8 dot: about 2.3 instructions per code in all.
- Inputs: each group of 32 input features (one MXFP4 block) is written as SLICES fixed-point slices. With h
  the exponent of the group's largest magnitude, v = x * 2**(3 - h) lies in (-16, 16); slice 0 is v rounded
  to an integer, slice 1 the remainder times 16 rounded, and so on. Every slice value is an integer of
  magnitude <= 16, which e4m3 holds exactly.
- Why slices: Hopper's fp8 tensor cores keep only 13 mantissa bits of their sums (a first version with x as
  two e4m3 pieces of full precision was off by 2.6e-5 of the largest output on an H100). A weight (an integer
  <= 12 in units of 2**-7) times a slice value is an integer <= 192 in those units, and a group's 32 of them
  sum to less than 2**13: every sum the tensor core forms is exact. The slices of one group are combined
  (times 16**-p) and scaled (block scale times 2**(h + 3)) in fp32, like the CUDA-core kernels' sums.
- Exactness: a bf16 input has 8 significant bits, so 4 slices hold every input within 2**8 of its group's
  largest exactly; smaller ones are rounded to 2**(h - 16), below 1/128 of a bf16 ulp of that largest input.
  On an H100 the outputs differ from an fp64 reference by about 1e-6 of their largest (docs/PERFORMANCE.md);
  fp16 and fp32 inputs have more significant bits, so those models keep the CUDA-core kernels. The combined
  factor 2**(s - 124 + h) must stay a normal fp32 (block scale code s plus h + 3 within 1..254); checkpoint
  scales sit near 120 and activations near 2**0, far inside that.
- Layout: a dot takes TILE_GROUPS groups at a time, the weights in their stored byte order with the low
  nibbles of a tile first and the high nibbles after (so no bytes are interleaved), against a block-diagonal
  input `bt` [SLICES * TILE_GROUPS, K padded] whose row p * TILE_GROUPS + g holds slice p of group g (of its
  tile) at that group's positions and zeros elsewhere: the dot's output column p * TILE_GROUPS + g is group
  g's slice-p sum. The zeros never change, so buffers are zeroed once and producers write only their groups.

Producers: `input_slices` (any x), `add_rms_norm(slices_out=...)` (the decoder's norm), and the gate/up kernel
(its SwiGLU output, one group per program, for down). `moe_decode_slices` runs gate/up then down, routing
itself from router logits like `moe.moe_decode_routed`, and leaves the same fp32 parts; with `then_norm`, down's
last program per token also does the residual update and the next norm (the decoder's form: no norm kernel).
Measured on an H100 at the 20b shape: gate/up and down together 33 us a layer alone (no PDL), routing included,
against 47 us on the CUDA cores (scripts/moe_decode_iso.py); the decoder went from 434 to 474 tok/s with them
(docs/PERFORMANCE.md). Torch twins: `slices_reference`, `ossscope.ops.moe_experts`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._common import await_inputs, check, check_runnable, check_same_device, interpreting, normed_row, use_pdl
from .moe import _check_decode_weights, _parts_buffer, _routing_outputs, _slot_expert, _swiglu
from .routing import check_routing

SLICES = 4  # fixed-point slices of each input group (4 bits each)
TILE_GROUPS = 8  # 32-feature groups per dot: K = 256 features, N = SLICES * TILE_GROUPS = 32 columns
GATE_UP_ROWS = 64  # mlp1 rows per gate/up program: 32 SwiGLU units, exactly one group of down's input
# From sweeps on an H100 (scripts/decode_ab.py --sweep): BLOCK_D down rows per program, SPLIT_D programs share each
# row's reduction (parts added by the residual norm, as on the CUDA cores), WARPS per program, STAGES of
# software pipelining (cp.async) in the tile loop; AHEAD: the scale codes are loaded a tile early (two tiles early
# was slower).
TC_BLOCKS = {"BLOCK_D": 64, "SPLIT_D": 2, "WARPS": 4, "STAGES": 3, "AHEAD": True}


@functools.cache
def _fp8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def available(x: torch.Tensor) -> bool:
    """Whether the decode of bf16 input `x` takes the tensor-core kernels: a GPU with fp8 tensor cores (compute
    capability 8.9 or newer) or Triton's interpreter, unless OSSSCOPE_MOE_DECODE=cuda_cores."""
    if x.dtype != torch.bfloat16 or os.environ.get("OSSSCOPE_MOE_DECODE", "") == "cuda_cores":
        return False
    if interpreting():
        return True
    return x.is_cuda and _fp8_tensor_cores(x.device.index if x.device.index is not None else
                                            torch.cuda.current_device())


def slices_length(K: int, tile_groups: int = TILE_GROUPS) -> int:
    """Length of a slice row for K input features: whole tiles of `tile_groups` groups."""
    return triton.cdiv(K // 32, tile_groups) * 32 * tile_groups


def new_slices(N: int, K: int, device, tile_groups: int = TILE_GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed slice buffers for N rows of K features: (bt fp8 [N, SLICES * tile_groups, L], exponents int32
    [N, K / 32]). Producers write only their groups' places, so a buffer can be reused for any input.
    tile_groups 1 is the compact form the grouped decode reads (kernels/moe_batch.py, decode="fp8"): [N, SLICES,
    K], slice p of group g at [p, 32 g: 32 g + 32] (its even features, then its odd ones); every byte of it is
    some group's, so it is left unzeroed."""
    # The compact form has no places that stay zero (every byte is some group's), so it needs no memset.
    alloc = torch.empty if tile_groups == 1 else torch.zeros
    bt = alloc(N, SLICES * tile_groups, slices_length(K, tile_groups), device=device, dtype=torch.float8_e4m3fn)
    return bt, torch.zeros(N, K // 32, device=device, dtype=torch.int32)


# -- writing inputs as slices --------------------------------------------------------------------------------


@triton.jit
def store_slices(bt_ptr, xe_ptr, values, grp, gmask, row_len, P: tl.constexpr, G: tl.constexpr):
    """values [NG, 32] fp32 (features 32 * grp + j of one row) -> their slices at bt_ptr (rows p * G + grp % G,
    row_len long) and each group's exponent h + 3 at xe_ptr + grp, where gmask.

    In a slice row, each tile of G groups (16 G bytes of weights) has its low nibbles' features (even) first,
    then its high nibbles' (odd): a group's even features are 16 contiguous bytes, its odd ones 16 more,
    16 G further on, and they are stored as such runs (scattered single bytes cost 3x the time).
    """
    largest = tl.max(tl.abs(values), axis=1)  # [NG]
    h = tl.maximum(((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -100)  # exponent of the largest
    v = values * (((130 - h) << 23).to(tl.float32, bitcast=True))[:, None]  # * 2**(3 - h): |v| < 16
    v_even, v_odd = tl.split(tl.reshape(v, [v.shape[0], 16, 2]))  # [NG, 16] each
    j = tl.arange(0, 16)[None, :]
    even_at = bt_ptr + ((grp % G) * row_len + (grp // G) * 32 * G + (grp % G) * 16)[:, None] + j
    mask = gmask[:, None] & (j >= 0)
    for p in tl.static_range(P):
        q_even, q_odd = tl.floor(v_even + 0.5), tl.floor(v_odd + 0.5)  # integers, |q| <= 16; v - q is exact
        tl.store(even_at + p * G * row_len, q_even.to(bt_ptr.dtype.element_ty), mask=mask)
        tl.store(even_at + p * G * row_len + 16 * G, q_odd.to(bt_ptr.dtype.element_ty), mask=mask)
        v_even, v_odd = (v_even - q_even) * 16.0, (v_odd - q_odd) * 16.0
    tl.store(xe_ptr + grp, h + 3, mask=gmask)


@triton.jit
def _input_slices_kernel(x_ptr, bt_ptr, xe_ptr, K, row_len, stride_x, stride_bt, stride_xe,
                         BLOCK_G: tl.constexpr, P: tl.constexpr, G: tl.constexpr):
    row = tl.program_id(0)
    grp = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = grp < K // 32
    f = grp[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(x_ptr + row * stride_x + f, mask=gmask[:, None] & (f >= 0), other=0.0).to(tl.float32)
    store_slices(bt_ptr + row * stride_bt, xe_ptr + row * stride_xe, x, grp, gmask, row_len, P, G)


def _check_slices(name: str, slices, N: int, K: int, tile_groups: int = TILE_GROUPS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    check(isinstance(slices, tuple) and len(slices) == 2, f"{name} must be a pair (bt, exponents) from "
          "new_slices or input_slices")
    bt, xe = slices
    want_bt, want_xe = (N, SLICES * tile_groups, slices_length(K, tile_groups)), (N, K // 32)
    check(bt.dtype == torch.float8_e4m3fn and tuple(bt.shape) == want_bt and bt.is_contiguous(),
          f"{name}[0] must be contiguous float8_e4m3fn {want_bt}, got {bt.dtype} {tuple(bt.shape)}")
    check(xe.dtype == torch.int32 and tuple(xe.shape) == want_xe and xe.is_contiguous(),
          f"{name}[1] must be contiguous int32 {want_xe}, got {xe.dtype} {tuple(xe.shape)}")
    return bt, xe


def input_slices(x: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 tile_groups: int = TILE_GROUPS):
    """x [N, K] (K a multiple of 32) -> its slices (bt, exponents) for `moe_decode_slices` (see the module
    notes), or with tile_groups=1 for the grouped decode (`new_slices`). `out` (from `new_slices`, the same
    tile_groups) is written in place. Torch twin: `slices_reference`."""
    check(x.dim() == 2 and x.shape[1] % 32 == 0, f"x must be [N, K] with K a multiple of 32, got {tuple(x.shape)}")
    check(x.dtype in (torch.bfloat16, torch.float16, torch.float32), f"x must be a float tensor, got {x.dtype}")
    check_runnable(x)
    N, K = x.shape
    bt, xe = (_check_slices("out", out, N, K, tile_groups) if out is not None
              else new_slices(N, K, x.device, tile_groups))
    if N:
        x = x if x.stride(1) == 1 else x.contiguous()
        _input_slices_kernel[(N, triton.cdiv(K // 32, 32))](
            x, bt, xe, K, bt.shape[2], x.stride(0), bt.stride(0), xe.stride(0), BLOCK_G=32, P=SLICES,
            G=tile_groups)
    return bt, xe


def _slice_places(K: int, device, G: int = TILE_GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
    """For each input feature f < K: its group's row within a slice's G rows, and its place in a slice row
    (within each tile of G groups, the even features first, then the odd ones; see `store_slices`)."""
    f = torch.arange(K, device=device)
    tile, local = f // (32 * G), f % (32 * G)
    place = tile * 32 * G + torch.where(local % 2 == 0, local // 2, 16 * G + local // 2)
    return (f // 32) % G, place


def slices_reference(x: torch.Tensor, tile_groups: int = TILE_GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `input_slices` (the same rounding, spelled out on whole tensors)."""
    N, K = x.shape
    groups = x.float().reshape(N, K // 32, 32)
    largest = groups.abs().amax(-1)
    h = ((largest.view(torch.int32) >> 23) & 0xFF) - 127
    h = h.clamp_min(-100)
    v = groups * torch.exp2((3 - h).float())[..., None]
    bt, xe = new_slices(N, K, x.device, tile_groups)
    row, place = _slice_places(K, x.device, tile_groups)
    for p in range(SLICES):
        q = torch.floor(v + 0.5)
        bt[:, p * tile_groups + row, place] = q.reshape(N, K).to(bt.dtype)
        v = (v - q) * 16
    xe.copy_(h + 3)
    return bt, xe


def slices_value(bt: torch.Tensor, xe: torch.Tensor) -> torch.Tensor:
    """The fp32 values [N, K] that slices (bt, exponents) stand for (for tests and checks; any tile_groups)."""
    N, K, G = xe.shape[0], xe.shape[1] * 32, bt.shape[1] // SLICES
    row, place = _slice_places(K, bt.device, G)
    v = torch.zeros(N, K, dtype=torch.float64, device=bt.device)
    for p in range(SLICES):
        v += bt[:, p * G + row, place].double() * 16.0**-p
    return (v * torch.exp2((xe.double() - 6).repeat_interleave(32, dim=1))).float()


# -- the dot ------------------------------------------------------------------------------------------------


@triton.jit
def _e4m3_codes(b, ASM: tl.constexpr):
    """uint8 bytes (two E2M1 codes each) -> (low-nibble codes, high-nibble codes) as e4m3 bytes, each the E2M1
    value times 2**-6: sign to bit 7, exponent and mantissa bits to bits 2-4."""
    if ASM:  # four bytes a register; the plain form below compiles to byte-by-byte work
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t1, t2, t3;
            shl.b32 t1, $2, 2;
            shl.b32 t2, $2, 4;
            and.b32 t1, t1, 0x1C1C1C1C;
            and.b32 t2, t2, 0x80808080;
            or.b32 $0, t1, t2;
            shr.b32 t3, $2, 2;
            and.b32 t3, t3, 0x1C1C1C1C;
            and.b32 t1, $2, 0x80808080;
            or.b32 $1, t1, t3;
            }""",
            constraints="=r,=r,r", args=[b], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
    else:  # the interpreter runs no assembly
        low = ((b << 2) & 0x1C) | ((b << 4) & 0x80)
        high = ((b >> 2) & 0x1C) | (b & 0x80)
        return low, high


@triton.jit
def _rows_dot(w_rows, s_rows, bt_rows, xe_row, t_start, t_stop, half_k, n_groups, rmask,
              BLOCK_R: tl.constexpr, P: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr, AHEAD: tl.constexpr):
    """Packed MXFP4 rows times one input's slices over tiles t_start..t_stop-1 -> [BLOCK_R] fp32.

    w_rows [R, 1] pointers to each row's bytes, s_rows [R, 1] to its scale codes, bt_rows [P * G, 1] to the
    input's slice rows, xe_row to its group exponents.
    """
    slice_weight = tl.exp2(-4.0 * tl.arange(0, P).to(tl.float32))  # 16**-p
    acc = tl.zeros([BLOCK_R, G], dtype=tl.float32)
    # The scale codes and input exponents of a tile are loaded one tile ahead, by hand: Triton's pipelining
    # takes the weights and slices (they feed the dot) but not these, and each tile would wait out a full
    # memory latency for them.
    scale_next, xe_next = _tile_scales(s_rows, xe_row, t_start, t_stop, n_groups, rmask, G)
    for t in range(t_start, t_stop):
        if AHEAD:
            scale, xe = scale_next, xe_next
            scale_next, xe_next = _tile_scales(s_rows, xe_row, t + 1, t_stop, n_groups, rmask, G)
        else:  # for comparisons (scripts/decode_ab.py)
            scale, xe = _tile_scales(s_rows, xe_row, t, t_stop, n_groups, rmask, G)
        cols = t * 16 * G + tl.arange(0, 16 * G)
        kmask = cols // 16 < half_k // 16  # half_k is a multiple of 16; so written, the loads are 16 bytes wide
        b = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & kmask[None, :], other=0)
        low, high = _e4m3_codes(b, ASM)
        a = tl.reshape(tl.permute(tl.join(low, high), (0, 2, 1)), [BLOCK_R, 32 * G]).to(tl.float8e4nv,
                                                                                        bitcast=True)
        x = tl.load(bt_rows + t * 32 * G + tl.arange(0, 32 * G)[None, :])  # [P * G, 32 G]
        sums = tl.dot(a, tl.trans(x))  # [R, P * G]: column p * G + g is group g's slice-p sum, exact
        sums = tl.sum(tl.reshape(sums, [BLOCK_R, P, G]) * slice_weight[None, :, None], axis=1)  # [R, G]
        exponent = scale.to(tl.int32) + xe[None, :]  # 2**(s - 127 + 6 + h - 3)
        factor = tl.where(exponent > 0, exponent << 23, 0).to(tl.float32, bitcast=True)
        acc += sums * factor
    return tl.sum(acc, axis=1)


@triton.jit
def _tile_scales(s_rows, xe_row, t, t_stop, n_groups, rmask, G: tl.constexpr):
    """Tile t's weight scale codes [R, G] and input exponents [G] (zeros past the groups or at t >= t_stop)."""
    grp = t * G + tl.arange(0, G)
    gmask = (grp < n_groups) & (grp < t_stop * G)  # the latter: t < t_stop
    scale = tl.load(s_rows + grp[None, :], mask=rmask[:, None] & gmask[None, :], other=0)
    return scale, tl.load(xe_row + grp, mask=gmask, other=0)


@triton.jit
def _gate_up_tc_kernel(
    bt_ptr, xe_ptr, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, wts_ptr, w_ptr, s_ptr, b_ptr, act_bt_ptr,
    act_xe_ptr, D, I, E, stride_bt, stride_xe, stride_we, stride_wr, stride_se, stride_sr, stride_be,
    stride_abt, stride_axe, limit, alpha,
    K_ACT: tl.constexpr, K_P2: tl.constexpr, BLOCK_E: tl.constexpr, ROUTED: tl.constexpr,
    HAS_REROUTE: tl.constexpr, HAS_ZERO: tl.constexpr, PDL: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
    ASM: tl.constexpr, AHEAD: tl.constexpr,
):
    await_inputs(PDL)  # which expert's rows to read depends on the kernel before
    slot = tl.program_id(0)
    token = slot // K_ACT
    rows = tl.program_id(1) * 64 + tl.arange(0, 64)  # mlp1 rows: gate, linear, gate, ... (32 units)
    rmask = rows < 2 * I
    write = ((slot % K_ACT == 0) & (tl.program_id(1) == 0)).to(tl.int32)  # one writer per token
    expert = _slot_expert(slot, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, wts_ptr, E, write, K_ACT, K_P2,
                          BLOCK_E, ROUTED, HAS_REROUTE, HAS_ZERO)
    n_groups = D // 32
    row_len = tl.cdiv(n_groups, G) * 32 * G
    out = _rows_dot(w_ptr + expert * stride_we + rows[:, None] * stride_wr,
                    s_ptr + expert * stride_se + rows[:, None] * stride_sr,
                    bt_ptr + token * stride_bt + tl.arange(0, P * G)[:, None] * row_len, xe_ptr + token * stride_xe,
                    0, tl.cdiv(n_groups, G), D // 2, n_groups, rmask, 64, P, G, ASM, AHEAD)
    h = _swiglu(out, expert, rows, rmask, b_ptr, stride_be, limit, alpha, 32)  # [32] units, the model's rounding
    group = tl.program_id(1) + tl.arange(0, 1)
    store_slices(act_bt_ptr + slot * stride_abt, act_xe_ptr + slot * stride_axe, tl.reshape(h, [1, 32]), group,
                 group < I // 32, tl.cdiv(I // 32, G) * 32 * G, P, G)


@triton.jit
def _down_tc_kernel(
    act_bt_ptr, act_xe_ptr, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    D, I, E, stride_abt, stride_axe, stride_we, stride_wr, stride_se, stride_sr, stride_be, stride_on,
    x_ptr, extra_ptr, scale_ptr, res_ptr, normed_ptr, wts_ptr, dout_ptr, count_ptr, eps, stride_x, stride_r,
    stride_o,
    K_ACT: tl.constexpr, K_P2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, ROUTED: tl.constexpr,
    HAS_REROUTE: tl.constexpr, HAS_ZERO: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr,
    P: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr, AHEAD: tl.constexpr, NORM: tl.constexpr,
    HAS_EXTRA: tl.constexpr, DELTA_OUT: tl.constexpr, BLOCK_ROW: tl.constexpr,
):
    await_inputs(PDL)
    slot = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # output features
    rmask = rows < D
    expert = _slot_expert(slot, idx_ptr, logits_ptr, reroute_ptr, zero_ptr, idx_ptr, E, 0, K_ACT, K_P2,
                          BLOCK_E, ROUTED, HAS_REROUTE, HAS_ZERO)
    n_groups = I // 32
    n_tiles = tl.cdiv(n_groups, G)
    chunk = tl.cdiv(n_tiles, SPLIT)  # split-K: this program's share of the tiles (grid axis 2)
    t_start = tl.program_id(2) * chunk
    out = _rows_dot(w_ptr + expert * stride_we + rows[:, None] * stride_wr,
                    s_ptr + expert * stride_se + rows[:, None] * stride_sr,
                    act_bt_ptr + slot * stride_abt + tl.arange(0, P * G)[:, None] * (n_tiles * 32 * G),
                    act_xe_ptr + slot * stride_axe, t_start, tl.minimum(t_start + chunk, n_tiles), I // 2, n_groups,
                    rmask, BLOCK_D, P, G, ASM, AHEAD)
    # Split-K: part s of slot j goes to row j * SPLIT + s (the bias in part 0); the reader adds them up.
    first = (rows * 0 + tl.program_id(2)) == 0  # a vector, not a scalar: the interpreter's masks need that
    out += tl.load(b_ptr + expert * stride_be + rows, mask=rmask & first, other=0.0).to(tl.float32)
    tl.store(out_ptr + (slot * SPLIT + tl.program_id(2)) * stride_on + rows, out, mask=rmask)
    if NORM:  # the residual update and the next norm (`add_rms_norm`), by the token's last program to finish
        token = slot // K_ACT
        tl.debug_barrier()  # every thread's stores before the release below
        arrived = tl.atomic_add(count_ptr + token, 1, sem="acq_rel")
        if arrived == K_ACT * tl.num_programs(1) * SPLIT - 1:  # all of the token's parts are visible now
            cols = tl.arange(0, BLOCK_ROW)
            normed_row(x_ptr, out_ptr, extra_ptr, scale_ptr, res_ptr, normed_ptr, wts_ptr, dout_ptr, x_ptr, token,
                       cols, cols < D, cols >= 0, D, eps, stride_x, stride_on, stride_r, stride_o, BLOCK_ROW, True,
                       HAS_EXTRA, K_ACT * SPLIT, DELTA_OUT, False, SPLIT)
            tl.store(count_ptr + token, 0)  # zeroed for the next use


def _then_norm_args(then_norm: dict | None, routed: bool, N: int, D: int, weights, placeholder) -> dict:
    """The down kernel's arguments for `moe_decode_slices(then_norm=...)`, checked."""
    flags = dict(NORM=then_norm is not None, HAS_EXTRA=False, DELTA_OUT=False, BLOCK_ROW=1)
    if then_norm is None:
        return {"args": (placeholder,) * 8 + (0.0, 0, 0, 0), "flags": flags}
    check(routed, "then_norm needs the routing in the kernels (router_logits), for the routing weights")
    want = {"x", "scale", "eps", "extra", "residual_out", "out", "delta_out", "counters"}
    check(set(then_norm) == want, f"then_norm must have the keys {sorted(want)}, got {sorted(then_norm)}")
    x, extra, delta_out, counters = then_norm["x"], then_norm["extra"], then_norm["delta_out"], then_norm["counters"]
    for name in ("x", "residual_out", "out"):
        t = then_norm[name]
        check(tuple(t.shape) == (N, D) and t.stride(-1) == 1 and t.dtype == x.dtype,
              f"then_norm[{name!r}] must be [{N}, {D}] of x's dtype with contiguous rows")
    check(then_norm["residual_out"].data_ptr() != x.data_ptr(), "then_norm's residual_out cannot be x itself")
    check(tuple(then_norm["scale"].shape) == (D,), f"then_norm['scale'] must be [{D}]")
    check(extra is None or tuple(extra.shape) == (D,), f"then_norm['extra'] must be [{D}] or None")
    check(delta_out is None or (tuple(delta_out.shape) == (N, D) and delta_out.is_contiguous()),
          f"then_norm['delta_out'] must be contiguous [{N}, {D}] or None")
    check(counters.dtype == torch.int32 and counters.is_contiguous() and counters.numel() >= N,
          f"then_norm['counters'] must be contiguous int32 with at least {N} zeros")
    flags.update(HAS_EXTRA=extra is not None, DELTA_OUT=delta_out is not None, BLOCK_ROW=triton.next_power_of_2(D))
    args = (x, extra if extra is not None else x, then_norm["scale"], then_norm["residual_out"], then_norm["out"],
            weights, delta_out if delta_out is not None else x, counters, float(then_norm["eps"]), x.stride(0),
            then_norm["residual_out"].stride(0), then_norm["out"].stride(0))
    return {"args": args, "flags": flags}


def moe_decode_slices(
    x_slices: tuple[torch.Tensor, torch.Tensor], topk_indices: torch.Tensor | None,
    mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, *, router_logits: torch.Tensor | None = None, k: int | None = None,
    reroute_mask: torch.Tensor | None = None, zero_mask: torch.Tensor | None = None,
    indices_out: torch.Tensor | None = None, weights_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None, act_slices: tuple[torch.Tensor, torch.Tensor] | None = None,
    blocks: dict | None = None, pdl: bool = False, then_norm: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gate/up then down on the tensor cores for each (token, choice) slot -> (parts fp32 [N * k * splits, D],
    indices, weights), the parts laid out as `moe.moe_decode_parts` lays them out (splits =
    TC_BLOCKS["SPLIT_D"] or `blocks`), each not yet weighted.

    x_slices: the input's slices (`input_slices(x)` or `add_rms_norm(slices_out=...)`), N rows of D.
    Either topk_indices [N, k] (then indices and weights come back None), or router_logits [N, E] with k: every
    program then picks its expert itself (`routing.top_k_softmax`, the masks included), and the routing lands
    in `indices_out`/`weights_out` (int64 / fp32 [N, k], new if None) and is returned.
    act_slices: zeroed buffers `new_slices(N * k, I)` for the SwiGLU outputs, kept by a CUDA-graph caller (any
    zeroed pair works, and stays fit for reuse); new ones are made if None.
    then_norm (routed only): dict(x, scale, eps, extra, residual_out, out, delta_out, counters) - the residual
    update and norm after the MoE, `add_rms_norm(x, parts, scale, eps, extra, weights=weights,
    delta_out=delta_out)` into residual_out and out, done by each token's last program to finish instead of a
    kernel of its own (the decoder's). extra and delta_out may be None; counters: zeroed int32 [N], left zeroed.
    Torch twin:
    `ossscope.ops.moe_experts(per_expert=True)` (after `routing.route_reference` for router logits).
    """
    D = mlp2_blocks.shape[1]
    E, I = _check_decode_weights(D, mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales)
    N = x_slices[1].shape[0] if isinstance(x_slices, tuple) and len(x_slices) == 2 else -1
    bt, xe = _check_slices("x_slices", x_slices, N, D)
    check_runnable(bt)
    routed = router_logits is not None
    if routed:
        check(k is not None and topk_indices is None, "pass either topk_indices, or router_logits with k")
        check(tuple(router_logits.shape) == (N, E) and router_logits.is_contiguous()
              and router_logits.is_floating_point(),
              f"router_logits must be contiguous floats [N={N}, E={E}], got {tuple(router_logits.shape)}")
        check_routing(E, k, reroute_mask, zero_mask)
        indices, weights = _routing_outputs(N, k, bt.device, indices_out, weights_out)
    else:
        check(topk_indices is not None and topk_indices.dim() == 2 and topk_indices.shape[0] == N
              and not topk_indices.is_floating_point(),
              f"topk_indices must be integers [N={N}, k], got "
              f"{None if topk_indices is None else (topk_indices.dtype, tuple(topk_indices.shape))}")
        k = topk_indices.shape[1]
        indices, weights = topk_indices.contiguous(), None
    check_same_device(x_slices=bt, mlp1_blocks=mlp1_blocks, mlp2_blocks=mlp2_blocks, router_logits=router_logits,
                      reroute_mask=reroute_mask, zero_mask=zero_mask, indices=indices)
    cfg = {**TC_BLOCKS, **(blocks or {})}
    split_d = cfg["SPLIT_D"]
    S = N * k
    parts = _parts_buffer(out, S, split_d, D, bt.device)
    act_bt, act_xe = (_check_slices("act_slices", act_slices, S, I) if act_slices is not None
                      else new_slices(S, I, bt.device))
    if S == 0:
        return parts, (indices if routed else None), weights
    bytes1 = mlp1_blocks.view(E, 2 * I, D // 2)
    bytes2 = mlp2_blocks.view(E, D, I // 2)
    placeholder = bt  # for pointers a kernel never reads
    logits = router_logits if routed else placeholder
    reroute = reroute_mask if reroute_mask is not None else placeholder
    zero = zero_mask if zero_mask is not None else placeholder
    pdl_on = use_pdl(pdl, bt)
    flags = dict(K_ACT=k, K_P2=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(E), ROUTED=routed,
                 HAS_REROUTE=reroute_mask is not None, HAS_ZERO=zero_mask is not None, PDL=pdl_on,
                 P=SLICES, G=TILE_GROUPS, ASM=not interpreting(), AHEAD=cfg["AHEAD"], num_warps=cfg["WARPS"],
                 num_stages=cfg["STAGES"], launch_pdl=pdl_on)
    _gate_up_tc_kernel[(S, I // 32)](
        bt, xe, indices, logits, reroute, zero, weights if routed else placeholder, bytes1, mlp1_scales,
        mlp1_bias, act_bt, act_xe, D, I, E, bt.stride(0), xe.stride(0), bytes1.stride(0), bytes1.stride(1),
        mlp1_scales.stride(0), mlp1_scales.stride(1), mlp1_bias.stride(0), act_bt.stride(0), act_xe.stride(0),
        float(limit), float(alpha), **flags,
    )
    norm = _then_norm_args(then_norm, routed, N, D, weights, placeholder)
    _down_tc_kernel[(S, triton.cdiv(D, cfg["BLOCK_D"]), split_d)](
        act_bt, act_xe, indices, logits, reroute, zero, bytes2, mlp2_scales, mlp2_bias, parts,
        D, I, E, act_bt.stride(0), act_xe.stride(0), bytes2.stride(0), bytes2.stride(1), mlp2_scales.stride(0),
        mlp2_scales.stride(1), mlp2_bias.stride(0), parts.stride(0), *norm["args"], BLOCK_D=cfg["BLOCK_D"],
        SPLIT=split_d, **norm["flags"], **flags,
    )
    return parts, (indices if routed else None), weights
