"""Per-token metrics that color the reasoning view (the viewer's JavaScript computes the same ones).

Each returns a float tensor [T] (NaN where a value is unknown, e.g. the logit-lens rank of a token that was not
analysed) from the Trace record alone.
"""

from __future__ import annotations

import math

import torch

from ossscope.trace import Trace

from .payload import LENS_NEXT_RANK

METRICS = {
    "expert": "expert chosen first at the layer",
    "entropy": "router entropy over the top-k weights (nats)",
    "sink": "sink mass, mean over heads",
    "lens_rank": "logit-lens rank of the next token",
}


def router_entropy(trace: Trace, layer: int | None = None) -> torch.Tensor:
    """Entropy (nats) of each token's top-k router weights at `layer`, or averaged over layers when None.

    The weights are a softmax over the k chosen experts, so the range is 0 (one expert takes all) to ln(k).
    """
    w = trace.router_weights.float().clamp_min(1e-12)  # [T, L, k]
    entropy = -(w * w.log()).sum(-1)  # [T, L]
    return entropy.mean(1) if layer is None else entropy[:, layer]


def sink_mass(trace: Trace, layer: int | None = None, head: int | None = None) -> torch.Tensor:
    """Attention mass each token's query gave to the sink: mean over heads (or one head), at a layer or
    averaged over layers."""
    sink = trace.sink.float()  # [T, L, H]
    sink = sink.mean(2) if head is None else sink[:, :, head]  # [T, L]
    return sink.mean(1) if layer is None else sink[:, layer]


def top_expert(trace: Trace, layer: int) -> torch.Tensor:
    """The expert with the largest router weight for each token at `layer`, as floats [T]."""
    slot = trace.router_weights[:, layer].argmax(-1, keepdim=True)  # [T, 1]
    return trace.router_indices[:, layer].gather(1, slot).squeeze(1).float()


def lens_rank(trace: Trace, layer: int | None = None) -> torch.Tensor:
    """Rank of the actual next token under the logit lens at `layer` (0 = top prediction); with layer None,
    the first layer at which it becomes the top prediction (L when never). NaN where not analysed."""
    T, L = trace.router_indices.shape[:2]
    if LENS_NEXT_RANK not in trace.captured:
        return torch.full((T,), math.nan)
    ranks = trace.captured[LENS_NEXT_RANK].float()  # [T, L]
    unknown = ranks[:, 0] < 0
    if layer is None:
        top = ranks == 0
        first = torch.where(top.any(1), top.float().argmax(1).float(), torch.tensor(float(L)))
        out = first
    else:
        out = ranks[:, layer].clone()
    out[unknown] = math.nan
    return out


def token_metric(trace: Trace, metric: str, layer: int | None = None) -> torch.Tensor:
    """One of METRICS for every generated token, [T]."""
    if metric == "expert":
        return top_expert(trace, 0 if layer is None else layer)
    if metric == "entropy":
        return router_entropy(trace, layer)
    if metric == "sink":
        return sink_mass(trace, layer)
    if metric == "lens_rank":
        return lens_rank(trace, layer)
    raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")


def expert_usage(trace: Trace, channel: str | None = None, num_experts: int | None = None) -> torch.Tensor:
    """Fraction of tokens (of one channel, or all) routed to each expert at each layer, [L, E].

    Each token picks k experts, so a row sums to k (or 0 when the channel has no tokens).
    """
    T, L, k = trace.router_indices.shape
    E = num_experts or int(trace.metadata.get("num_experts", 0)) or int(trace.router_indices.max()) + 1
    keep = [t for t in range(T) if channel is None or trace.channels[t] == channel]
    usage = torch.zeros(L, E)
    if not keep:
        return usage
    idx = trace.router_indices[keep].long()  # [T', L, k]
    for layer in range(L):
        usage[layer] = torch.bincount(idx[:, layer].flatten(), minlength=E)[:E].float()
    return usage / len(keep)
