"""Batch-1 decode tok/s of the CUDA-graph decoder under variants, and where a step's time goes.

One device visit: `python scripts/decode_ab.py --json $OUT/decode_ab.json`. On random weights of the
gpt-oss-20b shape with a 1k-token context, it times the graph decoder (router + sink recorded, as a trace does)
with the MoE on CUDA cores and on fp8 tensor cores, with and without programmatic dependent launch (VARIANTS),
or with `--sweep` the tensor-core MoE decode's blocks of SWEEP; prints each variant's first logits against the
first variant's (on random weights a one-ulp change can flip a routing choice, so only identical kernels give
0); then, with `--profile NAME[,NAME...]|best`, profiles those variants' graph replays and prints each kernel's
GPU time per step (under PDL a kernel's time includes its wait for the one before).
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib
import json
import os
import time

import torch
from ossscope.kernels import moe_tc

from ossscope import fast
from ossscope.bench import random_model_on_gpu
from ossscope.config import resolve_config

attention = importlib.import_module("ossscope.kernels.attention")  # the module (the package exports a function)

# name -> (environment, overrides of kernels.moe_tc.TC_BLOCKS). OSSSCOPE_MOE_DECODE=cuda_cores: the CUDA-core
# MoE kernels (kernels/moe.py) instead of the fp8 tensor-core ones (kernels/moe_tc.py).
VARIANTS = {
    "CUDA cores": ({"OSSSCOPE_PDL": "1", "OSSSCOPE_MOE_DECODE": "cuda_cores"}, {}),
    "tensor cores": ({"OSSSCOPE_PDL": "1", "OSSSCOPE_MOE_DECODE": "auto"}, {}),
    "tensor cores, no PDL": ({"OSSSCOPE_PDL": "0", "OSSSCOPE_MOE_DECODE": "auto"}, {}),
    "CUDA cores, no PDL": ({"OSSSCOPE_PDL": "0", "OSSSCOPE_MOE_DECODE": "cuda_cores"}, {}),
    "CUDA cores again": ({"OSSSCOPE_PDL": "1", "OSSSCOPE_MOE_DECODE": "cuda_cores"}, {}),  # steps deterministic?
}
# --sweep: the tensor-core MoE decode's blocks (kernels.moe_tc.TC_BLOCKS) and the attention decode's programs
# (ATTENTION_PROGRAMS: kernels.attention.DECODE_PROGRAMS), each on top of the current defaults, under PDL.
SWEEP = {
    "defaults": {},
    "scales in the loop": {"AHEAD": False},
    "2 stages": {"STAGES": 2},
    "4 stages": {"STAGES": 4},
    "attention 64 programs": {"ATTENTION_PROGRAMS": 64},
    "attention 128 programs": {"ATTENTION_PROGRAMS": 128},
    "attention 512 programs": {"ATTENTION_PROGRAMS": 512},
    "defaults again": {},
}


@torch.no_grad()
def time_decoder(model, prefilled, steps: int) -> tuple[float, torch.Tensor]:
    """tok/s over `steps` graph steps from a copy of the `prefilled` cache, and the first step's logits."""
    cache = copy.deepcopy(prefilled)
    decoder = fast.GraphDecoder(model, cache)
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    first = decoder.step(token).clone()
    token = first.argmax(-1)
    for _ in range(3):
        token = decoder.step(token).argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = decoder.step(token).argmax(-1)
        decoder.router_indices.clone(), decoder.router_weights.clone(), decoder.sink.clone()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0), first


@torch.no_grad()
def profile_steps(model, prefilled, steps: int = 20) -> dict:
    """Kernel GPU time per step by kernel name, and the step's wall time minus its kernels (gaps)."""
    cache = copy.deepcopy(prefilled)
    decoder = fast.GraphDecoder(model, cache)
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    for _ in range(3):
        token = decoder.step(token).argmax(-1)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            token = decoder.step(token).argmax(-1)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels))
    busy = sum(v[1] for v in by_name.values())
    rows = sorted(((n, c / steps, t / steps) for n, (c, t) in by_name.items()), key=lambda r: -r[2])
    return {"us_per_step": span / steps, "kernel_us_per_step": busy / steps,
            "kernels": [{"name": n[:80], "launches": c, "us": t} for n, c, t in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile", default="none", help="variants (comma-separated, or 'best') to profile afterwards")
    parser.add_argument("--sweep", action="store_true", help="time the SWEEP variants instead of VARIANTS")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = random_model_on_gpu(resolve_config(args.preset))
    fast.use_kernels(model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    report: dict = {"device": torch.cuda.get_device_name(), "preset": args.preset, "context": args.context,
                    "variants": {}}
    prefilled = model.new_cache(1, args.context + args.steps + 16)
    fast.prefill(model, ids, prefilled, fused=True)
    reference = None
    defaults, attention_programs = dict(moe_tc.TC_BLOCKS), attention.DECODE_PROGRAMS
    sweep_env = {"OSSSCOPE_PDL": "1", "OSSSCOPE_MOE_DECODE": "auto"}
    variants = {name: (sweep_env, blocks) for name, blocks in SWEEP.items()} if args.sweep else VARIANTS

    def configure(name: str) -> None:
        env, blocks = variants[name]
        os.environ.update(env)
        blocks = dict(blocks)
        attention.DECODE_PROGRAMS = blocks.pop("ATTENTION_PROGRAMS", attention_programs)
        moe_tc.TC_BLOCKS.clear()
        moe_tc.TC_BLOCKS.update({**defaults, **blocks})

    for name in variants:
        configure(name)
        tok_s, first = time_decoder(model, prefilled, args.steps)
        reference = first if reference is None else reference
        diff = ((first.float() - reference.float()).norm() / reference.float().norm()).item()
        report["variants"][name] = {"tok_s": tok_s, "rel_diff_vs_first": diff, "blocks": dict(moe_tc.TC_BLOCKS),
                                    "env": variants[name][0]}
        print(f"{name:26s} {tok_s:8.1f} tok/s   logits rel. diff vs first variant {diff:.2e}", flush=True)
    best = max(report["variants"], key=lambda n: report["variants"][n]["tok_s"])
    names = [best if n == "best" else n for n in args.profile.split(",") if n != "none"]
    report["profiles"] = {}
    for name in names:
        configure(name)
        prof = profile_steps(model, prefilled)
        report["profiles"][name] = prof
        print(f"\nprofile ({name}): {prof['us_per_step']:.0f} us per step, "
              f"{prof['kernel_us_per_step']:.0f} us in kernels")
        for row in prof["kernels"][:12]:
            print(f"  {row['us']:8.1f} us  {row['launches']:5.1f}x  {row['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
