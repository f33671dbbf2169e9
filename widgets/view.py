"""TraceView: the trace viewer as a notebook widget (anywidget), the same script the HTML export inlines.

Its state is synced both ways: clicking a token in the browser sets `selected`; setting `metric`, `layer`,
`channel`, `head` or `tab` from Python redraws the view. `set_traces` replaces what it shows (the Lab calls it
while a run streams in).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anywidget
import traitlets

from ossscope.trace import Trace

from .export import static_text
from .metrics import METRICS
from .payload import trace_payload

TABS = ("reasoning", "router", "attention", "lens")
CHANNELS = ("all", "analysis", "commentary", "final")

# The viewer (static/scope.js) is a plain script that defines globalThis.OSSScope; this module tail binds it
# to the widget model. Python's layer -1 is the viewer's null (mean over layers).
_ESM_TAIL = r"""
const KEYS = ["selected", "metric", "layer", "head", "channel", "tab"];
function stateFromModel(model) {
  const layer = model.get("layer");
  return { selected: model.get("selected"), metric: model.get("metric"), layer: layer < 0 ? null : layer,
    head: model.get("head"), channel: model.get("channel"), tab: model.get("tab") };
}
export default {
  render({ model, el }) {
    const host = {
      onSelect(t) { model.set("selected", t); model.save_changes(); },
      onState(s) {
        model.set({ metric: s.metric, layer: s.layer === null ? -1 : s.layer, head: s.head, channel: s.channel,
          tab: s.tab, selected: s.selected });
        model.save_changes();
      },
    };
    const view = globalThis.OSSScope.mount(el, model.get("payloads"), host);
    Object.assign(view.state, stateFromModel(model));
    view.render();
    const onPayloads = () => view.setPayloads(model.get("payloads"));
    const onState = () => {
      const next = stateFromModel(model);
      const changed = Object.keys(next).some((k) => next[k] !== view.state[k]);
      if (changed) { Object.assign(view.state, next); view.render(); }
    };
    model.on("change:payloads", onPayloads);
    for (const key of KEYS) model.on("change:" + key, onState);
    return () => {
      model.off("change:payloads", onPayloads);
      for (const key of KEYS) model.off("change:" + key, onState);
    };
  },
};
"""


class TraceView(anywidget.AnyWidget):
    """Interactive views of one or more Traces: reasoning, router map, attention & sinks, logit lens."""

    _esm = static_text("scope.js") + _ESM_TAIL
    _css = static_text("scope.css")

    payloads = traitlets.List(traitlets.Dict(), default_value=[]).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)  # pinned generated-token index, -1 for none
    metric = traitlets.Enum(tuple(METRICS), default_value="entropy").tag(sync=True)
    layer = traitlets.Int(-1).tag(sync=True)  # -1: mean over layers
    head = traitlets.Int(0).tag(sync=True)
    channel = traitlets.Enum(CHANNELS, default_value="all").tag(sync=True)
    tab = traitlets.Enum(TABS, default_value="reasoning").tag(sync=True)

    def __init__(self, traces: Trace | Sequence[Trace] | None = None, titles: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        self.traces: list[Trace] = []
        self._select_callbacks: list[Callable[[int], None]] = []
        super().__init__(**kwargs)
        if traces is not None:
            self.set_traces(traces, titles)

    def set_traces(self, traces: Trace | Sequence[Trace], titles: Sequence[str] | None = None) -> None:
        """Show these traces (one, or several with a run selector); keeps the selection where it still fits."""
        self.traces = [traces] if isinstance(traces, Trace) else list(traces)
        names = list(titles) if titles is not None else [None] * len(self.traces)
        if len(names) != len(self.traces):
            raise ValueError(f"got {len(names)} titles for {len(self.traces)} traces")
        payloads = [trace_payload(t, title=name) for t, name in zip(self.traces, names, strict=True)]
        if payloads:
            dims = payloads[-1]["dims"]
            if self.selected >= dims["T"]:
                self.selected = -1
            if self.layer >= dims["L"]:
                self.layer = -1
            if self.head >= dims["H"]:
                self.head = 0
        self.payloads = payloads

    @traitlets.validate("layer")
    def _check_layer(self, proposal: Any) -> int:
        layer = proposal["value"]
        L = self.payloads[-1]["dims"]["L"] if self.payloads else None
        if layer < -1 or (L is not None and layer >= L):
            raise traitlets.TraitError(f"layer {layer} is out of range: use -1 (all) or 0..{(L or 1) - 1}")
        return layer

    @traitlets.validate("head")
    def _check_head(self, proposal: Any) -> int:
        head = proposal["value"]
        H = self.payloads[-1]["dims"]["H"] if self.payloads else None
        if head < 0 or (H is not None and head >= H):
            raise traitlets.TraitError(f"head {head} is out of range: the trace has heads 0..{(H or 1) - 1}")
        return head

    def on_select(self, callback: Callable[[int], None]) -> None:
        """Call `callback(token_index)` whenever a token is clicked (or `selected` is set)."""
        self._select_callbacks.append(callback)

    @traitlets.observe("selected")
    def _selected_changed(self, change: Any) -> None:
        for callback in self._select_callbacks:
            callback(change["new"])
