"""Analyses that need the model: logit lens and attention patterns for a Trace (kept in `trace.captured` so
they show in the views and export with the trace), and steering vectors from two sets of prompts."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ossscope.threads import cpu_threads
from ossscope.trace import Trace

from .payload import ATTENTION_PREFIX, LENS_NEXT_RANK, LENS_TOP_IDS, LENS_TOP_PROBS


def context_sequence(trace: Trace) -> tuple[list[int], list[int]]:
    """The whole sequence the model read (o200k ids: prompt, generated tokens and any tool answers fed between
    turns) and the position of each generated token in it."""
    if hasattr(trace, "context_tokens"):
        return trace.context_tokens()
    sequence = list(trace.prompt_tokens) + list(trace.tokens)
    return sequence, list(range(len(trace.prompt_tokens), len(sequence)))


@contextmanager
def as_recorded(model: Any, trace: Trace) -> Iterator[None]:
    """Re-run under the expert ablation the trace was generated with (trace.metadata["ablation"]), so the
    analysis explains that run; the model's own ablation comes back afterwards. Steering vectors are not stored
    in a trace: a mismatch is warned about, not fixed."""
    recorded = trace.metadata.get("ablation") or {}
    experts = {int(layer): [int(e) for e in chosen] for layer, chosen in (recorded.get("experts") or {}).items()}
    steered = {int(layer) for layer in (trace.metadata.get("steering") or {})}
    active = set(getattr(model, "active_steering", {}) or {})
    if steered != active:
        warnings.warn(f"the trace was generated with steering at layers {sorted(steered)} but the model now steers "
                      f"at {sorted(active)}: the analysis uses the model's current steering", stacklevel=3)
    previous = dict(model.active_ablation)
    model.clear_ablation()
    try:
        if experts:
            model.set_ablation(experts, mode=recorded.get("mode", "reroute"))
        yield
    finally:
        model.clear_ablation()
        if previous:
            model.set_ablation(previous["experts"], previous["mode"])


def _model_ids(model: Any, sequence: list[int]) -> torch.Tensor:
    """o200k ids -> model ids, [1, S]."""
    if not sequence:
        raise ValueError("the trace has no tokens to analyse")
    return torch.tensor([model.tokenizer.to_model(sequence)], dtype=torch.long, device=model.device)


def _positions(trace: Trace, positions: Sequence[int] | None) -> list[int]:
    T = len(trace.tokens)
    chosen = list(range(T)) if positions is None else [int(p) for p in positions]
    bad = [p for p in chosen if not 0 <= p < T]
    if bad:
        raise ValueError(f"positions {bad[:5]} are outside the trace's generated tokens 0..{T - 1}")
    return sorted(set(chosen))


@torch.no_grad()
def logit_lens(
    model: Any, trace: Trace, positions: Sequence[int] | None = None, top: int = 5, chunk: int = 64
) -> Trace:
    """Read every layer's residual stream through the final norm and unembedding at generated tokens.

    For token t at layer l it stores, in trace.captured (rows of other tokens hold -1 / 0):
      "logit_lens.top_ids" [T, L, top] (o200k ids), "logit_lens.top_probs" [T, L, top],
      "logit_lens.next_rank" [T, L]: rank of token t+1 under layer l's readout (0 = top), -1 for the last token.
    `positions` indexes the generated tokens (default all); `chunk` bounds memory (chunk x vocab logits a layer).
    The model re-runs the whole sequence under the ablation recorded in the trace. Returns the trace.
    """
    T, L = len(trace.tokens), model.config.num_hidden_layers
    chosen = _positions(trace, positions)
    sequence, where_of = context_sequence(trace)
    ids = _model_ids(model, sequence)  # [1, S]
    with as_recorded(model, trace):
        _, cache = model.run_with_cache(ids, names=lambda name: name.endswith("hook_resid_post"))
    top_ids = trace.captured.get(LENS_TOP_IDS)
    if top_ids is None or tuple(top_ids.shape) != (T, L, top):
        top_ids = torch.full((T, L, top), -1, dtype=torch.long)
        top_probs = torch.zeros(T, L, top)
        ranks = torch.full((T, L), -1, dtype=torch.long)
    else:
        top_ids, top_probs = top_ids.clone(), trace.captured[LENS_TOP_PROBS].clone()
        ranks = trace.captured[LENS_NEXT_RANK].clone()
    tokenizer = model.tokenizer
    with cpu_threads(model):  # the readouts below run outside Model.forward: same thread choice as a forward
        _read_out_layers(model, cache, ids, chosen, where_of, chunk, L, top_ids, top_probs, ranks)
    trace.captured[LENS_TOP_IDS] = top_ids
    trace.captured[LENS_TOP_PROBS] = top_probs
    trace.captured[LENS_NEXT_RANK] = ranks
    known = trace.metadata.setdefault("token_strings", {})
    new = sorted({int(i) for i in top_ids.unique().tolist() if i >= 0} - {int(k) for k in known})
    for token_id, text in zip(new, tokenizer.token_texts_o200k(new), strict=True):
        known[str(token_id)] = text
    return trace


def _read_out_layers(model, cache, ids, chosen, where_of, chunk, L, top_ids, top_probs, ranks) -> None:
    """Fill top_ids / top_probs [T, L, top] and ranks [T, L] for the generated tokens `chosen` (in place)."""
    S, top = ids.shape[1], top_ids.shape[2]
    tokenizer = model.tokenizer
    for start in range(0, len(chosen), chunk):
        rows = chosen[start:start + chunk]
        where = torch.tensor([where_of[t] for t in rows], device=ids.device)
        for layer in range(L):
            resid = cache[f"blocks.{layer}.hook_resid_post"][0, where]  # [R, D]
            logits = model.unembed(model.ln_final(resid)).float()  # [R, V]
            probs = logits.softmax(-1)
            values, indices = probs.topk(top, dim=-1)  # [R, top]
            top_ids[rows, layer] = torch.tensor(
                [tokenizer.to_o200k(row) for row in indices.cpu().tolist()], dtype=torch.long
            )
            top_probs[rows, layer] = values.cpu()
            for r, t in enumerate(rows):
                if where_of[t] + 1 < S:  # the token the model read next (a tool answer's first after a call)
                    target = logits[r, ids[0, where_of[t] + 1]]
                    ranks[t, layer] = int((logits[r] > target).sum())


@torch.no_grad()
def capture_attention(
    model: Any, trace: Trace, layers: Sequence[int], queries: Sequence[int] | None = None
) -> Trace:
    """Re-run the whole token sequence and keep the attention pattern of `layers` for the query tokens
    `queries` (generated-token indices, default all).

    Stores trace.captured["attention.L{l}"] [T, H, S] float16 over the S keys of the whole sequence (rows of
    other queries are 0) and the keys' texts in trace.metadata["context_texts"].
    Keys and the trace's sink mass for that query sum to 1. Returns the trace.
    """
    T, L = len(trace.tokens), model.config.num_hidden_layers
    bad = [layer for layer in layers if not 0 <= int(layer) < L]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has layers 0..{L - 1}")
    chosen = _positions(trace, queries)
    sequence, where_of = context_sequence(trace)
    ids = _model_ids(model, sequence)
    names = [f"blocks.{int(layer)}.attn.hook_pattern" for layer in layers]
    with as_recorded(model, trace):
        _, cache = model.run_with_cache(ids, names=names)
    where = torch.tensor([where_of[t] for t in chosen], device=ids.device)
    for layer, name in zip(layers, names, strict=True):
        pattern = cache[name][0]  # [H, S, S]
        H, S = pattern.shape[0], pattern.shape[-1]
        key = f"{ATTENTION_PREFIX}{int(layer)}"
        kept = trace.captured.get(key)
        if kept is None or tuple(kept.shape) != (T, H, S):
            kept = torch.zeros(T, H, S, dtype=torch.float16)
        kept[chosen] = pattern[:, where].transpose(0, 1).to("cpu", torch.float16)  # [R, H, S]
        trace.captured[key] = kept
    # Labels for the keys, which include tool answers that are not among the generated tokens.
    trace.metadata["context_texts"] = model.tokenizer.token_texts_o200k(sequence)
    return trace


@torch.no_grad()
def mean_activation(model: Any, prompts: Sequence[str], layer: int) -> torch.Tensor:
    """Mean residual stream after block `layer` over the tokens of each prompt, then over prompts, [D] fp32.

    Prompts are plain text: `<|start|>` typed in one is characters, not harmony's special token.
    """
    if not prompts:
        raise ValueError("need at least one prompt to average over")
    name = f"blocks.{layer}.hook_resid_post"
    means = []
    for text in prompts:
        ids = model.tokenizer.encode(text, allow_special=False)  # a typed prompt is text, whatever it holds
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names=[name])
        means.append(cache[name][0].float().mean(0))  # [D]
    return torch.stack(means).mean(0).cpu()


def steering_vector(model: Any, positive: Sequence[str], negative: Sequence[str], layer: int) -> torch.Tensor:
    """Difference of mean activations at `layer`: mean over `positive` prompts minus mean over `negative`, [D].

    Add it with `model.set_steering(layer, vector, scale)` to push generations toward the positive set.
    """
    L = model.config.num_hidden_layers
    if not 0 <= layer < L:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{L - 1}")
    return mean_activation(model, positive, layer) - mean_activation(model, negative, layer)
