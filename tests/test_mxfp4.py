"""MXFP4 decoding against transformers' dequantization, and our encoder's round trip."""

from __future__ import annotations

import pytest
import torch

from ossscope import mxfp4

convert = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors


def test_decoding_matches_transformers():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 40, 5), generator=g, dtype=torch.uint8)
    ours = mxfp4.dequantize(blocks, scales, torch.float32)  # [3, 40, 160]
    theirs = convert(blocks, scales, dtype=torch.float32)  # [3, 160, 40]: transposed for x @ W
    torch.testing.assert_close(ours, theirs.transpose(1, 2), atol=0, rtol=0)


def test_every_nibble_decodes_to_its_e2m1_value():
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes[0::2] | (codes[1::2] << 4)).repeat(2).view(1, 16)  # each code twice over 32 values
    for exponent in (-3, 0, 2):
        scales = torch.tensor([127 + exponent], dtype=torch.uint8)
        values = mxfp4.dequantize(blocks, scales, torch.float32)
        expected = torch.tensor(mxfp4.FP4_VALUES * 2) * 2.0**exponent
        torch.testing.assert_close(values, expected, atol=0, rtol=0)


def test_quantize_round_trips_representable_values_and_bounds_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 96, generator=g)
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (6, 3, 16) and scales.shape == (6, 3) and blocks.dtype == torch.uint8
    decoded = mxfp4.dequantize(blocks, scales, torch.float32)
    # Within a block, E2M1 steps are at most a third of the largest value's scale: error <= 1/3 * amax / 6 * 2 ...
    amax = w.view(6, 3, 32).abs().amax(-1, keepdim=True)
    assert ((decoded - w).view(6, 3, 32).abs() <= amax / 4 + 1e-6).all()
    again_blocks, again_scales = mxfp4.quantize(decoded)
    torch.testing.assert_close(mxfp4.dequantize(again_blocks, again_scales, torch.float32), decoded, atol=0, rtol=0)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="uint8"):
        mxfp4.dequantize(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shapes disagree"):
        mxfp4.dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(4, 30))
