"""Do batched and one-at-a-time greedy runs agree on a GPU? (gpt-oss-20b shape, random weights, bf16.)

Batch 1 and batch B run different MoE kernels (per-slot fp8 tensor cores vs grouped by expert) and the rows of a
batch prefill at batch 1 or together, so results agree up to rounding: a near-tie between two tokens or two experts
can flip. Prints the share of prompts whose tokens are identical, the mean length of the common prefix, and the
share of identical router rows over that prefix. Then, at every prompt where the runs part, the gap between the
two tokens' logits in a plain batch-1 forward of the common prefix (`model(ids)`, the same kernels): a near-tie
(a gap within bf16 rounding of the logits, ~0.03 at their size) says rounding, a large gap a bug. And whether two
one-at-a-time runs agree with each other (the prefill's MoE sums in fp32 atomics, in no fixed order).

    python scripts/batch_agreement.py --prompts 32 --new 64
"""

from __future__ import annotations

import argparse

import torch

from ossscope.bench import random_model_on_gpu
from ossscope.config import resolve_config
from ossscope.engine import set_engine
from ossscope.generation import generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    model = random_model_on_gpu(resolve_config("gpt-oss-20b"))
    set_engine(model, "kernels")
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(20, 300, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    alone = [generate(model, [p], max_new_tokens=args.new, stop_tokens=()) for p in prompts]
    batched = generate(model, prompts, max_new_tokens=args.new, stop_tokens=(), batch_size=args.prompts)
    same, prefix, router_same, router_total = 0, [], 0, 0
    for b, ref in enumerate(alone):
        ours, theirs = batched.tokens[b], ref.tokens[0]
        n = next((i for i, (x, y) in enumerate(zip(ours, theirs, strict=True)) if x != y), len(theirs))
        same += n == len(theirs)
        prefix.append(n)
        a, r = batched.router_indices[b, :n].sort(-1).values, ref.router_indices[0, :n].sort(-1).values
        router_same += int((a == r).all(-1).sum())
        router_total += a.shape[0] * a.shape[1]
    print(f"{args.prompts} prompts x {args.new} greedy tokens, batch {args.prompts} vs one at a time: "
          f"identical {same}/{args.prompts}; common prefix {sum(prefix) / len(prefix):.1f} tokens on average; "
          f"router rows identical over it {router_same / max(1, router_total):.2%}")
    gaps, tops = [], []
    for b, ref in enumerate(alone):
        ours, theirs, n = batched.tokens[b], ref.tokens[0], prefix[b]
        if n == len(theirs):
            continue
        ids = torch.tensor([prompts[b] + theirs[:n]], device="cuda")
        with torch.no_grad():
            logits = model(ids)[0, -1].float()
        gaps.append(abs(logits[theirs[n]] - logits[ours[n]]).item())
        tops.append(logits.max().item())
    if gaps:
        gaps.sort()
        print(f"logit gap between the two runs' tokens where they part ({len(gaps)} prompts; top logit about "
              f"{sum(tops) / len(tops):.1f}): median {gaps[len(gaps) // 2]:.4f}, max {gaps[-1]:.4f}, "
              f"{sum(g < 0.0625 for g in gaps)} under 0.0625")
    again = [generate(model, [p], max_new_tokens=args.new, stop_tokens=()) for p in prompts]
    repeat = sum(a.tokens[0] == r.tokens[0] for a, r in zip(again, alone, strict=True))
    print(f"one at a time, run twice: identical {repeat}/{args.prompts}")


if __name__ == "__main__":
    main()
