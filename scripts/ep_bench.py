"""Expert-parallel throughput and memory per GPU, random weights of a real shape (issue 8). Under torchrun:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 scripts/ep_bench.py --preset gpt-oss-120b --json ep.json

Every rank draws the same random model on its GPU, keeps its share of the experts (`shard_experts`), then all
ranks prefill one prompt and decode greedily in lockstep, eagerly (no CUDA graph): tokens move by all-to-all,
each owner runs its experts on the MXFP4 kernels (`--torch-experts`: the torch twin), attention uses the Triton
kernel. Rank 0 prints a table and
writes JSON. On CPU (gloo) it runs the same steps, which is how it was checked before a GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import ossscope
from ossscope import distributed
from ossscope.config import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-120b")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--context", type=int, default=1024, help="prompt length before decoding")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--torch-experts", action="store_true",
                        help="run the local experts on ops.moe_experts (the default on GPUs: kernels.moe_experts)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for name, value in distributed.GPU_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    rank, world = distributed.init_distributed()
    dev = distributed.default_device()
    cfg = PRESETS[args.preset]
    cuda = dev.type == "cuda"
    if cuda:
        from ossscope import kernels
        from ossscope.bench import random_model_on_gpu

        torch.cuda.set_device(dev)
        model = random_model_on_gpu(cfg, seed=0)
        for block in model.blocks:
            block.attn.attention_fn = kernels.attention
    else:
        model = ossscope.random_model(cfg, seed=0, device="cpu", dtype=torch.float32)
    distributed.shard_experts(model)
    if cuda and not args.torch_experts:
        for block in model.blocks:  # each owner runs its experts on the MXFP4 kernels instead of the torch twin
            block.mlp.experts_fn.inner = kernels.moe_experts

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (1, max(args.prefill, args.context)),
                        generator=torch.Generator().manual_seed(1)).to(dev)
    results = {}
    with torch.no_grad():
        model(ids[:, :16])  # warm-up: kernels compile, collectives connect
        sync()
        start = time.perf_counter()
        model(ids[:, : args.prefill])
        sync()
        results["prefill_tok_s"] = args.prefill / (time.perf_counter() - start)
        cache = model.new_cache(1, args.context + args.decode_steps + 4)
        logits = model(ids[:, : args.context], cache=cache)
        token = logits[:, -1:].argmax(-1)
        for _ in range(2):  # warm-up steps
            token = model(token, cache=cache)[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
        sync()
        results["decode_tok_s"] = args.decode_steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        device = torch.cuda.get_device_name() if cuda else "cpu"
        report = {"preset": args.preset, "world_size": world, "device": device, "backend": dist.get_backend(),
                  "torch": torch.__version__, "prefill_tokens": args.prefill, "context": args.context,
                  "experts": "ops.moe_experts" if args.torch_experts or not cuda else "kernels.moe_experts",
                  **results, "peak_GiB_per_rank": peaks}
        print(f"{args.preset} expert-parallel over {world} x {device} ({dist.get_backend()}), batch 1")
        print(f"prefill {args.prefill} tokens: {results['prefill_tok_s']:,.0f} tok/s")
        print(f"decode after {args.context} tokens: {results['decode_tok_s']:.1f} tok/s")
        print("peak GiB per rank: " + ", ".join(f"{p:.1f}" for p in peaks))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
