"""MXFP4: the packed 4-bit format of gpt-oss expert weights (torch reference).

A weight matrix [rows, K] is stored as
  blocks uint8 [rows, K/32, 16]: two E2M1 values a byte, low nibble = even element, high nibble = odd element;
  scales uint8 [rows, K/32]:     one E8M0 exponent per block of 32, bias 127.
value = FP4_VALUES[nibble] * 2 ** (scale - 127).

These functions are the reference: the Triton kernels decode the same way in registers, and the tests
check this decoder against Hugging Face transformers' `convert_moe_packed_tensors`.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 32  # values sharing one scale
SCALE_BIAS = 127

# E2M1 value of each nibble 0..15 (sign bit is the nibble's high bit).
FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode packed MXFP4 to floats.

    blocks: uint8 [..., G, 16], scales: uint8 [..., G]  ->  [..., G * 32] in `dtype`.
    Exact: every E2M1 value times a power of two is representable in bf16/fp16/fp32 (within range).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(
            f"MXFP4 shapes disagree: blocks {tuple(blocks.shape)} need [..., G, 16] with scales [..., G], "
            f"got scales {tuple(scales.shape)}"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low = lut[(blocks & 0x0F).long()]  # [..., G, 16] even elements
    high = lut[(blocks >> 4).long()]  # [..., G, 16] odd elements
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32]
    exponent = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values, exponent.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)  # [..., G * 32]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode floats [..., K] (K a multiple of 32) to MXFP4 (blocks [..., K/32, 16], scales [..., K/32]).

    Each block of 32 gets the power-of-two scale that maps its largest magnitude into E2M1's range (<= 6),
    then every value rounds to the nearest E2M1 value. Used for random test weights and the nano model.
    """
    K = weight.shape[-1]
    if K % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, got {K}")
    w = weight.detach().to(torch.float32).reshape(*weight.shape[:-1], K // BLOCK_SIZE, BLOCK_SIZE)
    amax = w.abs().amax(dim=-1)  # [..., G]
    # Smallest power of two with amax / 2^e <= 6; the largest E2M1 magnitude is 6 = 1.5 * 2^2.
    exponent = torch.ceil(torch.log2(amax.clamp_min(2.0**-126) / 6.0))
    exponent = exponent.clamp(-SCALE_BIAS, 127)
    scaled = w / torch.exp2(exponent).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=weight.device)  # magnitudes 0..6
    magnitude_code = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(dim=-1)  # nearest magnitude, [..., G, 32]
    sign = (scaled < 0) & (magnitude_code > 0)  # keep +0 for zeros
    nibbles = (magnitude_code + 8 * sign).to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # [..., G, 16]
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def random_packed(
    rows_shape: tuple[int, ...], K: int, generator: torch.Generator | None = None, device=None, std: float = 0.02
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 weights [*rows_shape, K] with roughly normal(0, std) values, built directly packed.

    Nibbles are uniform over the 16 codes and scales sit around log2(std / 2.5), so no float copy of the
    whole matrix is ever made (the 120b experts are 60 GB in bf16).
    """
    G = K // BLOCK_SIZE
    blocks = torch.randint(0, 256, (*rows_shape, G, 16), generator=generator, dtype=torch.uint8, device="cpu")
    base = SCALE_BIAS + round(torch.log2(torch.tensor(std / 2.5)).item())
    scales = torch.randint(base - 1, base + 2, (*rows_shape, G), generator=generator, dtype=torch.int32)
    return blocks.to(device), scales.to(torch.uint8).to(device)
