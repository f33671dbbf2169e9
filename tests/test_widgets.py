"""Widgets without a browser: the payload the viewer draws, the metrics, widget state and callbacks (set_state as
the front end would send it, in the style of ipywidgets' test_set_state.py), the Lab with a scripted chat and
with a real tiny model (ablation picker and steering change the next run), and the model analyses."""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import ossscope.widgets as W
import pytest
import torch
import traitlets
from _widget_fixtures import EVIL, chat_model, synthetic_trace
from ossscope.widgets.metrics import lens_rank, router_entropy, sink_mass, top_expert

from ossscope import tokenizer as tk
from ossscope.trace import Trace


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8)


# -- payload ----------------------------------------------------------------------------------------------------
def test_payload_holds_the_record_quantized_to_1_over_255():
    trace = synthetic_trace(T=33, L=5, E=12, k=3, H=6, seed=3)
    p = W.trace_payload(trace)
    assert p["dims"] == {"T": 33, "L": 5, "k": 3, "H": 6, "E": 12, "P": 12}
    idx = _bytes(p["router"]["idx"]).reshape(33, 5, 3)
    np.testing.assert_array_equal(idx, trace.router_indices.numpy())
    weights = _bytes(p["router"]["w"]).reshape(33, 5, 3) / 255
    np.testing.assert_allclose(weights, trace.router_weights.numpy(), atol=0.5 / 255 + 1e-7)
    sink = _bytes(p["sink"]).reshape(33, 5, 6) / 255
    np.testing.assert_allclose(sink, trace.sink.numpy(), atol=0.5 / 255 + 1e-7)
    assert p["tokens"] == trace.token_texts and p["channels"] == trace.channels
    assert p["sliding"] == [True, False, True, False, True]
    json.dumps(p, allow_nan=False)  # plain JSON, nothing else


def test_payload_uses_two_bytes_per_expert_index_past_256_experts():
    trace = synthetic_trace(T=4, L=2, E=300, k=4, H=2)
    trace.metadata["num_experts"] = 300
    p = W.trace_payload(trace)
    idx = np.frombuffer(base64.b64decode(p["router"]["idx"]), dtype=np.uint16).reshape(4, 2, 4)
    np.testing.assert_array_equal(idx, trace.router_indices.numpy())


def test_payload_rejects_a_record_of_the_wrong_length():
    trace = synthetic_trace(T=10)
    trace.sink = trace.sink[:9]
    with pytest.raises(ValueError, match="10 tokens"):
        W.trace_payload(trace)


def test_conversation_lists_prompt_messages_and_tool_answers_after_their_call():
    trace = synthetic_trace(T=12, user_text=EVIL)
    conversation = W.trace_payload(trace)["conversation"]
    assert [m["role"] for m in conversation] == ["system", "user", "tool add"]
    assert conversation[1]["text"] == EVIL
    assert conversation[2] == {"role": "tool add", "text": "4", "after": 5, "call": '{"a": 2}', "error": False}


def test_builtin_tool_calls_and_grammar_marks_reach_the_payload():
    from ossscope.trace import ToolCall

    trace = synthetic_trace(T=12)
    trace.tool_calls.append(ToolCall(name="browser.open", arguments='{"id": 9}', error="Invalid link id `9`.",
                                     token_index=8))  # fmt: skip
    changed = [t == 9 for t in range(12)]
    trace.metadata["structured"] = {"enforced": True, "constrained": [t >= 8 for t in range(12)],
                                    "changed_top": changed, "problems": []}  # fmt: skip
    payload = W.trace_payload(trace)
    assert payload["conversation"][-1] == {"role": "tool browser.open", "text": "error: Invalid link id `9`.",
                                           "after": 8, "call": '{"id": 9}', "error": True}  # fmt: skip
    assert payload["grammar"]["changed"] == [int(c) for c in changed]
    assert payload["grammar"]["constrained"] == [int(t >= 8) for t in range(12)]
    trace.metadata["structured"] = {"enforced": False, "reason": "strict is False"}
    assert W.trace_payload(trace)["grammar"] is None


@pytest.mark.parametrize("text", [EVIL, "</SCRIPT>", "<!--", "a\u2028b\u2029c", "&lt;", "]]>", "\\u003c"])
def test_dumps_for_html_cannot_close_the_script_element(text):
    data = {"t": [text, {"k": text}]}
    out = W.dumps_for_html(data)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in out
    assert json.loads(out) == data


