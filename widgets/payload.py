"""Turn a Trace into the compact, JSON-safe payload that the browser viewer (static/scope.js) draws.

One payload feeds both hosts of the viewer: the notebook widget (TraceView, synced as a traitlet) and the
offline HTML file (embedded in a <script type="application/json"> tag). Big per-token records travel as
base64 uint8 arrays (weights and masses quantized to 1/255) so a 1,000-token gpt-oss-20b trace stays a few MB.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import torch

from ossscope.trace import Trace

PAYLOAD_VERSION = 1

# Names under which the analysis helpers (widgets/analysis.py) keep their results in `trace.captured`.
LENS_TOP_IDS = "logit_lens.top_ids"  # [T, L, n] int64 token ids (o200k), -1 where not computed
LENS_TOP_PROBS = "logit_lens.top_probs"  # [T, L, n] float32
LENS_NEXT_RANK = "logit_lens.next_rank"  # [T, L] int64 rank of the actual next token, -1 where unknown
ATTENTION_PREFIX = "attention.L"  # "attention.L{l}" [T, H, S] float16 pattern over the S = P + T keys

# Above this many bytes of attention rows the payload keeps only the first rows of each layer.
DEFAULT_ATTENTION_BUDGET = 4_000_000


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _quantize_unit(x: torch.Tensor) -> np.ndarray:
    """Values in [0, 1] -> uint8 steps of 1/255 (enough for colors and two-digit readouts); NaN reads as 0
    (a byte has no "missing", and casting NaN to uint8 is undefined)."""
    x = torch.nan_to_num(x.detach().float(), nan=0.0)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def json_safe(data: Any) -> Any:
    """data with every NaN or infinite float replaced by None (JSON has no such numbers; the viewer shows
    null as a dash). Containers are copied; everything else is returned as it is."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    return data


def _text(content: Any) -> str:
    """Message content as one string, whatever shape the parser left it in."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    if isinstance(content, dict):
        return _text(content.get("text", json.dumps(content)))
    return str(content)


def sliding_layers(trace: Trace, num_layers: int) -> list[bool]:
    """Which layers use the sliding window: from the trace metadata when recorded, else gpt-oss's rule
    (even layers slide)."""
    recorded = trace.metadata.get("sliding_layers")
    if isinstance(recorded, list) and len(recorded) == num_layers:
        return [bool(v) for v in recorded]
    return [layer % 2 == 0 for layer in range(num_layers)]


def sliding_window(trace: Trace) -> int | None:
    """The sliding layers' window in tokens, from the trace metadata (None where the trace did not record it)."""
    window = trace.metadata.get("sliding_window")
    return int(window) if isinstance(window, (int, float)) and not isinstance(window, bool) and window > 0 else None


def answer_check(trace: Trace) -> dict[str, Any] | None:
    """{"expected", "correct"} when the trace records the answer it should have given
    (trace.metadata["expected_final"], e.g. set by the demo), else None. Compared after stripping whitespace."""
    expected = trace.metadata.get("expected_final")
    if expected is None:
        return None
    return {"expected": str(expected), "correct": trace.final.strip() == str(expected).strip()}


def _check_shapes(trace: Trace) -> tuple[int, int, int, int]:
    T = len(trace.tokens)
    if trace.router_indices.dim() != 3 or trace.router_weights.shape != trace.router_indices.shape:
        raise ValueError(
            f"router_indices {tuple(trace.router_indices.shape)} and router_weights "
            f"{tuple(trace.router_weights.shape)} must both be [T, L, k]"
        )
    Tr, L, k = trace.router_indices.shape
    if Tr != T or trace.sink.dim() != 3 or trace.sink.shape[:2] != (T, L):
        raise ValueError(
            f"trace has {T} tokens but router record {tuple(trace.router_indices.shape)} and sink "
            f"{tuple(trace.sink.shape)} (expected [T, L, k] and [T, L, H] with T={T})"
        )
    if len(trace.channels) != T or len(trace.token_texts) != T:
        raise ValueError(f"channels ({len(trace.channels)}) and token_texts ({len(trace.token_texts)}) need T={T}")
    return T, L, k, trace.sink.shape[2]


def _conversation(trace: Trace) -> list[dict[str, Any]]:
    """The messages that came before the generated tokens (system, developer, user), and tool answers with
    the token index they follow. Assistant messages are drawn from the tokens themselves."""
    out = []
    for message in trace.messages:
        role = str(message.get("role", ""))
        if role == "assistant":
            continue
        out.append({"role": role, "text": _text(message.get("content")), "after": -1})
    # Tool answers go right after the token that ended the call (messages may not say where they belong).
    # Built-in tools (browser.search, python) and function tools alike: the call's arguments, then the answer.
    out = [m for m in out if m["role"] != "tool"]
    for call in trace.tool_calls:
        answer = call.result if call.error is None else f"error: {call.error}"
        out.append({"role": f"tool {call.name}", "text": answer or "", "after": int(call.token_index),
                    "call": str(call.arguments), "error": call.error is not None})  # fmt: skip
    return out


def _grammar(trace: Trace, T: int) -> dict[str, list[int]] | None:
    """Per token, from Structured Outputs (trace.metadata["structured"]): was it constrained, and did the
    grammar change the model's top choice (0/1 lists of length T); None when nothing was enforced."""
    record = trace.metadata.get("structured")
    if not isinstance(record, dict) or not record.get("enforced"):
        return None
    constrained, changed = record.get("constrained", []), record.get("changed_top", [])
    if len(constrained) != T or len(changed) != T:
        return None
    return {"constrained": [int(bool(v)) for v in constrained], "changed": [int(bool(v)) for v in changed]}


