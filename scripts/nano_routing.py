"""Routing facts about gpt-oss-nano: which experts fire on which kinds of tokens.

Runs held-out episodes (teacher-forced: the prompt plus the reference reply) through `ossscope.load("nano")`,
records every layer's top-k experts per token (`blocks.{l}.mlp.hook_topk_indices`), labels each token by what
it is (a digit the model writes in column work, a carry/borrow digit of 1 vs 0, a column name, a JSON argument,
a prompt token...), and reports for each label the experts chosen far more often than their base rate.

    python scripts/nano_routing.py [--n 40] [--json routing.json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict

import torch

import ossscope
from ossscope.nano import data
from ossscope.tokenizer import Tokenizer, harmony_encoding


def label_tokens(texts: list[str], mask: list[int]) -> list[str]:
    """One label per token: what kind of token it is, from its text and its left context."""
    labels = []
    for i, text in enumerate(texts):
        prev = "".join(texts[max(0, i - 3) : i])
        t = text.strip()
        if not mask[i]:
            labels.append("prompt")
        elif re.fullmatch(r"\d", t) and re.search(r"(carry|borrow) ?$", prev):
            labels.append(f"carry/borrow digit {t if t in '01' else '?'}")
        elif re.fullmatch(r"\d", t) and re.search(r"write ?$", prev):
            labels.append("written digit")
        elif re.fullmatch(r"\d", t):
            labels.append("other single digit")
        elif re.fullmatch(r"\d{2,3}", t):
            labels.append("multi-digit number")
        elif t in {"ones", "tens", "hundreds", "thousands"}:
            labels.append("column name")
        elif t in {"carry", "borrow"}:
            labels.append("carry/borrow word")
        elif text.startswith("<|") and text.endswith("|>"):
            labels.append("harmony special")
        elif any(c in t for c in '{}":') and t:
            labels.append("JSON punctuation")
        else:
            labels.append("other reply text")
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=40, help="held-out arithmetic problems per operation")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = ossscope.load("nano", device="cpu", dtype=torch.float32, progress=False)
    enc, tok = harmony_encoding(), Tokenizer.for_model(model)
    episodes = [e for e in data.eval_arithmetic(args.n) if e.effort == "high"] + data.eval_tools(10)
    L, E = model.config.num_hidden_layers, model.config.num_experts
    names = [f"blocks.{layer}.mlp.hook_topk_indices" for layer in range(L)]
    counts = defaultdict(lambda: torch.zeros(L, E))  # label -> [L, E] times chosen
    totals: Counter = Counter()
    for episode in episodes:
        tokens, mask = data.render_episode(enc, episode)
        ids = torch.tensor([tok.to_model(tokens)])
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names=names)
        labels = label_tokens(tok.token_texts(ids[0].tolist()), mask)
        chosen = torch.stack([cache[n][0] for n in names], 1)  # [T, L, k]
        for t, label in enumerate(labels):
            totals[label] += 1
            counts[label].scatter_add_(1, chosen[t], torch.ones_like(chosen[t], dtype=torch.float32))
    all_counts = sum(counts.values())
    base = all_counts / all_counts.sum(1, keepdim=True)  # [L, E] share of all routing
    facts = []
    for label, c in sorted(counts.items(), key=lambda kv: -totals[kv[0]]):
        share = c / c.sum(1, keepdim=True)  # [L, E]
        lift = share / base.clamp_min(1e-9)
        layer, expert = divmod(int(torch.argmax(torch.where(share > 0.2, lift, torch.zeros_like(lift)))), E)
        facts.append({"label": label, "tokens": totals[label], "layer": layer, "expert": expert,
                      "share": round(float(share[layer, expert]), 3),
                      "base_share": round(float(base[layer, expert]), 3), "lift": round(float(lift[layer, expert]), 2),
                      "per_layer_top": [int(share[layer_].argmax()) for layer_ in range(L)]})
    print(f"{'label':<24}{'tokens':>7}  layer.expert  share  base   lift   top expert per layer")
    for f in facts:
        print(f"{f['label']:<24}{f['tokens']:>7}  L{f['layer']}.E{f['expert']:<8}{f['share']:>6.2f}"
              f"{f['base_share']:>6.2f}{f['lift']:>7.1f}   {f['per_layer_top']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(facts, fh, indent=1)


if __name__ == "__main__":
    main()
