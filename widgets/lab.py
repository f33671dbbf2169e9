"""The Lab: a JupyterLab dashboard to chat with a model and watch and change what it does.

Prompt, reasoning effort and sampling on the left; Run / Stop with live progress; tabs for the trace views
(updating while tokens stream in), the expert-ablation picker, the steering control, the run history and a
side-by-side comparison of any two runs. Generation runs in a background thread so Stop stays clickable.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as w
import torch

from ossscope.trace import Trace

from .ablation import AblationPicker
from .export import export_trace_html
from .figures import compare_figure, text_diff_html
from .metrics import expert_usage
from .steering import SteeringControl
from .view import TraceView


def _field(event: Any, name: str, default: Any = None) -> Any:
    """A token event's field, whether the event is an object (generation.TokenEvent) or a dict."""
    if isinstance(event, dict):
        return event.get(name, default)
    return getattr(event, name, default)


class LiveRecord:
    """Builds a (partial) Trace from streamed token events, so the views can draw a run while it generates."""

    def __init__(self, prompt: str, reasoning: str, num_layers: int, k: int, heads: int, experts: int,
                 model_name: str = "") -> None:
        self.prompt, self.reasoning, self.model_name = prompt, reasoning, model_name
        self.L, self.k, self.H, self.E = num_layers, k, heads, experts
        self.tokens: list[int] = []
        self.texts: list[str] = []
        self.channels: list[str] = []
        self.indices: list[torch.Tensor] = []  # per token [L, k]
        self.weights: list[torch.Tensor] = []  # per token [L, k]
        self.sinks: list[torch.Tensor] = []  # per token [L, H]
        self.tool_calls: list[Any] = []  # ToolCalls (function or built-in) as their events arrive

    def add(self, event: Any) -> None:
        record = _field(event, "record", None) or {}
        self.tokens.append(int(_field(event, "token", -1)))
        self.texts.append(str(_field(event, "text", "")))
        self.channels.append(str(_field(event, "channel", "") or ""))
        if _field(event, "tool_call", None) is not None:
            self.tool_calls.append(_field(event, "tool_call"))
        # Events without a record (another engine) still stream text; their rows read as zeros.
        self.indices.append(record["router_indices"].detach().to("cpu", torch.int64) if "router_indices" in record
                            else torch.zeros(self.L, self.k, dtype=torch.int64))
        self.weights.append(record["router_weights"].detach().to("cpu", torch.float32) if "router_weights" in record
                            else torch.zeros(self.L, self.k))
        self.sinks.append(record["sink"].detach().to("cpu", torch.float32) if "sink" in record
                          else torch.zeros(self.L, self.H))

    def __len__(self) -> int:
        return len(self.tokens)

    def trace(self, **metadata: Any) -> Trace:
        def stack(rows: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=dtype)

        def text_of(channel: str) -> str:
            return "".join(t for t, c in zip(self.texts, self.channels, strict=True) if c == channel)

        return Trace(
            prompt_tokens=[], tokens=list(self.tokens), channels=list(self.channels), token_texts=list(self.texts),
            messages=[{"role": "user", "content": self.prompt}], analysis=text_of("analysis"),
            final=text_of("final"), tool_calls=list(self.tool_calls),
            router_indices=stack(self.indices, (self.L, self.k), torch.int64),
            router_weights=stack(self.weights, (self.L, self.k), torch.float32),
            sink=stack(self.sinks, (self.L, self.H), torch.float32), reasoning=self.reasoning,
            metadata={"model": self.model_name, "num_experts": self.E, "live": True, **metadata},
        )


@dataclass
class Run:
    """One entry of the Lab's history."""

    trace: Trace
    prompt: str
    settings: dict[str, Any] = field(default_factory=dict)
    ablation: str = "none"
    steering: str = "none"
    elapsed_s: float = 0.0
    stopped: bool = False

    def label(self, number: int) -> str:
        short = self.prompt.replace("\n", " ")
        short = short if len(short) <= 32 else short[:31] + "\u2026"
        extras = "".join([f" \u00b7 ablate {self.ablation}" if self.ablation != "none" else "",
                          f" \u00b7 steer {self.steering}" if self.steering != "none" else "",
                          " \u00b7 stopped" if self.stopped else ""])
        return f"#{number} {short} ({len(self.trace.tokens)} tok){extras}"


