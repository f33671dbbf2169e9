"""Plotly figures of Traces for notebooks: router map, expert usage, sink mass, logit lens, and the
differences between two runs (the Lab's compare tab). Each returns a go.FigureWidget (live in JupyterLab,
and a plain figure anywhere else)."""

from __future__ import annotations

import difflib
import html

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ossscope.trace import Trace

from .metrics import expert_usage, sink_mass, top_expert
from .payload import LENS_TOP_IDS, LENS_TOP_PROBS, sliding_layers

_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=40), font=dict(size=11))


def _layer_labels(trace: Trace) -> list[str]:
    L = trace.router_indices.shape[1]
    return [f"L{layer} {'S' if slide else 'F'}" for layer, slide in enumerate(sliding_layers(trace, L))]


def _token_labels(trace: Trace, keep: list[int]) -> list[str]:
    return [f"{t}: {trace.token_texts[t]!r}"[:40] for t in keep]


def _channel_tokens(trace: Trace, channel: str | None) -> list[int]:
    return [t for t, c in enumerate(trace.channels) if channel in (None, "all") or c == channel]


def router_map_figure(trace: Trace, channel: str | None = None) -> go.FigureWidget:
    """Tokens x layers: the expert with the largest weight (hover shows all k with weights)."""
    keep = _channel_tokens(trace, channel)
    L = trace.router_indices.shape[1]
    top = torch.stack([top_expert(trace, layer) for layer in range(L)])[:, keep]  # [L, T']
    idx, w = trace.router_indices[keep], trace.router_weights[keep]  # [T', L, k]
    hover = [[", ".join(f"E{int(e)} {float(x):.2f}" for e, x in zip(idx[c, layer], w[c, layer], strict=True))
              for c in range(len(keep))] for layer in range(L)]
    fig = go.FigureWidget(go.Heatmap(
        z=top.numpy(), x=list(range(len(keep))), y=_layer_labels(trace), colorscale="Turbo", customdata=hover,
        text=[_token_labels(trace, keep)] * L, colorbar=dict(title="expert"),
        hovertemplate="%{text}<br>%{y}<br>%{customdata}<extra></extra>",
    ))
    fig.update_layout(title=f"Top expert per token and layer ({channel or 'all channels'})",
                      xaxis_title="generated token", **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def expert_usage_figure(trace: Trace, channels: tuple[str, ...] = ("analysis", "final")) -> go.FigureWidget:
    """Share of tokens routed to each expert per layer, one panel per channel (chain of thought vs answer)."""
    present = [c for c in channels if c in trace.channels] or ["all"]
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=present, shared_yaxes=True)
    usages = [expert_usage(trace, None if c == "all" else c) for c in present]
    zmax = max(float(u.max()) for u in usages) or 1.0
    for col, usage in enumerate(usages, start=1):
        fig.add_trace(go.Heatmap(z=usage.numpy(), y=_layer_labels(trace), colorscale="Viridis", zmin=0, zmax=zmax,
                                 showscale=col == len(present),
                                 hovertemplate="%{y}, expert %{x}: %{z:.3f}<extra></extra>"), row=1, col=col)
    fig.update_layout(title="Expert usage per layer", **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return go.FigureWidget(fig)


def sink_figure(trace: Trace, head: int | None = None) -> go.FigureWidget:
    """Sink mass per layer over the generated tokens (mean over heads, or one head)."""
    L = trace.sink.shape[1]
    z = torch.stack([sink_mass(trace, layer, head) for layer in range(L)])  # [L, T]
    fig = go.FigureWidget(go.Heatmap(z=z.numpy(), y=_layer_labels(trace), colorscale="Viridis",
                                     text=[_token_labels(trace, list(range(len(trace.tokens))))] * L,
                                     hovertemplate="%{text}<br>%{y}: %{z:.3f}<extra></extra>",
                                     colorbar=dict(title="sink")))
    fig.update_layout(title="Sink mass" + (" (mean over heads)" if head is None else f" (head {head})"),
                      xaxis_title="generated token", **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def logit_lens_figure(trace: Trace, position: int) -> go.FigureWidget:
    """Top tokens at each layer for one generated token (needs `ossscope.widgets.logit_lens` first)."""
    if LENS_TOP_IDS not in trace.captured:
        raise ValueError("no logit lens in this trace: run ossscope.widgets.logit_lens(model, trace) first")
    ids = trace.captured[LENS_TOP_IDS][position]  # [L, n]
    if int(ids[0, 0]) < 0:
        raise ValueError(f"the logit lens was not computed at position {position}")
    probs = trace.captured[LENS_TOP_PROBS][position]  # [L, n]
    strings = trace.metadata.get("token_strings", {})
    text = [[repr(strings.get(str(int(i)), f"#{int(i)}")) for i in row] for row in ids]
    fig = go.FigureWidget(go.Heatmap(z=probs.numpy(), text=text, texttemplate="%{text}", colorscale="Blues",
                                     y=_layer_labels(trace), x=[f"#{i + 1}" for i in range(ids.shape[1])],
                                     hovertemplate="%{y} %{x}: %{text} p=%{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Logit lens at token {position} {trace.token_texts[position]!r}", **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


# -- comparing two runs ---------------------------------------------------------------------------------------
def text_diff_html(a: Trace, b: Trace) -> str:
    """The generated text of two runs, token by token: removed tokens struck out red, added ones green."""
    matcher = difflib.SequenceMatcher(a=a.token_texts, b=b.token_texts, autojunk=False)
    parts = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op in ("replace", "delete"):
            parts.append(f'<del style="background:#ffebe9;color:#82071e">'
                         f'{html.escape("".join(a.token_texts[i1:i2]))}</del>')
        if op in ("replace", "insert"):
            parts.append(f'<ins style="background:#dafbe1;color:#116329;text-decoration:none">'
                         f'{html.escape("".join(b.token_texts[j1:j2]))}</ins>')
        if op == "equal":
            parts.append(html.escape("".join(a.token_texts[i1:i2])))
    same = sum(i2 - i1 for op, i1, i2, _, _ in matcher.get_opcodes() if op == "equal")
    head = (f"<div style='color:#57606a;font-size:12px'>{same} tokens shared; run A {len(a.tokens)} tokens, "
            f"run B {len(b.tokens)} tokens</div>")
    return head + ("<div style='white-space:pre-wrap;font-family:monospace;font-size:12px;line-height:1.6'>"
                   + "".join(parts) + "</div>")


def routing_difference(a: Trace, b: Trace) -> torch.Tensor:
    """Per-layer share of tokens routed to each expert, run B minus run A, [L, E]."""
    E = max(int(a.metadata.get("num_experts", 0)), int(b.metadata.get("num_experts", 0)),
            int(a.router_indices.max()) + 1, int(b.router_indices.max()) + 1)
    return expert_usage(b, num_experts=E) - expert_usage(a, num_experts=E)


def sink_difference(a: Trace, b: Trace) -> torch.Tensor:
    """Mean sink mass per layer and head over all generated tokens, run B minus run A, [L, H]."""
    return b.sink.float().mean(0) - a.sink.float().mean(0)


def compare_figure(a: Trace, b: Trace, names: tuple[str, str] = ("A", "B")) -> go.FigureWidget:
    """Two runs side by side: how routing (expert share per layer) and sink mass (per layer and head) moved."""
    route, sink = routing_difference(a, b), sink_difference(a, b)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        f"Expert share per layer: {names[1]} \u2212 {names[0]}", f"Mean sink mass: {names[1]} \u2212 {names[0]}"))
    for col, (z, label, xname) in enumerate(((route, "share", "expert"), (sink, "sink", "head")), start=1):
        bound = float(z.abs().max()) or 1e-6
        fig.add_trace(go.Heatmap(z=z.numpy(), y=_layer_labels(a), colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound,
                                 colorbar=dict(x=0.44 if col == 1 else 1.0, title=label, len=0.9),
                                 hovertemplate=f"%{{y}}, {xname} %{{x}}: %{{z:+.3f}}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text=xname, row=1, col=col)
    fig.update_layout(height=360, **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return go.FigureWidget(fig)