# -- metrics ----------------------------------------------------------------------------------------------------
def test_metrics_match_a_direct_computation():
    trace = synthetic_trace(T=20, L=3, E=8, k=4, H=5, seed=7)
    w, idx, sink = trace.router_weights.numpy(), trace.router_indices.numpy(), trace.sink.numpy()
    for t in range(20):
        for layer in range(3):
            expected = -sum(x * math.log(x) for x in w[t, layer])
            assert router_entropy(trace, layer)[t].item() == pytest.approx(expected, rel=1e-5)
            assert sink_mass(trace, layer)[t].item() == pytest.approx(sink[t, layer].mean(), rel=1e-5)
            assert top_expert(trace, layer)[t].item() == idx[t, layer, w[t, layer].argmax()]
        mean_entropy = np.mean([-sum(x * math.log(x) for x in w[t, layer]) for layer in range(3)])
        assert router_entropy(trace)[t].item() == pytest.approx(mean_entropy, rel=1e-5)
    usage = W.expert_usage(trace)
    assert usage.shape == (3, 8) and torch.allclose(usage.sum(1), torch.full((3,), 4.0))
    analysis = [t for t, c in enumerate(trace.channels) if c == "analysis"]
    expected_l0 = np.bincount(idx[analysis, 0].ravel(), minlength=8) / len(analysis)
    np.testing.assert_allclose(W.expert_usage(trace, "analysis")[0].numpy(), expected_l0, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown metric"):
        W.token_metric(trace, "nope")


def test_lens_rank_metric_is_nan_until_computed_and_first_top_layer_over_all_layers():
    trace = synthetic_trace(T=4, L=3)
    assert torch.isnan(lens_rank(trace)).all()
    trace.captured["logit_lens.next_rank"] = torch.tensor([[5, 0, 0], [3, 2, 1], [-1, -1, -1], [0, 9, 0]])
    assert lens_rank(trace, 0)[:2].tolist() == [5.0, 3.0] and math.isnan(lens_rank(trace, 0)[2])
    first = lens_rank(trace)
    assert first[0] == 1 and first[1] == 3 and math.isnan(first[2]) and first[3] == 0


# -- TraceView state --------------------------------------------------------------------------------------------
def test_trace_view_syncs_selection_from_the_front_end_and_validates_state():
    trace = synthetic_trace(T=15, L=4, H=4)
    view = W.TraceView(trace)
    clicked = []
    view.on_select(clicked.append)
    view.set_state({"selected": 7})  # what a click in the browser sends
    assert view.selected == 7 and clicked == [7]
    view.set_state({"metric": "sink", "layer": 2, "channel": "final", "tab": "router", "head": 3})
    assert (view.metric, view.layer, view.channel, view.tab, view.head) == ("sink", 2, "final", "router", 3)
    for bad in ({"layer": 4}, {"head": 4}, {"metric": "colour"}, {"channel": "secret"}, {"tab": "x"}):
        with pytest.raises(traitlets.TraitError):
            view.set_state(bad)
    assert W.TraceView(trace, selected=3, tab="lens").get_state()["selected"] == 3
    view.set_traces(synthetic_trace(T=5, L=2, H=2))  # a shorter trace resets what no longer fits
    assert (view.selected, view.layer, view.head) == (-1, -1, 0)
    assert view.get_state()["payloads"][0]["dims"]["T"] == 5
    assert "OSSScope" in view._esm and "export default" in view._esm


# -- the Lab with a scripted chat -------------------------------------------------------------------------------
class ScriptedStream:
    """A chat stream like ossscope.chat.ChatStream: token events with records, then .trace."""

    def __init__(self, trace: Trace, delay: float = 0.0, forever: bool = False):
        self.final, self.delay, self.forever, self.closed, self.sent = trace, delay, forever, False, 0

    def __iter__(self):
        t = 0
        while self.forever or t < len(self.final.tokens):
            i = t % len(self.final.tokens)
            time.sleep(self.delay)
            self.sent += 1
            yield SimpleNamespace(
                token=self.final.tokens[i], text=self.final.token_texts[i], channel=self.final.channels[i],
                record={"router_indices": self.final.router_indices[i], "router_weights": self.final.router_weights[i],
                        "sink": self.final.sink[i]})
            t += 1

    def close(self):
        self.closed = True

    @property
    def trace(self):
        return None if self.forever else self.final  # a stopped stream here offers no trace: the Lab builds one


def _fake_model(L=4, E=8, k=2, H=4):
    model = SimpleNamespace(name="fake", active_ablation={}, active_steering={}, calls=[])
    model.config = SimpleNamespace(num_hidden_layers=L, experts_per_token=k, num_attention_heads=H, num_experts=E)
    model.set_ablation = lambda experts, mode="reroute": (model.calls.append(("ablate", experts, mode)),
                                                         setattr(model, "active_ablation",
                                                                 {"mode": mode, "experts": experts}))
    model.clear_ablation = lambda: setattr(model, "active_ablation", {})
    model.clear_steering = lambda layer=None: model.active_steering.clear()
    model.set_steering = lambda layer, vector, scale=1.0: model.active_steering.__setitem__(layer, scale * vector)
    return model


def test_lab_streams_a_run_into_history_and_the_view():
    trace = synthetic_trace(T=25, L=4, E=8, k=2, H=4)
    seen = {}

    def chat(model, prompt, stream, **options):
        seen.update(options, prompt=prompt, stream=stream)
        return ScriptedStream(trace)

    model = _fake_model()
    lab = W.Lab(model, chat_fn=chat, update_interval_s=0.0)
    lab.reasoning.value, lab.temperature.value, lab.max_new_tokens.value = "high", 0.7, 30
    lab.picker.grid.set_state({"cells": [[1, 2], [1, 5]]})  # two clicks on the grid
    lab.run("hello <b>there</b>", wait=True)
    assert seen["prompt"] == "hello <b>there</b>" and seen["stream"] is True
    assert seen["reasoning"] == "high" and seen["temperature"] == 0.7 and seen["max_new_tokens"] == 30
    assert model.calls == [("ablate", {1: [2, 5]}, "reroute")]
    assert model.active_ablation == {}  # the model's own state is back after the run
    assert len(lab.history) == 1 and lab.history[0].trace is trace and lab.history[0].ablation == "reroute L1: 2, 5"
    assert lab.progress.value == 25 and "done" in lab.status.value
    assert lab.view.payloads[0]["tokens"] == trace.token_texts
    assert len(lab.picker.grid.usage) == 4 * 8  # the grid now shades by this run's expert usage
    assert not lab.run_button.disabled and lab.stop_button.disabled
    assert "&lt;b&gt;there" in lab.history_table.value  # the prompt is escaped in the history table


def test_lab_stop_keeps_the_partial_run():
    trace = synthetic_trace(T=10, L=4, E=8, k=2, H=4)
    streams = []

    def chat(model, prompt, stream, **options):
        streams.append(ScriptedStream(trace, delay=0.01, forever=True))
        return streams[-1]

    lab = W.Lab(_fake_model(), chat_fn=chat, update_interval_s=0.0)
    thread = lab.run("go")
    deadline = time.time() + 10
    while (not streams or streams[-1].sent < 5) and time.time() < deadline:  # the run's thread starts the chat
        time.sleep(0.01)
    assert lab.running and lab.stop_button.disabled is False
    lab.stop_button.click()
    thread.join(timeout=10)
    assert not thread.is_alive() and streams[-1].closed
    run = lab.history[-1]
    assert run.stopped and 5 <= len(run.trace.tokens) <= streams[-1].sent
    assert torch.equal(run.trace.router_indices[:10], trace.router_indices[: min(10, len(run.trace.tokens))])
    assert "stopped" in lab.status.value


def test_lab_reports_a_failing_chat_in_its_status():
    def chat(model, prompt, stream, **options):
        raise RuntimeError("engine <exploded>")

    lab = W.Lab(_fake_model(), chat_fn=chat)
    lab.run("x", wait=True)
    assert "engine &lt;exploded&gt;" in lab.status.value and lab.history == []
    assert not lab.run_button.disabled


def test_lab_compare_and_export(tmp_path):
    a, b = synthetic_trace(T=20, seed=1), synthetic_trace(T=22, seed=2)
    b.token_texts[5] = "DIFFERENT"
    lab = W.Lab(None, traces=[a, b])
    assert lab.run_button.disabled
    with pytest.raises(RuntimeError, match="no model"):
        lab.run("x")
    lab.compare(0, 1)
    assert "DIFFERENT" in lab.diff_text.value and "<del" in lab.diff_text.value
    figure = lab.diff_figure.children[0]
    np.testing.assert_allclose(np.asarray(figure.data[0].z), W.figures.routing_difference(a, b).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(figure.data[1].z), (b.sink.mean(0) - a.sink.mean(0)).numpy(), atol=1e-6)
    path = lab.export(tmp_path / "runs.html")
    page = path.read_text()
    assert page.count('"version":1') == 2 and "#2 " in page


def test_show_trace_gives_the_dashboard():
    trace = synthetic_trace()
    lab = trace.show()
    assert isinstance(lab, W.Lab) and lab.history[0].trace is trace
    bundle = lab._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_text_diff_escapes_both_runs():
    a, b = synthetic_trace(T=8), synthetic_trace(T=8)
    b.token_texts[2] = EVIL
    out = W.text_diff_html(a, b)
    assert "<img" not in out and "&lt;img src=x" in out


# -- with a real (tiny, random) model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return chat_model()


def test_ablation_picker_changes_the_next_run(model):
    lab = W.Lab(model, max_new_tokens=12)
    lab.run("What is 2+2?", wait=True)
    banned = [0, 1, 2, 3, 4, 5]  # reroute 6 of the 8 experts of layer 1: only 6 and 7 remain choosable
    lab.picker.grid.set_state({"cells": [[1, e] for e in banned]})
    lab.picker.mode.value = "reroute"
    lab.run(wait=True)
    before, after = lab.history[0].trace, lab.history[1].trace
    assert set(after.router_indices[:, 1].flatten().tolist()) <= {6, 7}
    assert set(before.router_indices[:, 1].flatten().tolist()) - {6, 7}  # the unablated run used others
    assert after.metadata["ablation"]["mode"] == "reroute" and model.active_ablation == {}
    lab.compare(0, 1)
    assert len(lab.diff_figure.children) == 1


def test_steering_vector_is_the_difference_of_mean_activations(model):
    pos, neg = ["a b c", "hello"], ["x y"]
    vector = W.steering_vector(model, pos, neg, layer=2)

    def mean(texts):
        rows = []
        for text in texts:
            _, cache = model.run_with_cache(torch.tensor([model.tokenizer.encode(text)]),
                                            names=["blocks.2.hook_resid_post"])
            rows.append(cache["blocks.2.hook_resid_post"][0].mean(0))
        return torch.stack(rows).mean(0)

    torch.testing.assert_close(vector, mean(pos) - mean(neg))
    control = W.SteeringControl(model.config.num_hidden_layers, model)
    control.layer.value, control.scale.value = 2, -3.0
    control.positive.value, control.negative.value = "a b c\nhello\n", "x y"
    control.compute_button.click()
    assert control.enabled.value and "norm" in control.status.value
    applied = control.apply(model)
    assert applied["layer"] == 2
    torch.testing.assert_close(model.active_steering[2].float(), -3.0 * vector)
    model.clear_steering()
    control.positive.value = ""
    assert control.compute() is None and "at least one prompt" in control.status.value


def test_steering_prompts_are_plain_text(model, monkeypatch):
    fed = []
    real = model.run_with_cache

    def spy(ids, **kwargs):
        fed.append(ids[0].tolist())
        return real(ids, **kwargs)

    monkeypatch.setattr(model, "run_with_cache", spy)
    typed = "<|start|>user<|message|>hi<|end|>"  # what a user may type into the steering boxes
    W.steering_vector(model, [typed], ["x y"], layer=1)
    assert fed[0] == model.tokenizer.encode(typed)
    assert tk.START not in model.tokenizer.to_o200k(fed[0]) and tk.END not in model.tokenizer.to_o200k(fed[0])


def test_logit_lens_at_the_last_layer_is_the_model_output(model):
    from ossscope.chat import chat

    trace = chat(model, "What is 2+2?", max_new_tokens=10, temperature=0)
    W.logit_lens(model, trace, top=3)
    T, L = len(trace.tokens), model.config.num_hidden_layers
    ranks = trace.captured["logit_lens.next_rank"]
    assert ranks.shape == (T, L) and ranks[-1].tolist() == [-1] * L
    assert (ranks[:-1, -1] == 0).all()  # greedy: the last layer's top token is the one that came next
    sequence, positions = trace.context_tokens()
    logits = model(torch.tensor([model.tokenizer.to_model(sequence)]))[0]
    top = logits[positions].topk(3, dim=-1)
    expected = torch.tensor([model.tokenizer.to_o200k(row) for row in top.indices.tolist()])
    assert torch.equal(trace.captured["logit_lens.top_ids"][:, -1], expected)
    expected_probs = logits[positions].softmax(-1).topk(3).values
    torch.testing.assert_close(trace.captured["logit_lens.top_probs"][:, -1], expected_probs)
    payload = W.trace_payload(trace)
    assert payload["lens"]["rows"] == list(range(T)) and len(payload["lens"]["vocab"]) > 0


def test_capture_attention_rows_plus_sink_sum_to_one(model):
    from ossscope.chat import chat

    trace = chat(model, "Tell me a story", max_new_tokens=8, temperature=0)
    W.capture_attention(model, trace, layers=[0, 1], queries=[0, 3])
    sequence, positions = trace.context_tokens()
    S, H = len(sequence), model.config.num_attention_heads
    window = model.config.sliding_window
    for layer in (0, 1):
        pattern = trace.captured[f"attention.L{layer}"].float()
        assert pattern.shape == (len(trace.tokens), H, S)
        assert pattern[1].abs().sum() == 0  # not asked for
        for t in (0, 3):
            q = positions[t]
            total = pattern[t].sum(-1) + trace.sink[t, layer]  # sink recorded while generating
            torch.testing.assert_close(total, torch.ones(H), atol=2e-3, rtol=0)
            assert pattern[t, :, q + 1:].abs().sum() == 0  # causal
            if layer == 0:  # sliding layer: only the last `window` keys
                assert pattern[t, :, : max(0, q - window + 1)].abs().sum() == 0
    assert len(trace.metadata["context_texts"]) == S
    payload = W.trace_payload(trace)
    assert payload["attention"]["0"]["rows"] == [0, 3] and len(payload["context"]) == S
    with pytest.raises(ValueError, match="out of range"):
        W.capture_attention(model, trace, layers=[99])


def test_a_run_thread_does_not_leak(model):
    before = threading.active_count()
    lab = W.Lab(model, max_new_tokens=4)
    lab.run("hi", wait=True)
    assert threading.active_count() <= before


def test_lab_runs_on_the_models_engine(model):
    """The Lab's chats go through `model.engine` (what `ossscope.load` chose), one step per generated token."""
    from ossscope.engine import TorchEngine

    previous = model.engine
    model.engine = TorchEngine(model)  # a fresh one: its counters start at zero
    try:
        lab = W.Lab(model, max_new_tokens=5)
        lab.run("hi", wait=True)
        trace = lab.history[-1].trace
        assert model.engine.steps == len(trace.tokens) >= 1 and model.engine.prefills >= 1
    finally:
        model.engine = previous


def test_live_record_keeps_the_tool_calls_of_its_events():
    from ossscope.widgets.lab import LiveRecord

    from ossscope.trace import ToolCall

    live = LiveRecord("hi", "low", num_layers=2, k=1, heads=1, experts=2)
    call = ToolCall(name="browser.search", arguments='{"query": "x"}', result="[0] x", token_index=1)
    live.add({"token": 5, "text": "a", "channel": "analysis"})
    live.add({"token": 6, "text": "<|call|>", "channel": "", "tool_call": call})
    trace = live.trace()
    assert trace.tool_calls == [call] and len(trace.tokens) == 2
    assert W.trace_payload(trace)["conversation"][-1]["role"] == "tool browser.search"


def test_payload_carries_the_window_and_a_verdict_on_the_final_answer():
    trace = synthetic_trace(T=6)
    p = W.trace_payload(trace)
    assert p["window"] is None and p["check"] is None  # not recorded: the viewer says so instead of guessing
    trace.metadata.update(sliding_window=64, expected_final=" " + trace.final.strip() + " ")
    p = W.trace_payload(trace)
    assert p["window"] == 64 and p["check"] == {"expected": trace.metadata["expected_final"], "correct": True}
    trace.metadata["expected_final"] = "105"
    assert W.trace_payload(trace)["check"] == {"expected": "105", "correct": False}
    for bad in (True, 0, -3, "64", None):
        trace.metadata["sliding_window"] = bad
        assert W.trace_payload(trace)["window"] is None
