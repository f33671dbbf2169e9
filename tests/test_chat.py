"""model.chat: the rendered prompt, the tool loop (with a scripted model calling real Python functions, malformed
calls included), the per-token record across tool answers, streaming with early stop, and malformed output."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import pytest
import torch

import ossscope
from ossscope import encode, harmony, toolcall
from ossscope import tokenizer as tk
from ossscope.chat import chat
from ossscope.config import PRESETS
from ossscope.engine import TorchEngine, forward_and_capture


@pytest.fixture(scope="module")
def model():
    """A tiny random model with the full o200k_harmony vocabulary (so it reads and writes harmony directly)."""
    return ossscope.random_model(PRESETS["tiny"].replace(vocab_size=201_088), seed=2, device="cpu")


class ScriptedModel:
    """A real model whose next-token choice is forced to follow a script (o200k text), so the tool loop can be
    driven exactly. Everything else (cache, hooks, records) is the wrapped model's own.

    Each sampled token is fed straight back; when the fed token is the one we forced, the script advances.
    Multi-token feeds (the prompt, tool answers) do not advance it.
    """

    def __init__(self, inner, script: str):
        self._inner = inner
        self.script = tk.Tokenizer.o200k().encode(script, allow_special=True)
        self.position = 0
        self.forced: int | None = None
        self.engine = _ThroughCall(self)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, input_ids, cache=None):
        logits = self._inner(input_ids, cache=cache)
        if input_ids.shape[1] == 1 and self.forced is not None and int(input_ids[0, 0]) == self.forced:
            self.position += 1
        token = self.script[min(self.position, len(self.script) - 1)]
        logits[:, -1] = -1e4
        logits[:, -1, token] = 1e4
        self.forced = token
        return logits


class _ThroughCall(TorchEngine):
    """The torch engine, with prompts too going through `model(...)` (where ScriptedModel forces its script)."""

    def prefill(self, input_ids, cache):
        return forward_and_capture(self.model, input_ids, cache, ())[0]


class Weather:
    def __init__(self):
        self.calls = []

    def get_weather(self, city: str, days: int = 1) -> dict:
        """Get the weather forecast.

        Args:
            city: City name.
            days: How many days.
        """
        self.calls.append((city, days))
        if city == "Atlantis":
            raise LookupError("no such city")
        return {"city": city, "forecast": "sunny", "days": days}


def call(args: str, name: str = "get_weather") -> str:
    # After the tool's answer we feed `<|start|>assistant`, so the model's next message starts at its header.
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{args}<|call|>"


def test_prompt_rendering_and_record_shapes(model):
    trace = model.chat("What is 2+2?", reasoning="high", max_new_tokens=6, temperature=0.0)
    prompt = tk.Tokenizer.o200k().decode_o200k(trace.prompt_tokens)
    assert "Reasoning: high" in prompt and "<|start|>user<|message|>What is 2+2?<|end|>" in prompt
    assert prompt.endswith("<|start|>assistant")
    L, k, H = 4, 2, 4
    assert len(trace.tokens) == 6 == len(trace.channels) == len(trace.token_texts)
    assert trace.router_indices.shape == (6, L, k) and trace.router_indices.dtype == torch.int64
    assert trace.router_weights.shape == (6, L, k) and trace.sink.shape == (6, L, H)
    assert trace.metadata["stop_reason"] == "length" and trace.metadata["sampling"]["temperature"] == 0.0
    assert trace.metadata["model"] == model.name and trace.reasoning == "high"
    assert trace.messages[0] == {"role": "user", "content": "What is 2+2?", "source": "prompt", "token_range": None}
    assert trace.parse_errors  # a random model does not write harmony; nothing raised, the problem is recorded


def test_tool_loop_calls_the_function_and_continues(model):
    weather = Weather()
    script = (
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
        + call('{"city": "Paris", "days": 2}')
        + "<|channel|>final<|message|>Sunny in Paris.<|return|>"
    )
    scripted = ScriptedModel(model, script)
    trace = chat(scripted, "Weather in Paris?", tools=[weather.get_weather], temperature=0.0, max_new_tokens=100)
    assert weather.calls == [("Paris", 2)]
    assert trace.tokens == scripted.script
    (made,) = trace.tool_calls
    assert made.name == "get_weather" and made.error is None
    assert made.parsed_arguments == {"city": "Paris", "days": 2}
    assert json.loads(made.result) == {"city": "Paris", "forecast": "sunny", "days": 2}
    assert trace.tokens[made.token_index] == tk.CALL
    assert trace.analysis == "Need the weather." and trace.final == "Sunny in Paris."
    assert trace.parse_errors == [] and trace.metadata["stop_reason"] == "return"
    roles = [(m["role"], m.get("channel"), m["source"]) for m in trace.messages]
    assert roles == [
        ("user", None, "prompt"),
        ("assistant", "analysis", "model"),
        ("assistant", "commentary", "model"),
        ("tool", "commentary", "tool"),
        ("assistant", "final", "model"),
    ]
    assert trace.messages[2]["recipient"] == "functions.get_weather"
    labels = set(trace.channels)
    assert labels == {"", "analysis", "commentary", "final"}
    # The record across the tool answer: row t equals a full recomputation of the whole context at token t.
    sequence, positions = trace.context_tokens()
    answer = tk.Tokenizer.o200k().decode_o200k(sequence)
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{" in answer
    _, cache = model.run_with_cache(torch.tensor([sequence]), names=lambda n: "topk_indices" in n or "sink" in n)
    for layer in range(4):
        torch.testing.assert_close(
            trace.router_indices[:, layer], cache[f"blocks.{layer}.mlp.hook_topk_indices"][0, positions]
        )
        torch.testing.assert_close(trace.sink[:, layer], cache[f"blocks.{layer}.attn.hook_sink"][0, :, positions].T)


def test_malformed_calls_are_reported_back_not_raised(model):
    weather = Weather()
    script = (
        call('{"city": 5}')  # wrong type
        + call('{"city": "Oslo",')  # not JSON
        + call('{"city": "Oslo"}', name="get_wether")  # unknown tool
        + call('{"city": "Atlantis"}')  # the function raises
        + call('{"city": "Oslo"}')  # fine
        + "<|channel|>final<|message|>Done.<|return|>"
    )
    trace = chat(ScriptedModel(model, script), "Weather?", tools=[weather.get_weather], temperature=0.0)
    errors = [c.error for c in trace.tool_calls]
    assert "bad arguments" in errors[0] and "expected string" in errors[0]
    assert "not valid JSON" in errors[1]
    assert "unknown tool 'functions.get_wether'" in errors[2] and "functions.get_weather" in errors[2]
    assert errors[3] == "LookupError: no such city"
    assert errors[4] is None and json.loads(trace.tool_calls[4].result)["city"] == "Oslo"
    assert weather.calls == [("Atlantis", 1), ("Oslo", 1)]  # bad calls never reach the function
    # The model was told each error, in the tool message it read.
    inserted = [tk.Tokenizer.o200k().decode_o200k(i["tokens"]) for i in trace.metadata["tool_inserts"]]
    assert all('{"error": ' in text for text in inserted[:4]) and '"forecast": "sunny"' in inserted[4]
    assert trace.final == "Done." and trace.metadata["stop_reason"] == "return"


def test_tool_timeouts_async_tools_and_results_that_are_not_text(model, monkeypatch):
    release = threading.Event()

    def sleepy() -> str:
        release.wait(30)
        return "late"

    async def forecast() -> dict:
        await asyncio.sleep(0)
        return {"rain": float("nan"), "days": (1, 2), "raw": b"caf\xc3\xa9"}

    async def stuck() -> str:
        await asyncio.sleep(30)
        return "never"

    def huge() -> str:
        return "x" * (encode.MAX_TEXT_CHARS + 1)

    monkeypatch.setattr(toolcall, "DEFAULT_TIMEOUT_S", 0.5)  # the default, for tools that set none
    tools = [harmony.Tool.from_function(sleepy, timeout_s=0.2), forecast, stuck, huge]
    script = "".join(call("{}", name=t) for t in ("sleepy", "forecast", "stuck", "huge")) + "<|return|>"
    try:
        trace = chat(ScriptedModel(model, script), "Weather?", tools=tools, temperature=0.0, max_new_tokens=100)
    finally:
        release.set()
    calls = {c.name: c for c in trace.tool_calls}
    assert calls["sleepy"].error == "the tool did not answer within 0.2 s" and calls["sleepy"].result is None
    assert calls["stuck"].error == "the tool did not answer within 0.5 s"
    assert calls["forecast"].error is None

    def no_nan(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(calls["forecast"].result, parse_constant=no_nan) == {"rain": None, "days": [1, 2], "raw": "café"}
    assert "cannot be read" in calls["huge"].error and "more than the encoder's limit" in calls["huge"].error
    # Each error was answered to the model, and the chat went on.
    inserted = [tk.Tokenizer.o200k().decode_o200k(i["tokens"]) for i in trace.metadata["tool_inserts"]]
    assert len(inserted) == 4 and "did not answer within 0.2 s" in inserted[0] and "cannot be read" in inserted[3]
    assert trace.metadata["stop_reason"] == "return"


def test_answer_text_and_timeout_settings():
    import numpy as np

    assert toolcall.answer_text("as is") == "as is" and toolcall.answer_text(b"ok") == "ok"
    assert toolcall.answer_text({"a": np.float32(1.5), "b": torch.tensor([1, 2]), 3: float("inf")}) == (
        '{"a": 1.5, "b": [1, 2], "3": null}')
    with pytest.raises(toolcall.ToolError, match="3 bytes that are not UTF-8 text"):
        toolcall.answer_text(b"\xff\xfe\x00")
    with pytest.raises(toolcall.ToolError, match="builtins.object, which has no JSON form"):
        toolcall.answer_text([object()])
    with pytest.raises(toolcall.ToolError, match="key of type tuple"):
        toolcall.answer_text({(1, 2): 3})
    with pytest.raises(toolcall.ToolError, match="TimeoutError: its own"):  # not mistaken for our time limit

        async def own_timeout():
            raise TimeoutError("its own")

        toolcall.run_with_timeout(own_timeout, {}, 5.0)
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="timeout_s must be a positive number"):
            harmony.Tool("t", "", None, None, timeout_s=bad)
    assert harmony.as_tools([{"name": "t", "timeout_s": 2}])[0].timeout_s == 2.0


def test_a_megabyte_tool_answer_is_not_a_crash(model):
    blob = base64.b64encode(bytes(750_000)).decode()  # 1 MB of "A": harmony's encoder panicked on it

    def dump(city: str) -> str:
        return blob

    trace = chat(ScriptedModel(model, call('{"city": "Oslo"}', name="dump") + "<|return|>"), "Dump it.",
                 tools=[dump], temperature=0.0, max_new_tokens=60)
    (made,) = trace.tool_calls
    assert made.error is None and made.result == blob
    assert trace.metadata["stop_reason"] == "context"  # 125,000 tokens do not fit the tiny model's cache
    assert any("does not fit" in problem for problem in trace.parse_errors)


def test_tool_budget_and_budget_cut(model):
    weather = Weather()
    loop = ScriptedModel(model, call('{"city": "Rome"}') * 5)
    trace = chat(loop, "Weather?", tools=[weather.get_weather], temperature=0.0, max_tool_calls=2)
    assert len(weather.calls) == 2 and trace.metadata["stop_reason"] == "tool_limit"
    assert any("more than 2 tool calls" in e for e in trace.parse_errors)
    # A generation cut by the budget keeps its raw tokens and says what was left open.
    cut = chat(ScriptedModel(model, "<|channel|>final<|message|>The answer is four<|return|>"), "2+2?",
               temperature=0.0, max_new_tokens=6)  # fmt: skip
    assert len(cut.tokens) == 6 and cut.metadata["stop_reason"] == "length"
    assert cut.final == "The answer is" and cut.messages[-1]["complete"] is False
    assert any("ended before the message was closed" in e for e in cut.parse_errors)


def test_streaming_and_early_stop(model):
    script = "<|channel|>analysis<|message|>one two three four five six<|end|>"
    seen = []
    stream = chat(ScriptedModel(model, script), "Count.", temperature=0.0, stream=True, on_token=seen.append)
    events = []
    for event in stream:
        events.append(event)
        if len(events) == 5:
            break
    stream.close()
    trace = stream.trace
    assert [e.token for e in events] == trace.tokens and len(seen) == 5
    assert [e.channel for e in events] == trace.channels == ["", "", "", "analysis", "analysis"]
    assert trace.metadata["stop_reason"] == "interrupted" and trace.router_indices.shape[0] == 5
    assert trace.analysis == "one two" and events[3].text == "one"
    torch.testing.assert_close(
        events[4].record["router_indices"], trace.router_indices[4].to(events[4].record["router_indices"].device)
    )


def test_compact_vocabulary_model_chats_in_o200k_ids():
    tok = tk.Tokenizer.o200k()
    words = "<|channel|>final<|message|>Hi there<|return|> analysis commentary What is 2+2?"
    keep = set(tok.encode(words, allow_special=True))
    keep |= {tk.START, tk.END, tk.MESSAGE, tk.CHANNEL, tk.CALL, tk.CONSTRAIN}
    o200k_ids = sorted(keep) + [i for i in range(100, 1000) if i not in keep][: 512 - len(keep)]
    small = ossscope.random_model("tiny", seed=4, device="cpu")
    small.vocab_map, small.unknown_id = o200k_ids, o200k_ids.index(100)
    scripted = ScriptedModel(small, "")
    script = "<|channel|>final<|message|>Hi there<|return|>"
    scripted.script = small.tokenizer.encode(script, allow_special=True)  # model ids
    trace = chat(scripted, "What is 2+2?", temperature=0.0)
    assert trace.final == "Hi there" and trace.tokens == tok.encode(script, allow_special=True)
    assert trace.metadata["prompt_tokens_outside_vocab"] > 0  # the system message's words are mostly unknown
    with pytest.raises(ValueError, match="vocab_map"):
        ossscope.random_model("tiny", seed=4, device="cpu").chat("hi")


def test_chats_in_two_threads_keep_their_own_records(model):
    """Two chats on one model at once: each gets the tokens and router/sink records it gets alone (the engine's
    lock lets their steps interleave, never mix)."""
    import threading

    prompts = ["What is 2+2?", "Name three colours of the rainbow, please."]
    alone = [model.chat(p, max_new_tokens=12, temperature=0.0) for p in prompts]
    together: dict[int, ossscope.Trace] = {}
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        together[i] = model.chat(prompts[i], max_new_tokens=12, temperature=0.0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(2):
        assert together[i].tokens == alone[i].tokens
        assert torch.equal(together[i].router_indices, alone[i].router_indices)
        torch.testing.assert_close(together[i].sink, alone[i].sink)