def _same_steering(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    """Whether two {layer: vector} steering states are the same (same layers, equal vectors)."""
    return a.keys() == b.keys() and all(a[layer] is b[layer] or torch.equal(a[layer], b[layer]) for layer in a)


def _default_chat() -> Callable[..., Any]:
    from ossscope.chat import chat

    return chat


class Lab:
    """The dashboard. `Lab(model)` to chat and experiment; `Lab(None, traces=[...])` to browse traces.

    Display it by leaving it last in a cell (or `display(lab)`). From Python: `lab.run("prompt", wait=True)`,
    `lab.stop()`, `lab.history`, `lab.compare(0, 1)`, `lab.export("runs.html")`.
    """

    def __init__(self, model: Any = None, traces: Sequence[Trace] = (), chat_fn: Callable[..., Any] | None = None,
                 max_new_tokens: int = 128, update_interval_s: float = 0.25) -> None:
        if model is None and not traces:
            raise ValueError("Lab needs a model to run, or traces to show")
        self.model = model
        self.chat_fn = chat_fn
        self.update_interval_s = update_interval_s
        self.history: list[Run] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # Held from the moment run() accepts a run until its worker has put the model's interventions back, so
        # two run() calls (two threads, or a click racing a call) can never both start.
        self._run_lock = threading.Lock()
        if model is not None:
            c = model.config
            self.dims = (c.num_hidden_layers, c.experts_per_token, c.num_attention_heads, c.num_experts)
        else:
            first = traces[0]
            T, L, k = first.router_indices.shape
            E = int(first.metadata.get("num_experts", 0)) or int(first.router_indices.max()) + 1
            self.dims = (L, k, first.sink.shape[2], E)
        L, _, _, E = self.dims
        self.view = TraceView()
        self.picker = AblationPicker(L, E)
        if model is not None and model.active_ablation:
            self.picker.set(model.active_ablation["experts"], model.active_ablation["mode"])
        self.steering = SteeringControl(L, model)
        self._build_controls(max_new_tokens)
        self._build_history_and_compare()
        self.tabs = w.Tab(children=[self.view, self.picker, self.steering, self.history_box, self.compare_box])
        for i, title in enumerate(["Trace", "Ablate experts", "Steer", "History", "Compare runs"]):
            self.tabs.set_title(i, title)
        name = getattr(model, "name", "") if model is not None else "trace viewer"
        header = w.HTML(f"<div style='font-size:15px;font-weight:600;margin:2px 0 6px'>ossscope lab "
                        f"<span style='font-weight:400;color:#57606a;font-size:12px'>{html.escape(str(name))} \u00b7 "
                        f"{L} layers \u00b7 {E} experts</span></div>")
        self.widget = w.VBox([header, w.HBox([self.controls, self.tabs], layout=w.Layout(align_items="flex-start"))],
                             layout=w.Layout(width="100%"))
        self.widget.add_class("ossscope-lab")
        for trace in traces:
            self.add_trace(trace)

    # -- layout --------------------------------------------------------------------------------------------
    def _build_controls(self, max_new_tokens: int) -> None:
        self.prompt = w.Textarea(placeholder="Ask the model something\u2026", value="What is 2+2?",
                                 layout=w.Layout(width="100%", height="90px"))
        self.reasoning = w.Dropdown(options=["low", "medium", "high"], value="medium", description="reasoning")
        slider = dict(continuous_update=False, style={"description_width": "90px"}, layout=w.Layout(width="100%"))
        self.max_new_tokens = w.IntSlider(value=max_new_tokens, min=1, max=4096, description="max tokens", **slider)
        self.temperature = w.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.05, description="temperature", **slider)
        self.top_p = w.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p", **slider)
        self.seed = w.IntText(value=0, description="seed", style={"description_width": "90px"},
                              layout=w.Layout(width="100%"))
        self.run_button = w.Button(description="Run", icon="play", button_style="primary",
                                   disabled=self.model is None, layout=w.Layout(width="48%"))
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                    layout=w.Layout(width="48%"))
        self.progress = w.IntProgress(value=0, min=0, max=max_new_tokens, layout=w.Layout(width="100%"))
        self.status = w.HTML("<span style='color:#57606a'>Ready.</span>" if self.model is not None else
                             "<span style='color:#57606a'>Browsing traces: pass a model, Lab(model) or "
                             "trace.show(model=...), to run.</span>")
        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.controls = w.VBox([self.prompt, self.reasoning, self.max_new_tokens, self.temperature, self.top_p,
                                self.seed, w.HBox([self.run_button, self.stop_button]), self.progress, self.status],
                               layout=w.Layout(width="320px", min_width="320px", margin="0 12px 0 0"))

    def _build_history_and_compare(self) -> None:
        self.history_table = w.HTML()
        self.shown_run = w.Dropdown(options=[], description="show run", layout=w.Layout(width="460px"))
        self.shown_run.observe(lambda change: change["new"] is not None and self.show_run(change["new"]),
                               names="value")
        self.export_path = w.Text(value="ossscope-runs.html", description="file", layout=w.Layout(width="360px"))
        self.export_button = w.Button(description="Export HTML", icon="download")
        self.export_status = w.HTML()
        self.export_button.on_click(lambda _: self._export_clicked())
        self.history_box = w.VBox([self.shown_run, self.history_table,
                                   w.HBox([self.export_path, self.export_button]), self.export_status])
        self.run_a = w.Dropdown(options=[], description="run A", layout=w.Layout(width="420px"))
        self.run_b = w.Dropdown(options=[], description="run B", layout=w.Layout(width="420px"))
        self.diff_text = w.HTML("<span style='color:#57606a'>Make two runs to compare them (e.g. before and after "
                                "ablating two experts of one layer).</span>")
        self.diff_figure = w.Box()
        for dropdown in (self.run_a, self.run_b):
            dropdown.observe(lambda _: self._compare_selected(), names="value")
        self.compare_box = w.VBox([w.HBox([self.run_a, self.run_b]), self.diff_text, self.diff_figure])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- runs ------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True from the moment a run is accepted until it has ended and the model's state is restored."""
        return self._run_lock.locked()

    def run(self, prompt: str | None = None, wait: bool = False) -> threading.Thread:
        """Generate from `prompt` (default: the prompt box) with the current settings, ablation and steering.

        Returns the worker thread; `wait=True` joins it. The run lands in `history` when it ends or is stopped.
        One run at a time: while one is in progress (from any thread), run() raises RuntimeError at once; it
        does not queue. When the run ends, the ablation and steering the model had before are put back, unless
        they were changed during the run (then the new ones are kept).
        """
        if self.model is None:
            raise RuntimeError("this Lab has no model: create it with Lab(model) to run")
        if not self._run_lock.acquire(blocking=False):
            raise RuntimeError("a run is already in progress: stop it first (lab.stop()) or wait for it to end")
        try:
            thread = self._start(prompt)
        except BaseException:
            self._run_lock.release()  # nothing started: the worker that would release it does not exist
            raise
        if wait:
            thread.join()
        return thread

    def _start(self, prompt: str | None) -> threading.Thread:
        """Check the prompt, apply the interventions and start the worker (which releases the run lock)."""
        if prompt is not None:
            self.prompt.value = prompt
        text = self.prompt.value.strip()
        if not text:
            self.status.value = "<span style='color:#cf222e'>Write a prompt first.</span>"
            raise ValueError("the prompt is empty")
        settings = {"reasoning": self.reasoning.value, "max_new_tokens": self.max_new_tokens.value,
                    "temperature": self.temperature.value, "top_p": self.top_p.value, "seed": self.seed.value}
        # Interventions are applied here, on the calling thread, so a bad choice is reported before generating;
        # the model's own ablation and steering come back when the run ends.
        saved = (dict(self.model.active_ablation), dict(self.model.active_steering))
        try:
            ablation = self.picker.apply(self.model)
            steering = self.steering.apply(self.model)
        except ValueError as exc:
            self._restore(saved)
            self.status.value = f"<span style='color:#cf222e'>{html.escape(str(exc))}</span>"
            raise
        self._stop.clear()
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.progress.max, self.progress.value = settings["max_new_tokens"], 0
        self.progress.bar_style = "info"
        self.tabs.selected_index = 0
        run_info = {"ablation": ablation, "steering": steering, "ablation_text": self.picker.describe(),
                    "steering_text": self.steering.describe()}
        applied = (dict(self.model.active_ablation), dict(self.model.active_steering))
        self._thread = threading.Thread(target=self._generate_then_restore,
                                        args=(text, settings, run_info, saved, applied), daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Ask the running generation to stop after its current token (the partial run is kept)."""
        self._stop.set()

    def _restore(self, saved: tuple[dict[str, Any], dict[int, torch.Tensor]],
                 applied: tuple[dict[str, Any], dict[int, torch.Tensor]] | None = None) -> None:
        """Put the model's ablation and steering back to `saved`. With `applied` (what the run set), each is put
        back only if the model still has what the run set: one the user set during the run is kept."""
        ablation, steering = saved
        if applied is None or self.model.active_ablation == applied[0]:
            self.model.clear_ablation()
            if ablation:
                self.model.set_ablation(ablation["experts"], ablation["mode"])
        if applied is None or _same_steering(self.model.active_steering, applied[1]):
            self.model.clear_steering()
            for layer, vector in steering.items():  # stored already scaled
                self.model.set_steering(layer, vector, 1.0)

    def _generate_then_restore(self, prompt: str, settings: dict[str, Any], run_info: dict[str, Any],
                               saved: tuple[dict[str, Any], dict[int, torch.Tensor]],
                               applied: tuple[dict[str, Any], dict[int, torch.Tensor]]) -> None:
        try:
            self._generate(prompt, settings, run_info)
        finally:
            try:
                self._restore(saved, applied)
            finally:
                self.run_button.disabled, self.stop_button.disabled = False, True
                self._run_lock.release()

    def _generate(self, prompt: str, settings: dict[str, Any], run_info: dict[str, Any]) -> None:
        L, k, H, E = self.dims
        live = LiveRecord(prompt, settings["reasoning"], L, k, H, E, getattr(self.model, "name", ""))
        started = last_push = time.perf_counter()
        self.status.value = "<span style='color:#57606a'>Generating\u2026</span>"
        self.view.set_traces([live.trace()], titles=["live: " + prompt[:40]])
        trace, stopped, error = None, False, None
        try:
            chat = self.chat_fn or _default_chat()
            options = {key: value for key, value in settings.items()}
            stream = chat(self.model, prompt, stream=True, **options)
            if isinstance(stream, Trace):  # an engine that does not stream
                trace = stream
            else:
                for event in stream:
                    live.add(event)
                    self.progress.value = min(len(live), self.progress.max)
                    now = time.perf_counter()
                    if now - last_push >= self.update_interval_s:
                        last_push = now
                        rate = len(live) / max(now - started, 1e-9)
                        self.status.value = f"Generating\u2026 {len(live)} tokens, {rate:.1f} tok/s"
                        self.view.set_traces([live.trace()], titles=["live: " + prompt[:40]])
                    if self._stop.is_set():
                        stopped = True
                        break
                if stopped and callable(getattr(stream, "close", None)):
                    stream.close()  # end the generator now; the stream's trace keeps what was made
                trace = self._finished_trace(stream)
        except Exception as exc:  # shown in the dashboard: a failed run must not kill the widget thread silently
            error = exc
        elapsed = time.perf_counter() - started
        if trace is None:
            trace = live.trace(stopped=stopped)
        trace.metadata.setdefault("model", getattr(self.model, "name", ""))
        trace.metadata.setdefault("num_experts", E)
        trace.metadata["lab"] = {"settings": settings, "ablation": run_info["ablation"],
                                 "steering": run_info["steering"], "stopped": stopped, "elapsed_s": round(elapsed, 3)}
        run = Run(trace=trace, prompt=prompt, settings=settings, ablation=run_info["ablation_text"],
                  steering=run_info["steering_text"], elapsed_s=elapsed, stopped=stopped)
        if error is not None and len(trace.tokens) == 0:
            self.status.value = (f"<span style='color:#cf222e'>Run failed: {html.escape(type(error).__name__)}: "
                                 f"{html.escape(str(error))}</span>")
            self.progress.bar_style = "danger"
        else:
            self._add_run(run)
            note = "stopped" if stopped else ("failed: " + html.escape(str(error)) if error else "done")
            self.status.value = (f"Run #{len(self.history)} {note}: {len(trace.tokens)} tokens in {elapsed:.1f} s "
                                 f"({len(trace.tokens) / max(elapsed, 1e-9):.1f} tok/s)")
            self.progress.bar_style = "warning" if stopped else "success"

    @staticmethod
    def _finished_trace(stream: Any) -> Trace | None:
        """The Trace a chat stream holds once iterated (or stopped early), if it offers one."""
        for name in ("trace", "result"):
            value = getattr(stream, name, None)
            if callable(value):
                value = value()
            if isinstance(value, Trace):
                return value
        return None

    # -- history ---------------------------------------------------------------------------------------------
    def add_trace(self, trace: Trace, prompt: str | None = None) -> Run:
        """Put an existing trace into the history (and show it)."""
        user = next((m.get("content") for m in trace.messages if m.get("role") == "user"), None)
        run = Run(trace=trace, prompt=prompt or str(user or trace.final[:40] or "trace"))
        self._add_run(run)
        return run

    def _add_run(self, run: Run) -> None:
        with self._lock:
            self.history.append(run)
            labels = [(r.label(i + 1), i) for i, r in enumerate(self.history)]
            self.shown_run.options = labels
            self.run_a.options, self.run_b.options = labels, labels
            n = len(self.history)
            if n >= 2:
                self.run_a.value, self.run_b.value = n - 2, n - 1
            else:
                self.run_a.value = self.run_b.value = n - 1
            self.shown_run.value = n - 1
            self.show_run(n - 1)
            self._refresh_history_table()
            L, _, _, E = self.dims
            usage = expert_usage(run.trace, num_experts=E)  # [L, E], rows sum to k
            if usage.shape == (L, E):
                self.picker.grid.usage = usage.clamp(0, 1).flatten().tolist()

    def show_run(self, index: int) -> None:
        """Show history run `index` in the Trace tab."""
        run = self.history[index]
        self.view.set_traces([run.trace], titles=[run.label(index + 1)])

    def _refresh_history_table(self) -> None:
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{html.escape(r.prompt[:60])}</td><td>{r.settings.get('reasoning', '')}</td>"
            f"<td>{len(r.trace.tokens)}</td><td>{html.escape(r.ablation)}</td><td>{html.escape(r.steering)}</td>"
            f"<td>{r.elapsed_s:.1f} s{' (stopped)' if r.stopped else ''}</td>"
            f"<td>{html.escape(r.trace.final[:60])}</td></tr>"
            for i, r in enumerate(self.history)
        )
        self.history_table.value = (
            "<table style='border-collapse:collapse;font-size:12px' cellpadding='4'><tr style='text-align:left;"
            "color:#57606a'><th>#</th><th>prompt</th><th>effort</th><th>tokens</th><th>ablation</th>"
            f"<th>steering</th><th>time</th><th>final answer</th></tr>{rows}</table>"
        )

    # -- comparing -------------------------------------------------------------------------------------------
    def compare(self, a: int, b: int) -> None:
        """Show runs a and b (history indices) side by side in the Compare tab."""
        self.run_a.value, self.run_b.value = a, b
        self._compare_selected()
        self.tabs.selected_index = 4

    def _compare_selected(self) -> None:
        a, b = self.run_a.value, self.run_b.value
        if a is None or b is None or not self.history:
            return
        ra, rb = self.history[a], self.history[b]
        summary = (f"<div style='font-size:12px'><b>A</b> {html.escape(ra.label(a + 1))}<br><b>B</b> "
                   f"{html.escape(rb.label(b + 1))}</div>")
        self.diff_text.value = summary + text_diff_html(ra.trace, rb.trace)
        comparable = ra.trace.router_indices.shape[1:] == rb.trace.router_indices.shape[1:]
        if a != b and comparable and len(ra.trace.tokens) and len(rb.trace.tokens):
            self.diff_figure.children = [compare_figure(ra.trace, rb.trace, names=(f"#{a + 1}", f"#{b + 1}"))]
        else:
            self.diff_figure.children = []

    # -- export ----------------------------------------------------------------------------------------------
    def export(self, path: str | Path, runs: Sequence[int] | None = None) -> Path:
        """Write the runs (default: all of the history) into one offline HTML file with a run selector."""
        chosen = list(range(len(self.history))) if runs is None else list(runs)
        if not chosen:
            raise ValueError("nothing to export: the Lab has no runs yet")
        return export_trace_html([self.history[i].trace for i in chosen], path,
                                 titles=[self.history[i].label(i + 1) for i in chosen], title="ossscope lab runs")

    def _export_clicked(self) -> None:
        try:
            path = self.export(self.export_path.value)
            self.export_status.value = f"Wrote {html.escape(str(path))} ({path.stat().st_size / 1e6:.2f} MB)."
        except (OSError, ValueError) as exc:
            self.export_status.value = f"<span style='color:#cf222e'>{html.escape(str(exc))}</span>"


def show_trace(trace: Trace, model: Any = None, **kwargs: Any) -> Lab:
    """The dashboard for one trace (`trace.show()`); with `model=`, ready to run more and compare."""
    return Lab(model, traces=[trace], **kwargs)
