"""Trace: shapes, save/load round trip (safetensors + JSON metadata, no pickle), clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ossscope.trace import ToolCall, Trace


def random_trace(T: int = 7, L: int = 3, k: int = 2, H: int = 4, seed: int = 0) -> Trace:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(T, L, k, generator=g)
    return Trace(
        prompt_tokens=[200006, 17360, 200008, 3575, 200007, 200006, 173781],
        tokens=torch.randint(0, 201_088, (T,), generator=g).tolist(),
        channels=["", "analysis", "analysis", "", "final", "final", ""][:T],
        token_texts=[f"t{i} ✓" for i in range(T)],
        messages=[
            {"role": "user", "content": "hi", "source": "prompt", "token_range": None},
            {
                "role": "assistant",
                "channel": "final",
                "recipient": None,
                "content": "héllo",
                "source": "model",
                "token_range": [0, T],
                "content_range": [3, 5],
                "complete": False,
            },
        ],  # fmt: skip
        analysis="thinking…",
        final="héllo",
        tool_calls=[
            ToolCall("add", '{"a": 1}', {"a": 1}, "2", None, 3),
            ToolCall("add", "{bad", None, None, "not JSON", 5),
        ],
        router_indices=torch.randint(0, 8, (T, L, k), generator=g),
        router_weights=weights / weights.sum(-1, keepdim=True),
        sink=torch.rand(T, L, H, generator=g),
        captured={"blocks.1.hook_resid_post": torch.randn(T, 16, generator=g).half()},
        reasoning="high",
        parse_errors=["token 6: generation ended before the message was closed"],
        prompt_token_texts=["<|start|>", "user", "<|message|>", "hi", "<|end|>", "<|start|>", "assistant"],
        metadata={
            "model": "tiny",
            "sampling": {"seed": 5, "temperature": 1.0},
            "ablation": {"mode": "zero"},
            "tool_inserts": [{"after": 3, "tokens": [200006, 9, 200007]}],
        },  # fmt: skip
    )


def test_round_trip_keeps_everything(tmp_path):
    trace = random_trace()
    path = trace.save(tmp_path / "sub" / "t.safetensors")
    loaded = Trace.load(path)
    for name in ("prompt_tokens", "tokens", "channels", "token_texts", "messages", "analysis", "final", "reasoning",
                 "parse_errors", "prompt_token_texts", "metadata", "tool_calls"):  # fmt: skip
        assert getattr(loaded, name) == getattr(trace, name), name
    assert torch.equal(loaded.router_indices, trace.router_indices) and loaded.router_indices.dtype == torch.int64
    assert torch.equal(loaded.router_weights, trace.router_weights)
    assert torch.equal(loaded.sink, trace.sink)
    assert loaded.captured.keys() == trace.captured.keys()
    value = loaded.captured["blocks.1.hook_resid_post"]
    assert value.dtype == torch.float16 and torch.equal(value, trace.captured["blocks.1.hook_resid_post"])
    # Any safetensors reader can open it; the non-tensor fields are JSON in the metadata.
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["trace"])["final"] == "héllo"


def test_context_tokens_puts_tool_answers_after_their_call():
    trace = random_trace()
    sequence, positions = trace.context_tokens()
    P = len(trace.prompt_tokens)
    assert sequence[:P] == trace.prompt_tokens
    assert positions == [P, P + 1, P + 2, P + 3, P + 7, P + 8, P + 9]
    assert [sequence[p] for p in positions] == trace.tokens
    assert sequence[P + 4 : P + 7] == [200006, 9, 200007]


def test_empty_trace_round_trips(tmp_path):
    trace = random_trace(T=0)
    trace.captured = {}
    loaded = Trace.load(trace.save(tmp_path / "empty.safetensors"))
    assert loaded.tokens == [] and loaded.router_indices.shape == (0, 3, 2) and loaded.sink.shape == (0, 3, 4)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace file"):
        Trace.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Trace.load(junk)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an ossscope trace"):
        Trace.load(other)
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(2)}, str(newer), metadata={"trace": "{}", "ossscope_trace_version": "99"})
    with pytest.raises(ValueError, match="newer ossscope"):
        Trace.load(newer)