def _lens(trace: Trace, T: int, token_strings: dict[str, str]) -> dict[str, Any] | None:
    if LENS_TOP_IDS not in trace.captured:
        return None
    ids = trace.captured[LENS_TOP_IDS].long()  # [T, L, n]
    probs = trace.captured[LENS_TOP_PROBS].float()  # [T, L, n]
    ranks = trace.captured.get(LENS_NEXT_RANK)
    rows = [t for t in range(T) if int(ids[t, 0, 0]) >= 0]
    vocab: dict[str, str] = {}
    for token_id in torch.unique(ids[rows]).tolist() if rows else []:
        if token_id >= 0:
            vocab[str(token_id)] = token_strings.get(str(token_id), f"#{token_id}")
    return {
        "rows": rows,
        "n": int(ids.shape[2]),
        "ids": ids[rows].tolist(),  # [R, L, n]
        "probs": json_safe([[[round(p, 4) for p in layer] for layer in row] for row in probs[rows].tolist()]),
        "rank": ranks.long().tolist() if ranks is not None else None,  # [T, L]
        "vocab": vocab,
    }


def _has_attention(trace: Trace) -> bool:
    return any(name.startswith(ATTENTION_PREFIX) for name in trace.captured)


def _attention(trace: Trace, budget: int) -> dict[str, Any]:
    out = {}
    for name, pattern in sorted(trace.captured.items()):
        if not name.startswith(ATTENTION_PREFIX) or not name[len(ATTENTION_PREFIX):].isdigit():
            continue
        layer = int(name[len(ATTENTION_PREFIX):])
        pattern = pattern.float()  # [T, H, S]
        rows = (pattern.sum(dim=(1, 2)) > 0).nonzero().flatten()
        row_bytes = pattern.shape[1] * pattern.shape[2]
        keep = max(1, budget // max(1, row_bytes * max(1, len(out) + 1)))
        rows = rows[:keep]
        out[str(layer)] = {
            "rows": rows.tolist(),
            "keys": int(pattern.shape[2]),
            "data": _b64(_quantize_unit(pattern[rows])),  # [R, H, S] uint8
        }
    return out


def trace_payload(
    trace: Trace,
    *,
    title: str | None = None,
    attention_budget: int = DEFAULT_ATTENTION_BUDGET,
) -> dict[str, Any]:
    """Everything the viewer needs from `trace`, as plain JSON-able data.

    Shapes in the result: router.idx [T*L*k] uint8/uint16 (base64), router.w [T*L*k] uint8 (weight*255),
    sink [T*L*H] uint8 (mass*255), all row-major over (token, layer, slot/head).
    """
    T, L, k, H = _check_shapes(trace)
    indices = trace.router_indices.detach().cpu().long()
    E = int(trace.metadata.get("num_experts", 0)) or (int(indices.max()) + 1 if indices.numel() else 1)
    index_dtype = np.uint8 if E <= 256 else np.uint16
    token_strings = {str(key): str(value) for key, value in trace.metadata.get("token_strings", {}).items()}
    prompt_texts = list(trace.prompt_token_texts) or [f"#{i}" for i in trace.prompt_tokens]
    if hasattr(trace, "context_tokens"):
        sequence, positions = trace.context_tokens()
    else:
        sequence, positions = [], list(range(len(trace.prompt_tokens), len(trace.prompt_tokens) + T))
    context_texts = trace.metadata.get("context_texts")
    if not (isinstance(context_texts, list) and len(context_texts) == len(sequence)):
        # Prompt and generated texts are known; tool answers between turns show as their ids.
        known = dict(zip(positions, trace.token_texts, strict=True))
        known.update(enumerate(prompt_texts))
        context_texts = [str(known.get(i, f"#{token}")) for i, token in enumerate(sequence)]
    return {
        "version": PAYLOAD_VERSION,
        "title": title or str(trace.metadata.get("title", "")) or "ossscope trace",
        "model": str(trace.metadata.get("model", "")),
        "reasoning": trace.reasoning,
        "dims": {"T": T, "L": L, "k": k, "H": H, "E": E, "P": len(trace.prompt_tokens)},
        "sliding": sliding_layers(trace, L),
        "window": sliding_window(trace),  # keys a sliding layer holds; None if the trace did not record it
        "tokens": [str(t) for t in trace.token_texts],
        "ids": [int(i) for i in trace.tokens],
        "channels": [str(c) for c in trace.channels],
        "prompt": [str(t) for t in prompt_texts],
        "positions": [int(p) for p in positions],  # position of each generated token in the whole sequence
        "context": [str(t) for t in context_texts] if trace.captured and _has_attention(trace) else [],
        "conversation": _conversation(trace),
        "grammar": _grammar(trace, T),
        "final": trace.final,
        "check": answer_check(trace),  # {"expected", "correct"} or None
        "parse_errors": [str(e) for e in trace.parse_errors],
        "router": {
            "idx": _b64(indices.numpy().astype(index_dtype)),
            "idx_bytes": np.dtype(index_dtype).itemsize,
            "w": _b64(_quantize_unit(trace.router_weights)),
        },
        "sink": _b64(_quantize_unit(trace.sink)),
        "lens": _lens(trace, T, token_strings),
        "attention": _attention(trace, attention_budget),
    }


def dumps_for_html(data: Any) -> str:
    """JSON that is safe inside an HTML <script> element: no '</script>', no '<!--', no U+2028/2029, and
    valid (NaN and infinities are written as null).

    Every '<', '>' and '&' becomes a \\u escape, so no text the model or the user wrote can close the
    element or open a comment, whatever it contains; JSON.parse restores the characters.
    """
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN or infinity somewhere: null instead (a second pass only when needed)
        text = json.dumps(json_safe(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
