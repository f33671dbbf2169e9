"""What one decode step costs on each layer of the user's path, on random weights of a preset's shape (GPU).

    python scripts/step_overhead.py [--preset gpt-oss-20b] [--context 1024] [--steps 256] [--batch 1 64]

Per batch size, decode tok/s (summed over rows) of:
  graph          GraphDecoder.step + argmax, nothing copied to the host (the bench's bare loop)
  + records      the same, plus the step's router/sink record copied to pinned host memory as the Decoder does
                 (transposed views [B, L, k]: a copy kernel and a memcpy each), taken one step later
  + flat records the same record copied as the GraphDecoder holds it ([L, B, k], contiguous: one memcpy each)
  engine.step    the engine the Decoder calls (cache.only, StepRecord), + records as the Decoder copies them
  Decoder.run    the user's path (generate/chat without the tokenizer), greedy
and a profiler table of the GPU work outside the graph's kernels during Decoder.run.
"""

from __future__ import annotations

import argparse
import time

import torch

from ossscope.bench import random_model_on_gpu
from ossscope.config import resolve_config
from ossscope.engine import set_engine
from ossscope.generation import Decoder, _HostCopies, _record_tensors


def rate(fn, steps: int, batch: int) -> float:
    fn(8)  # warm
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn(steps)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def measure(model, engine, B: int, args, profile: bool) -> dict:
    """One batch size's row of the table (and, with `profile`, the profiler table)."""
    from ossscope import fast

    cfg = model.config
    max_len = args.context + 8 * args.steps + 64
    ids = torch.randint(0, cfg.vocab_size, (B, args.context), device="cuda")
    cache = model.new_cache(B, max_len)
    fast.prefill(model, ids, cache, fused=True)
    graph = fast.GraphDecoder(model, cache)
    copies = _HostCopies(model.device)
    token = torch.zeros(B, dtype=torch.long, device="cuda")

    def bare(n: int) -> None:
        t = token
        for _ in range(n):
            t = graph.step(t).argmax(-1)

    def with_records(n: int, flat: bool = False) -> None:
        t, pending = token, None
        for _ in range(n):
            t = graph.step(t).argmax(-1)
            if flat:
                record = {"i": graph.router_indices, "w": graph.router_weights, "s": graph.sink}
            else:
                record = {"i": graph.router_indices.transpose(0, 1), "w": graph.router_weights.transpose(0, 1),
                          "s": graph.sink.transpose(0, 1)}
            copied = copies.put(record)
            if pending is not None:
                pending.take()
            pending = copied
        copies.release()

    row = {"B": B, "graph": rate(bare, args.steps, B), "+ records": rate(with_records, args.steps, B),
           "+ flat records": rate(lambda n: with_records(n, True), args.steps, B)}
    engine.clear_pool()

    def through_engine(n: int) -> None:
        t, pending = token, None
        for _ in range(n):
            logits, record = engine.step(t, cache, (), None)
            t = logits.argmax(-1)
            copied = copies.put(_record_tensors(record))
            if pending is not None:
                pending.take()
            pending = copied
        copies.release()

    row["engine.step"] = rate(through_engine, args.steps, B)
    engine.clear_pool()

    def decoder_run(n: int) -> None:
        decoder = Decoder(model, batch_size=B, max_len=args.context + n + 8, temperature=0.0, stop_tokens=())
        decoder.feed(ids)
        torch.cuda.synchronize()
        stamps = []
        for _ in decoder.run(n):
            stamps.append(time.perf_counter())
        decoder_run.rate = B * (len(stamps) - 1) / (stamps[-1] - stamps[0])
        decoder.close()

    decoder_run(16)
    decoder_run(args.steps)
    row["Decoder.run"] = decoder_run.rate
    if profile:
        decoder = Decoder(model, batch_size=B, max_len=args.context + 64, temperature=0.0, stop_tokens=())
        decoder.feed(ids)
        steps = decoder.run(40)
        for _ in range(20):
            next(steps)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                next(steps)
            torch.cuda.synchronize()
        print(f"-- profile of 10 Decoder.run steps at B={B} (GPU time, top 25)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        steps.close()
        decoder.close()
    engine.clear_pool()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    model = random_model_on_gpu(resolve_config(args.preset))
    engine = set_engine(model, "kernels")
    table = [measure(model, engine, B, args, profile=i == 0) for i, B in enumerate(args.batch)]
    keys = list(table[0])
    print(" ".join(f"{k:>15}" for k in keys))
    for row in table:
        print(" ".join(f"{row[k]:>15.1f}" if isinstance(row[k], float) else f"{row[k]:>15}" for k in keys))


if __name__ == "__main__":
    main()
