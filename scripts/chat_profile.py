"""Where a chat's time goes beyond the engine's step: the same decode through model.chat, generate and the raw
engine, greedy and sampled, on random weights of a preset's shape (GPU).

    python scripts/chat_profile.py [--preset gpt-oss-20b] [--context 1024] [--new 1024]

Prints decode tok/s (first to last token) per path, the share of the host's time spent waiting for the GPU (near
1: the GPU is the bound; near 0: the host is), and the GPU time of one sampling call per method.
"""

from __future__ import annotations

import argparse
import time

import torch

from ossscope.bench import cuda_time, random_model_on_gpu
from ossscope.config import resolve_config
from ossscope.engine import set_engine
from ossscope.generation import Decoder, sample_next


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new", type=int, default=1024)
    args = parser.parse_args()
    model = random_model_on_gpu(resolve_config(args.preset))
    engine = set_engine(model, "kernels")
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), device="cuda")
    message = "Why is the sky blue, and why are sunsets red? " * max(1, (args.context - 100) // 11)

    rows = []
    for temperature in (0.0, 1.0):
        for path in ("chat", "raw decoder"):
            for attempt in range(2):  # the first warms up (graph capture for this cache bucket)
                stamps: list[float] = []
                if path == "chat":
                    model.chat(message, max_new_tokens=args.new, temperature=temperature, seed=attempt,
                               on_token=lambda e, stamps=stamps: stamps.append(time.perf_counter()))
                    waited = None
                else:
                    decoder = Decoder(model, max_len=args.context + args.new + 8, temperature=temperature,
                                      seed=attempt, stop_tokens=())
                    decoder.feed(ids)
                    for _ in decoder.run(args.new):
                        stamps.append(time.perf_counter())
                    waited = decoder.waited_s / (stamps[-1] - stamps[0])
                    decoder.close()
            rows.append((path, temperature, decode_rate(stamps), waited))
    print(f"{'path':12} {'temperature':>11} {'decode tok/s':>13} {'host waiting':>13}")
    for path, temperature, rate, waited in rows:
        print(f"{path:12} {temperature:11.1f} {rate:13.1f} {'' if waited is None else f'{waited:.0%}':>13}")
    logits = torch.randn(1, cfg.vocab_size, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, fn in (("argmax", lambda: sample_next(logits)),
                     ("temperature 1", lambda: sample_next(logits, 1.0, 1.0, gen)),
                     ("temperature 1, top-p 0.9", lambda: sample_next(logits, 1.0, 0.9, gen))):
        print(f"sample_next {name:28} {cuda_time(fn, reps=20, warmup=3) * 1e6:8.1f} us (GPU)")
    print(engine.describe())


if __name__ == "__main__":
    main()
