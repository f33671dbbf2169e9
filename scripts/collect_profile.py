"""Where a batched collect's time goes on a GPU (gpt-oss-20b shape, random weights): the whole collect, the time
the host waited for the GPU, and a cProfile of the host's own work (the top functions by own time).

    python scripts/collect_profile.py --prompts 256 --new 128 --batch 64
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time

import torch

from ossscope import collect, generation
from ossscope.bench import random_model_on_gpu
from ossscope.config import resolve_config
from ossscope.engine import set_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    model = random_model_on_gpu(resolve_config("gpt-oss-20b"))
    set_engine(model, "kernels")
    questions = [collect.Prompt(index=i, line=i + 1, id=f"q{i}",
                                messages=[{"role": "user", "content": f"Question {i}: why is the sky blue?"}])
                 for i in range(args.prompts)]
    runner = collect.chat_runner(max_new_tokens=args.new, temperature=args.temperature)
    waited = []
    original = generation.Decoder.close

    def close(self):  # the host's waits for the GPU, per decoder
        waited.append(self.waited_s)
        original(self)

    generation.Decoder.close = close
    with tempfile.TemporaryDirectory() as out:
        collect.collect(model, questions[: args.batch * 2], out + "/warm", runner, "stats", batch_size=args.batch)
        waited.clear()
        torch.cuda.synchronize()
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        collect.collect(model, questions, out + "/run", runner, "stats", batch_size=args.batch)
        profile.disable()
        seconds = time.perf_counter() - t0
        tokens = collect.merge(out + "/run", questions)["tokens"]
    print(f"collect: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tok/s; host waited for the GPU "
          f"{sum(waited):.2f} s")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue()[-9000:])


if __name__ == "__main__":
    main()
