"""Synthetic Traces for the widget, export and browser tests: random router/sink records of the right shapes,
a harmony-like sequence of channels, and text that tries to break out of HTML."""

from __future__ import annotations

import torch

from ossscope.trace import ToolCall, Trace

EVIL = '<img src=x onerror="window.__pwned=1"></script><!-- \u2028\u2029 &amp; "quotes"'

_WORDS = ["The", " user", " asks", " about", " 2", "+", "2", ".", " We", " answer", " 4", ".", "\n", " So"]


def synthetic_trace(
    T: int = 40,
    L: int = 4,
    E: int = 8,
    k: int = 2,
    H: int = 4,
    P: int = 12,
    seed: int = 0,
    user_text: str = "What is 2+2?",
    evil_token: bool = False,
    vocab: int = 200_000,
) -> Trace:
    """A Trace with T generated tokens: analysis first, then final; random routing and sink masses."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, L, E, generator=g)
    top = logits.topk(k, dim=-1)
    weights = top.values.softmax(-1).float()  # [T, L, k], like gpt-oss: softmax over the chosen k
    sink = torch.rand(T, L, H, generator=g) ** 2  # [T, L, H] masses in [0, 1)
    n_analysis = (2 * T) // 3
    channels, texts = [], []
    for t in range(T):
        if t in (0, n_analysis):
            channels.append("")
            texts.append("<|channel|>")
            continue
        channels.append("analysis" if t < n_analysis else "final")
        texts.append(_WORDS[t % len(_WORDS)])
    if evil_token:
        texts[3] = EVIL
    tokens = torch.randint(0, vocab, (T,), generator=g).tolist()
    final = "".join(x for x, c in zip(texts, channels, strict=True) if c == "final")
    analysis = "".join(x for x, c in zip(texts, channels, strict=True) if c == "analysis")
    return Trace(
        prompt_tokens=torch.randint(0, vocab, (P,), generator=g).tolist(),
        tokens=tokens,
        channels=channels,
        token_texts=texts,
        messages=[
            {"role": "system", "content": "You are ChatGPT. Reasoning: medium", "channel": None},
            {"role": "user", "content": user_text, "channel": None},
            {"role": "assistant", "channel": "analysis", "content": analysis},
            {"role": "assistant", "channel": "final", "content": final},
        ],
        analysis=analysis,
        final=final,
        tool_calls=[ToolCall(name="add", arguments='{"a": 2}', result="4", token_index=5)],
        router_indices=top.indices.long(),
        router_weights=weights,
        sink=sink.float(),
        prompt_token_texts=[f"p{i}" for i in range(P)],
        metadata={"num_experts": E, "model": "synthetic"},
    )


def chat_model(seed: int = 0):
    """The "tiny" random model with a compact vocabulary (harmony's special tokens plus the first o200k ids),
    so it can chat in harmony; fast on CPU."""
    import ossscope

    model = ossscope.random_model("tiny", seed=seed)
    specials = list(range(199_998, 200_019))
    model.vocab_map = list(range(model.config.vocab_size - len(specials))) + specials
    model.unknown_id = 0
    return model
