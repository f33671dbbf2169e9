"""Batched chats against one at a time on a trained model (nano), on a GPU: greedy tokens and router rows.

    python scripts/nano_batch_agreement.py --n 48
"""

from __future__ import annotations

import argparse

import ossscope


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    model = ossscope.load("nano", device=args.device, progress=False)
    questions = [f"What is {17 * i + 3} + {29 * i + 11}?" for i in range(args.n)]
    options = dict(reasoning="medium", max_new_tokens=120, temperature=0.0)
    alone = [model.chat(q, **options) for q in questions]
    together = model.chat(questions, batch_size=16, **options)
    same = sum(a.tokens == b.tokens for a, b in zip(alone, together, strict=True))
    rows = agree = 0
    for a, b in zip(alone, together, strict=True):
        pairs = zip(a.tokens, b.tokens, strict=False)
        n = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(a.tokens), len(b.tokens)))
        ra, rb = a.router_indices[:n].sort(-1).values, b.router_indices[:n].sort(-1).values
        agree += int((ra == rb).all(-1).sum())
        rows += ra.shape[0] * ra.shape[1]
    print(f"nano, {args.n} greedy chats, batch 16 (continuous, rows refilled together) vs one at a time: "
          f"identical tokens {same}/{args.n}; router rows identical over the common prefix {agree / max(1, rows):.2%} "
          f"of {rows}; same final answer {sum(a.final == b.final for a, b in zip(alone, together, strict=True))}"
          f"/{args.n}")


if __name__ == "__main__":
    main()
