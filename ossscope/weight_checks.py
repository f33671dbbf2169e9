"""Checks of loaded weight values: NaN/Inf floats and MXFP4 scale byte 255 (NaN in E8M0) give NaN logits.

The checks run on the device, on the model's own copy of each tensor right after it is filled, as reductions
(`aminmax` for floats, `amax` for scales), so they allocate nothing the size of a tensor and read each weight
once more at device bandwidth. Their flags stay on the device until `raise_if_bad()`, which syncs once for the
whole checkpoint; only then, and only for a bad tensor, are the details (counts, first index) computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

NAN_SCALE = 255  # E8M0 has no zero and no infinity; the all-ones exponent is NaN


class BadWeightsError(ValueError):
    """A tensor whose values would make the model compute NaN (the loader re-raises it as a CheckpointError)."""


@dataclass
class _Pending:
    name: str
    file: Path
    value: torch.Tensor  # the model's tensor (or the rows of it) holding this checkpoint tensor
    kind: str  # "float" or "scales"
    flag: torch.Tensor  # 0-d bool on the device: True when something is wrong


class WeightChecks:
    """Collects one device-side flag per loaded tensor; `raise_if_bad()` reports the first bad tensor by name."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def add(self, name: str, file: Path, value: torch.Tensor, kind: str) -> None:
        """Queue the check of `value` (already in the model) for checkpoint tensor `name`.

        kind: "float" (must be finite), "scales" (MXFP4 E8M0 bytes: 255 is NaN) or "blocks" (every E2M1 nibble
        is a finite value: nothing to check).
        """
        if kind == "blocks" or value.numel() == 0:
            return
        if kind == "float":
            low, high = torch.aminmax(value)  # NaN propagates through both; Inf shows in one of them
            flag = ~(torch.isfinite(low) & torch.isfinite(high))
        elif kind == "scales":
            flag = value.amax() == NAN_SCALE
        else:
            raise ValueError(f"unknown weight kind {kind!r}; use 'float', 'scales' or 'blocks'")
        self._pending.append(_Pending(name, file, value, kind, flag))

    def raise_if_bad(self) -> None:
        """Raise BadWeightsError naming the first bad tensor (in loading order); forget the queued checks."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        bad = torch.stack([p.flag for p in pending]).nonzero()  # the one host sync of the whole check
        if len(bad):
            raise BadWeightsError(_describe(pending[int(bad[0, 0])]))


def _describe(p: _Pending) -> str:
    if p.kind == "scales":
        where = (p.value == NAN_SCALE)
        first = tuple(where.nonzero()[0].tolist())
        return (f"{p.file.name}: tensor {p.name} holds {int(where.sum())} scale byte(s) of 255, which is NaN in "
                f"MXFP4's E8M0 scales (first at index {first}): the experts would compute NaN")
    nan, inf = torch.isnan(p.value), torch.isinf(p.value)
    first = tuple((nan | inf).nonzero()[0].tolist())
    text = (f"{p.file.name}: tensor {p.name} holds {int(nan.sum())} NaN and {int(inf.sum())} Inf value(s) "
            f"(first at index {first}) in {str(p.value.dtype).removeprefix('torch.')}")
    if p.value.dtype == torch.float16 and _finite_in_file(p):
        return text + ": the file's values are finite but overflow float16 (max 65504); load in bfloat16 or float32"
    return text + ": the model would compute NaN logits"


def _finite_in_file(p: _Pending) -> bool:
    from safetensors import safe_open

    with safe_open(str(p.file), framework="pt", device="cpu") as f:
        return bool(torch.isfinite(f.get_tensor(p.name)).all())
