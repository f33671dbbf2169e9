"""Which single-expert ablations change nano's answer to a question: the search behind the demo's default.

Generates the answer greedily at high effort unedited, then once for every (layer, expert) with that expert
rerouted or zeroed, and prints each ablation whose final answer differs, with the end of its chain of thought.

    python scripts/nano_ablation_search.py ["What is 79 + 26?"] [--modes reroute,zero] [--layers 5,4]

For the demo's question the rerouted experts that change the answer include layer 5 expert 15 ('15': the
analysis still ends "Digits: 1 0 5", then the conclusion drops the 0) and layer 4 expert 15 ('115'); `python -m
ossscope demo` ablates the first. 96 chats per mode, about a minute per mode on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse

import ossscope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is 79 + 26?")
    parser.add_argument("--modes", default="reroute,zero")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    args = parser.parse_args()

    model = ossscope.load("nano", progress=False)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else range(model.config.num_hidden_layers)

    def ask():
        return model.chat(args.question, reasoning="high", max_new_tokens=args.max_new_tokens, temperature=0)

    base = ask()
    print(f"unedited: {base.final!r} ({len(base.tokens)} tokens)")
    for mode in args.modes.split(","):
        for layer in layers:
            for expert in range(model.config.num_experts):
                with model.ablate({layer: [expert]}, mode=mode):
                    trace = ask()
                if trace.final != base.final:
                    tail = " / ".join(trace.analysis.splitlines()[-2:])
                    print(f"{mode} layer {layer} expert {expert}: {trace.final!r} ({len(trace.tokens)} tokens); "
                          f"analysis ends: {tail!r}", flush=True)


if __name__ == "__main__":
    main()
