"""Where a prefill's time goes: host issue time against GPU time, and the kernels by GPU time.

One device visit: `python scripts/prefill_profile.py [--tokens 2048]`. On random weights of the gpt-oss-20b shape
(kernels on), it times `fast.prefill` wall-clock with and without waiting for the GPU (if the host takes as
long to issue the work as the GPU takes to run it, the prefill is bound by the host), then profiles one run
and prints the GPU kernels by total time and the busiest host-side operators.
"""

from __future__ import annotations

import argparse
import time

import torch

from ossscope import fast
from ossscope.bench import random_model_on_gpu
from ossscope.config import resolve_config


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--tokens", type=int, nargs="*", default=[1024, 2048])
    args = parser.parse_args()
    model = random_model_on_gpu(resolve_config(args.preset))
    fast.use_kernels(model)
    for T in args.tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
        for _ in range(2):
            fast.prefill(model, ids, model.new_cache(1, T), fused=True)
        torch.cuda.synchronize()
        issue, total = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            fast.prefill(model, ids, model.new_cache(1, T), fused=True)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            issue.append(t1 - t0)
            total.append(time.perf_counter() - t0)
        issue.sort(), total.sort()
        print(f"{T} tokens: host issues the work in {issue[2] * 1e3:.1f} ms, done after {total[2] * 1e3:.1f} ms "
              f"({T / total[2]:,.0f} tok/s)")
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            fast.prefill(model, ids, model.new_cache(1, T), fused=True)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = sorted((e for e in events if e.device_time_total > 0), key=lambda e: -e.device_time_total)
        busy = sum(e.self_device_time_total for e in events)
        print(f"  GPU busy {busy / 1e3:.1f} ms; kernels by GPU time:")
        for e in gpu[:12]:
            print(f"    {e.self_device_time_total / 1e3:7.2f} ms {e.count:5d}x  {e.key[:70]}")
        cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)
        print("  host operators by own CPU time:")
        for e in cpu[:12]:
            print(f"    {e.self_cpu_time_total / 1e3:7.2f} ms {e.count:5d}x  {e.key[:70]}")


if __name__ == "__main__":
    main()
