"""Chat through both engines on one checkpoint, as a user would, and compare: tokens, router records, sinks, speed.

    python scripts/chat_engines.py [nano | PATH] [--device cuda] [--max-new-tokens 300]

Loads the checkpoint once per engine (`ossscope.load(path, engine=...)`), runs the same greedy chats on each
(the first one warms up: compilation, graph capture), and prints per engine the tok/s of `model.chat`, the delay
to the first token of a later chat, and whether its tokens and records equal the torch engine's.
"""

from __future__ import annotations

import argparse
import time

import torch

import ossscope

QUESTIONS = ["What is 1234 + 987?", "What is 5032 - 1479?", "What's the weather in Paris?"]


def run(path: str, device: str, engine: str, max_new_tokens: int) -> list[dict]:
    model = ossscope.load(path, device=device, engine=engine, progress=False)
    tools = []
    if path == "nano":
        from ossscope.nano import get_weather

        tools = [get_weather]
    model.chat(QUESTIONS[0], reasoning="high", max_new_tokens=max_new_tokens, temperature=0, tools=tools)  # warm
    rows = []
    for question in QUESTIONS:
        stamps: list[float] = []
        started = time.perf_counter()
        trace = model.chat(question, reasoning="high", max_new_tokens=max_new_tokens, temperature=0, tools=tools,
                           on_token=lambda e, stamps=stamps: stamps.append(time.perf_counter()))
        seconds = time.perf_counter() - started
        rows.append({"question": question, "trace": trace, "seconds": seconds,
                     "first_ms": (stamps[0] - started) * 1e3 if stamps else None,
                     "engine": model.engine.describe()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="nano")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    args = parser.parse_args()
    results = {engine: run(args.path, args.device, engine, args.max_new_tokens) for engine in ("torch", "kernels")}
    print(f"{'engine':8} {'question':30} {'tokens':>6} {'tok/s':>8} {'first ms':>9}  same tokens / router / sink "
          "as torch")
    for engine, rows in results.items():
        for row, ref in zip(rows, results["torch"], strict=True):
            trace, ref_trace = row["trace"], ref["trace"]
            same = trace.tokens == ref_trace.tokens
            n = min(len(trace.tokens), len(ref_trace.tokens))
            routed = float((trace.router_indices[:n] == ref_trace.router_indices[:n]).all(-1).float().mean())
            sink = float((trace.sink[:n] - ref_trace.sink[:n]).abs().max()) if n else 0.0
            print(f"{engine:8} {row['question']:30} {len(trace.tokens):6d} {len(trace.tokens) / row['seconds']:8.1f} "
                  f"{row['first_ms']:9.1f}  {same} / {routed:.3f} of (token, layer) rows / max |d| {sink:.2e}"
                  f"   answer: {trace.final[:40]!r}")
        print(f"  {rows[-1]['engine']}")


if __name__ == "__main__":
    main()
