"""`model.chat([...])`: a list of conversations through one batched decoder, each as it would run alone."""

from __future__ import annotations

import json

import pytest
import torch

import ossscope
from ossscope import tokenizer as tk
from ossscope.chat import chat, chat_many, is_conversation_list
from ossscope.config import PRESETS
from ossscope.engine import TorchEngine, forward_and_capture


@pytest.fixture(scope="module")
def model():
    return ossscope.random_model(PRESETS["tiny"].replace(vocab_size=201_088), seed=2, device="cpu")


def test_conversation_lists_are_told_apart_from_one_conversation():
    assert is_conversation_list(["a", "b"]) and is_conversation_list([[{"role": "user", "content": "x"}], "b"])
    assert not is_conversation_list("a") and not is_conversation_list([{"role": "user", "content": "x"}])
    assert not is_conversation_list([])


def test_a_list_of_chats_equals_each_chat_alone(model):
    questions = ["What is 2+2?", "Name a colour.", "Why is the sky blue? Say it in one short line."]
    alone = [chat(model, q, max_new_tokens=9, temperature=0.0) for q in questions]
    seen = []
    traces = model.chat(questions, max_new_tokens=9, temperature=0.0, batch_size=2,
                        on_token=lambda event: seen.append(event.sequence))
    assert len(traces) == 3 and sorted(set(seen)) == [0, 1, 2]
    for got, want in zip(traces, alone, strict=True):
        assert got.tokens == want.tokens and got.prompt_tokens == want.prompt_tokens
        assert torch.equal(got.router_indices, want.router_indices)
        torch.testing.assert_close(got.sink, want.sink, atol=1e-5, rtol=1e-5)
        assert got.metadata["stop_reason"] == want.metadata["stop_reason"]
    assert traces[2].metadata["batch"] == {"rows": 2, "index": 2}
    with pytest.raises(ValueError, match="stream=True takes one conversation"):
        model.chat(questions, stream=True)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        chat_many(model, questions, batch_size=0)
    with pytest.raises(ValueError, match="message 0 of the conversation is a str"):
        model.chat(["What is 2+2?", 5])  # neither a list of conversations nor one conversation
    with pytest.raises(ValueError, match="message 0 of the conversation is a str"):
        model.chat([["What is 2+2?"]])  # a conversation of strings
    with pytest.raises(TypeError, match="a conversation is a string or a list of messages"):
        model.chat(42)


class RowScripts:
    """A real model whose next token in each row follows that row's script (chosen by the prompt's question),
    so a batch of tool loops can be driven exactly; the cache, hooks and records are the model's own."""

    def __init__(self, inner, scripts: dict[str, str]):
        self._inner = inner
        enc = tk.Tokenizer.o200k()
        self.scripts = {question: enc.encode(text, allow_special=True) for question, text in scripts.items()}
        self.question = enc.encode
        self.row_script: dict[int, list[int]] = {}
        self.position: dict[int, int] = {}
        self.forced: dict[int, int] = {}
        self.engine = _ThroughCall(self)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, input_ids, cache=None):
        logits = self._inner(input_ids, cache=cache)
        if input_ids.shape[1] > 1:  # a prompt or a tool's answer, for one row (KVCache.row)
            b = getattr(cache, "b", 0)
            text = tk.Tokenizer.o200k().decode_o200k(input_ids[0].tolist())
            for question, script in self.scripts.items():
                if question in text:  # a new conversation in this row
                    self.row_script[b], self.position[b] = script, 0
            rows = [b]
        else:
            rows = list(range(input_ids.shape[0]))
            for b in rows:
                if self.forced.get(b) is not None and int(input_ids[b, 0]) == self.forced[b]:
                    self.position[b] += 1
        for i, b in enumerate(rows):
            script = self.row_script[b]
            token = script[min(self.position[b], len(script) - 1)]
            logits[i, -1] = -1e4
            logits[i, -1, token] = 1e4
            self.forced[b] = token
        return logits


class _ThroughCall(TorchEngine):
    def prefill(self, input_ids, cache):
        return forward_and_capture(self.model, input_ids, cache, ())[0]


def test_tool_calls_in_a_batch_run_in_their_own_rows(model):
    calls = []

    def get_weather(city: str) -> dict:
        """Get the weather.

        Args:
            city: City name.
        """
        calls.append(city)
        return {"city": city, "forecast": "rain"}

    call = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>'
    scripts = {
        "Weather in Oslo?": "<|channel|>analysis<|message|>Ask the tool.<|end|><|start|>assistant" + call
        + "<|channel|>final<|message|>Rain in Oslo.<|return|>",
        "Say hi.": "<|channel|>final<|message|>Hi.<|return|>",
        "Say bye.": "<|channel|>analysis<|message|>Short.<|end|><|start|>assistant<|channel|>final<|message|>"
        "Bye.<|return|>",
    }
    scripted = RowScripts(model, scripts)
    traces = chat(scripted, list(scripts), tools=[get_weather], temperature=0.0, max_new_tokens=80, batch_size=2)
    assert calls == ["Oslo"]
    assert [t.final for t in traces] == ["Rain in Oslo.", "Hi.", "Bye."]
    assert all(t.metadata["stop_reason"] == "return" and t.parse_errors == [] for t in traces)
    (made,) = traces[0].tool_calls
    assert json.loads(made.result) == {"city": "Oslo", "forecast": "rain"}
    for trace, question in zip(traces, scripts, strict=True):
        assert trace.tokens == scripted.scripts[question]
    # The record across the tool answer equals a full recomputation of that conversation alone.
    sequence, positions = traces[0].context_tokens()
    _, cache = model.run_with_cache(torch.tensor([sequence]), names=lambda n: "topk_indices" in n)
    for layer in range(4):
        assert torch.equal(traces[0].router_indices[:, layer],
                           cache[f"blocks.{layer}.mlp.hook_topk_indices"][0, positions])


def test_rows_refilled_in_groups_give_each_chat_its_own_run(model):
    """chat_stream's GPU policy (freed rows refilled together, one padded prefill), forced on the CPU."""
    from ossscope.chat import chat_stream

    questions = ["What is 2+2?", "Name a colour.", "Why is the sky blue?", "Say hi.", "Count to three."]
    alone = [chat(model, q, max_new_tokens=7, temperature=0.0) for q in questions]
    got: dict[int, object] = {}
    chat_stream(model, ((i, q, {"max_new_tokens": 4 + i % 3}) for i, q in enumerate(questions)), 3,
                got.__setitem__, lambda key, exc: (_ for _ in ()).throw(exc), prefill_together=True,
                temperature=0.0)
    assert sorted(got) == [0, 1, 2, 3, 4]
    for i, trace in got.items():
        assert trace.tokens == alone[i].tokens[: 4 + i % 3]
        n = len(trace.tokens)
        assert torch.equal(trace.router_indices, alone[i].router_indices[:n])
