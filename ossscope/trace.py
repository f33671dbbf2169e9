"""Trace: everything one chat produced, token by token, and what the model did inside for each token.

A Trace is plain data: lists, strings and tensors. It saves to one safetensors file whose metadata holds the
non-tensor fields as JSON, so it loads without pickle and opens with any safetensors reader.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TRACE_FORMAT_VERSION = 1


@dataclass
class ToolCall:
    """One function call the model made on the commentary channel, and what came back."""

    name: str  # "get_weather" for a call addressed to functions.get_weather
    arguments: str  # the raw argument text the model wrote
    parsed_arguments: dict[str, Any] | None = None  # None when the text was not valid JSON for the tool
    result: str | None = None  # the tool's answer as sent back to the model
    error: str | None = None  # why the call could not be made (reported back to the model as the result)
    token_index: int = -1  # index into Trace.tokens of the call's last token


@dataclass
class Trace:
    """The record of one `model.chat(...)`.

    Per generated token t (T tokens in all), the record rows hold what the model did when token t was its
    input: which experts each layer routed it to, with which weights, and how much attention mass each head
    gave to its sink.

    Shapes: router_indices [T, L, k] int64, router_weights [T, L, k] float32, sink [T, L, H] float32;
    captured[name] [T, ...] for extra hooks the caller asked to keep.
    """

    prompt_tokens: list[int]  # o200k_harmony ids of the rendered prompt
    tokens: list[int]  # every generated token (o200k_harmony ids), in order; tool answers not included
    channels: list[str]  # per generated token: "analysis", "commentary", "final" or "" (headers, specials)
    token_texts: list[str]  # decoded text of each generated token
    messages: list[dict[str, Any]]  # the conversation, parsed: role, channel, recipient, content, token_range
    analysis: str  # the raw chain of thought (analysis channel), all of it
    final: str  # the final answer ("" when the model never reached the final channel)
    tool_calls: list[ToolCall]
    router_indices: torch.Tensor
    router_weights: torch.Tensor
    sink: torch.Tensor
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    reasoning: str = "medium"
    parse_errors: list[str] = field(default_factory=list)
    prompt_token_texts: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def context_tokens(self) -> tuple[list[int], list[int]]:
        """The whole sequence the model read, in order: prompt, generated tokens, and the tool answers fed
        between turns (from metadata["tool_inserts"]). Returns (o200k ids, position of each generated token)."""
        inserts = {int(item["after"]): list(item["tokens"]) for item in self.metadata.get("tool_inserts", [])}
        sequence = list(self.prompt_tokens)
        positions = []
        for t, token in enumerate(self.tokens):
            positions.append(len(sequence))
            sequence.append(int(token))
            sequence += inserts.get(t, [])
        return sequence, positions

    # -- views -------------------------------------------------------------------------------------------
    def show(self, **kwargs: Any) -> Any:
        """Display the interactive views of this trace in a notebook (see ossscope.widgets)."""
        from ossscope.widgets import show_trace

        return show_trace(self, **kwargs)

    def to_html(self, path: str | Path, **kwargs: Any) -> Path:
        """Write one self-contained interactive HTML file (no kernel, no network needed to open it)."""
        from ossscope.widgets import export_trace_html

        return export_trace_html(self, path, **kwargs)

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save to one safetensors file (tensors as tensors, everything else as JSON metadata)."""
        path = Path(path)
        tensors = {
            "router_indices": self.router_indices.detach().to("cpu", torch.int64).contiguous(),
            "router_weights": self.router_weights.detach().to("cpu", torch.float32).contiguous(),
            "sink": self.sink.detach().to("cpu", torch.float32).contiguous(),
        }
        for name, value in self.captured.items():
            tensors[f"captured/{name}"] = value.detach().to("cpu").contiguous()
        fields = {
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "channels": self.channels,
            "token_texts": self.token_texts,
            "messages": self.messages,
            "analysis": self.analysis,
            "final": self.final,
            "tool_calls": [asdict(call) for call in self.tool_calls],
            "reasoning": self.reasoning,
            "parse_errors": self.parse_errors,
            "prompt_token_texts": self.prompt_token_texts,
            "metadata": self.metadata,
        }
        meta = {"ossscope_trace_version": str(TRACE_FORMAT_VERSION), "trace": json.dumps(fields)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Load a trace written by `save`. Raises ValueError naming the file if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trace file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        if "trace" not in meta:
            raise ValueError(f"{path} is a safetensors file but not an ossscope trace (no 'trace' metadata)")
        version = int(meta.get("ossscope_trace_version", "0"))
        if version > TRACE_FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer ossscope (trace format {version})")
        fields = json.loads(meta["trace"])
        captured = {
            name.removeprefix("captured/"): value for name, value in tensors.items() if name.startswith("captured/")
        }
        return cls(
            prompt_tokens=fields["prompt_tokens"],
            tokens=fields["tokens"],
            channels=fields["channels"],
            token_texts=fields["token_texts"],
            messages=fields["messages"],
            analysis=fields["analysis"],
            final=fields["final"],
            tool_calls=[ToolCall(**call) for call in fields["tool_calls"]],
            router_indices=tensors["router_indices"],
            router_weights=tensors["router_weights"],
            sink=tensors["sink"],
            captured=captured,
            reasoning=fields.get("reasoning", "medium"),
            parse_errors=fields.get("parse_errors", []),
            prompt_token_texts=fields.get("prompt_token_texts", []),
            metadata=fields.get("metadata", {}),
        )

    def __repr__(self) -> str:
        T = len(self.tokens)
        return (
            f"Trace({T} generated tokens, reasoning={self.reasoning!r}, analysis={len(self.analysis)} chars, "
            f"final={self.final[:60]!r}{'...' if len(self.final) > 60 else ''}, tool_calls={len(self.tool_calls)})"
        )
