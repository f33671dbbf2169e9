"""Load-time cost of the weight value checks (NaN/Inf floats, MXFP4 scale byte 255): load a checkpoint with the
checks on and off, alternating, and report the median of each.

    python scripts/load_check_cost.py nano
    python scripts/load_check_cost.py 20b-layers --layers 2 --dtype bf16   # writes a random 20b-shaped checkpoint

The checks run as device reductions on the model's own tensors with one sync at the end (ossscope.weight_checks).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import ossscope
from ossscope import loading


def timed_load(path, device: str, dtype: str | None, checks: bool) -> float:
    patches = [] if checks else [mock.patch.object(loading.WeightChecks, "add", lambda *a, **k: None)]
    for patch in patches:
        patch.start()
    try:
        started = time.perf_counter()
        model = ossscope.load(path, device=device, dtype=dtype, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    finally:
        for patch in patches:
            patch.stop()
    del model
    return elapsed


def checks_alone(path, device: str, dtype: str | None, repeats: int) -> tuple[float, int]:
    """Median seconds of the checks over an already loaded model's tensors, and the bytes they read."""
    model = ossscope.load(path, device=device, dtype=dtype, progress=False)
    state = model.state_dict()
    slots = loading.checkpoint_slots(model.config, loading.locate(path).layout)
    targets = {slot.target: loading.value_kind(slot) for slot in slots.values()}
    read = sum(state[t].numel() * state[t].element_size() for t, kind in targets.items() if kind != "blocks")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        checks = loading.WeightChecks()
        for target, kind in targets.items():
            checks.add(target, Path("-"), state[target], kind)
        checks.raise_if_bad()
        times.append(time.perf_counter() - started)
    return statistics.median(times), read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["nano", "20b-layers"])
    parser.add_argument("--layers", type=int, default=2, help="layers of the 20b shape to write (20b-layers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "nano":
            path = "nano"
        else:
            config = ossscope.PRESETS["gpt-oss-20b"].replace(num_hidden_layers=args.layers)
            model = ossscope.random_model(config, device="cpu", dtype="bf16")
            path = ossscope.write_checkpoint(model, Path(tmp) / "20b-layers")
            del model
        size = sum(f.stat().st_size for f in ossscope.loading.locate(path).files)
        timed_load(path, args.device, args.dtype, True)  # warm the page cache
        on, off = [], []
        for _ in range(args.repeats):
            off.append(timed_load(path, args.device, args.dtype, False))
            on.append(timed_load(path, args.device, args.dtype, True))
        t_on, t_off = statistics.median(on), statistics.median(off)
        dtype = args.dtype or "default"
        print(f"{args.what}: {size / 1e9:.3f} GB of safetensors, device {args.device}, dtype {dtype}, "
              f"{torch.get_num_threads()} threads, median of {args.repeats}: load {t_off:.3f} s without the checks, "
              f"{t_on:.3f} s with them (+{t_on - t_off:.3f} s, {100 * (t_on / t_off - 1):+.1f}%)")
        print(f"  without: {[round(t, 3) for t in off]}\n  with:    {[round(t, 3) for t in on]}")
        alone, read = checks_alone(path, args.device, args.dtype, args.repeats)
        print(f"  the checks alone, on the loaded model: {alone:.3f} s for {read / 1e9:.3f} GB of float weights and "
              f"scales ({read / 1e9 / alone:.1f} GB/s)")


if __name__ == "__main__":
    main()
