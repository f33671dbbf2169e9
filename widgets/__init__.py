"""ossscope.widgets: the lab in JupyterLab (dashboard, views of a Trace) and the offline HTML export.

- `Lab(model)`: prompt, reasoning effort, sampling, Run/Stop with live views, expert ablation, steering,
  run history and side-by-side comparison; `trace.show()` opens it on one trace.
- `TraceView(trace)`: the views alone (reasoning, router map, attention & sinks, logit lens).
- `export_trace_html(trace, path)` / `trace.to_html(path)`: one self-contained interactive HTML file.
- `logit_lens`, `capture_attention`: analyses kept in `trace.captured` (so they show and export).
- `steering_vector`: difference of mean activations between two prompt sets.
- plotly figures: `router_map_figure`, `expert_usage_figure`, `sink_figure`, `logit_lens_figure`,
  `compare_figure`.
"""

from __future__ import annotations

from .ablation import AblationGrid, AblationPicker
from .analysis import capture_attention, logit_lens, mean_activation, steering_vector
from .export import export_trace_html, render_html
from .figures import (
    compare_figure,
    expert_usage_figure,
    logit_lens_figure,
    router_map_figure,
    sink_figure,
    text_diff_html,
)
from .lab import Lab, LiveRecord, Run, show_trace
from .metrics import METRICS, expert_usage, token_metric
from .payload import dumps_for_html, trace_payload
from .steering import SteeringControl
from .view import TraceView

__all__ = [
    "Lab", "Run", "LiveRecord", "show_trace", "TraceView", "AblationGrid", "AblationPicker", "SteeringControl",
    "export_trace_html", "render_html", "trace_payload", "dumps_for_html", "logit_lens", "capture_attention",
    "steering_vector", "mean_activation", "METRICS", "token_metric", "expert_usage", "router_map_figure",
    "expert_usage_figure", "sink_figure", "logit_lens_figure", "compare_figure", "text_diff_html",
]
