"""Sweep kernels.linear's tiles on the GPU at the gpt-oss attention projections, against cuBLAS (torch):
check each config against torch, time it in a CUDA graph over `layers` weight sets, print a table.
`python scripts/linear_sweep.py --json $OUT/linear_sweep.json`."""

from __future__ import annotations

import argparse
import json

import torch

from ossscope import kernels
from ossscope.bench import COPY_BANDWIDTH, graph_time
from ossscope.config import PRESETS

# The first, {}, is kernels.linear.default_blocks for the shape.
CONFIGS = [{}, {"ROWS": 4, "BLOCK_K": 512}, {"ROWS": 2, "BLOCK_K": 512}, {"ROWS": 8, "BLOCK_K": 256},
           {"ROWS": 4, "BLOCK_K": 256}, {"ROWS": 2, "BLOCK_K": 1024}, {"ROWS": 8, "BLOCK_K": 512}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    c = PRESETS[args.preset]
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for name, N, K in (("qkv", c.q_width + 2 * c.kv_width, c.hidden_size), ("out", c.hidden_size, c.q_width)):
        ws = [(torch.randn(N, K, device="cuda", generator=gen) / K**0.5).bfloat16() for _ in range(args.layers)]
        bs = [torch.randn(N, device="cuda", generator=gen).bfloat16() for _ in range(args.layers)]
        x = torch.randn(1, K, device="cuda", generator=gen).bfloat16()
        ref = torch.nn.functional.linear(x.float(), ws[0].float(), bs[0].float())
        nbytes = N * K * 2
        for cfg in [None, *CONFIGS]:
            if cfg is None:
                fns = [lambda w=w, b=b, x=x: torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs, strict=True)]
            else:
                fns = [lambda w=w, b=b, x=x, cfg=cfg: kernels.linear(x, w, b, blocks=cfg)
                       for w, b in zip(ws, bs, strict=True)]
            err = float((fns[0]().float() - ref).norm() / ref.norm())
            t = min(graph_time(fns, reps=20) for _ in range(2))
            label = "cuBLAS" if cfg is None else cfg or "default"
            row = {"case": name, "cfg": label, "us": t * 1e6, "TB/s": nbytes / t / 1e12,
                   "of_peak": nbytes / t / COPY_BANDWIDTH, "rel_err": err}
            results.append(row)
            print(f"{name:<4} {t * 1e6:7.2f} us {nbytes / t / 1e12:5.2f} TB/s {row['of_peak']:6.1%} err {err:.1e}  "
                  f"{row['cfg']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
