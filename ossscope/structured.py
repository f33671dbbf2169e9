"""Structured Outputs: the final channel's message held to a JSON schema, token by token, with llguidance.

The sampler asks the constraint once per step for an allow-mask over model ids (`mask(generated)`), given the
tokens generated so far. Everything outside the final channel's message text is free: the analysis channel,
tool calls, message headers and harmony's control tokens, so the chain of thought is the model's own. Inside
the final message, only tokens the grammar accepts are allowed, and the message may close only with
`<|return|>` (the final answer ends the turn) and only once the JSON is complete.

The grammar runs over o200k_harmony (llguidance builds its tokenizer from the same o200k_base.tiktoken that
openai-harmony uses); a model with a compact vocabulary (nano) gets the mask gathered through its vocab map.
Should no token of the model's vocabulary fit the grammar, the constraint steps aside (noted in `problems`)
rather than leave nothing to sample.

Per generated token the constraint records whether it was constrained and whether the mask changed the model's
top choice (argmax before vs after masking): chat stores that in `trace.metadata["structured"]`.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ossscope import tokenizer as tk
from ossscope.harmony import HarmonyStreamParser

# o200k's pre-tokenizer pattern (tiktoken's o200k_base): llguidance needs it to tokenize forced text.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])  # fmt: skip
# JSON as json.dumps writes it (", " and ": "), with no free whitespace: a model cannot stall in spaces.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CLOSERS = (tk.RETURN, tk.END)


def available() -> bool:
    """Whether llguidance is installed (the `agent` extra)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def o200k_lltokenizer() -> Any:
    """llguidance's tokenizer for o200k_harmony (about 2 s to build; cached)."""
    from llguidance import LLTokenizer

    folder = tk.ensure_tiktoken_base()
    if folder is None:
        raise RuntimeError("no o200k_base.tiktoken to build the grammar's tokenizer from (see ossscope.tokenizer)")
    ranks = {}
    with open(folder / tk.O200K_BASE_FILE, "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    enc = tk.harmony_encoding()
    specials = {enc.decode([i]): i for i in range(tk.START_OF_TEXT, tk.O200K_VOCAB_SIZE)}
    return LLTokenizer.from_tiktoken(
        encoder=ranks, special_tokens=specials, pattern=O200K_PATTERN, eos_token=tk.RETURN,
        n_vocab=tk.O200K_VOCAB_SIZE,
    )  # fmt: skip


def schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema in a response format ({"name", "schema", ...} or a bare schema)."""
    schema = response_format.get("schema", response_format) if isinstance(response_format, dict) else None
    if not isinstance(schema, dict):
        raise ValueError(f"response_format must be a dict holding a JSON schema, got {response_format!r}")
    return schema


class SchemaConstraint:
    """Holds the final channel's message text to a JSON schema; free everywhere else.

    tokenizer: the model's `ossscope.tokenizer.Tokenizer` (model ids <-> o200k). vocab_size: the model's
    logits width V (may exceed the tokenizer's ids: the padding ids are never allowed while constrained).
    Raises ValueError naming the problem when llguidance cannot compile the schema.
    """

    def __init__(self, schema: dict[str, Any], tokenizer: Any, vocab_size: int):
        from llguidance import LLMatcher

        self.schema = schema
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self._grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        problem = LLMatcher.validate_grammar(self._grammar, o200k_lltokenizer())
        if problem and not problem.startswith("WARNING"):
            raise ValueError(f"the response format's schema cannot be enforced: {problem}")
        # model id -> o200k id, for gathering the o200k mask onto the model's ids (-1: no o200k id)
        o200k = tokenizer.o200k_ids if tokenizer.is_compact else list(range(tokenizer.vocab_size))
        ids = np.full(self.vocab_size, -1, dtype=np.int64)
        ids[: min(len(o200k), self.vocab_size)] = np.asarray(o200k[: self.vocab_size], dtype=np.int64)
        if tokenizer.is_compact and tokenizer.unknown_id is not None:
            ids[tokenizer.unknown_id] = -1  # "outside the vocabulary" stands for no text the grammar can check
        self._o200k_of_model = ids
        self.reset()

    def reset(self) -> None:
        """Forget the generation (a new one starts)."""
        from llguidance import LLMatcher

        self._matcher = LLMatcher(o200k_lltokenizer(), self._grammar, log_level=0)
        self._parser = HarmonyStreamParser(role="assistant")
        self._seen = 0  # generated tokens fed to the parser (and, inside the final message, the matcher)
        self._gave_up = False
        self.constrained: list[bool] = []  # per generated token: was its step masked
        self.changed_top: list[bool] = []  # per generated token: did the mask change the argmax
        self.problems: list[str] = []

    def _in_final_text(self) -> bool:
        return self._parser._state == "content" and self._parser.current_channel == "final"

    def _advance(self, generated: Sequence[int]) -> None:
        """Feed the tokens generated since the last call to the parser, and final-message text to the grammar."""
        for model_id in generated[self._seen :]:
            token = self.tokenizer.to_o200k([int(model_id)])[0]
            text = self._in_final_text() and token not in (*_CLOSERS, tk.CALL, tk.START, tk.CHANNEL)
            if text and not self._gave_up and not self._matcher.consume_token(token):
                self._step_aside(f"token {self._seen}: the grammar refused {token}: {self._matcher.get_error()}")
            was_final = self._in_final_text()
            self._parser.feed(token)
            if was_final and not self._in_final_text():  # the final message closed: a later one starts afresh
                self._matcher.reset()
                self._gave_up = False
            self._seen += 1

    def _step_aside(self, why: str) -> None:
        self._gave_up = True
        self.problems.append(why)

    def mask(self, generated: Sequence[int]) -> torch.Tensor | None:
        """Allow-mask [V] bool over model ids for the next token, or None when it is unconstrained.

        generated: the model ids generated so far in this sequence (prompt and tool answers excluded).
        """
        self._advance(generated)
        if not self._in_final_text() or self._gave_up:
            return None
        if self._matcher.is_error():
            self._step_aside(f"token {self._seen}: {self._matcher.get_error()}")
            return None
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed_o200k = np.unpackbits(bits, bitorder="little")[: tk.O200K_VOCAB_SIZE].astype(bool)
        allowed_o200k[tk.START_OF_TEXT :] = False  # control tokens: only the closers, and only when complete
        if self._matcher.is_accepting():
            allowed_o200k[tk.RETURN] = True
        ids = self._o200k_of_model
        allowed = np.where(ids >= 0, allowed_o200k[np.clip(ids, 0, None)], False)
        if not allowed.any():
            self._step_aside(f"token {self._seen}: no token of the model's vocabulary fits the schema here")
            return None
        return torch.from_numpy(allowed)

    def apply(self, logits: torch.Tensor, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mask logits [B, V] before sampling (what `Decoder.run` calls). One conversation is constrained:
        row 0 (chat decodes one sequence). Records whether the step was constrained and whether the mask moved
        the argmax. Returns the logits (a masked copy when constrained)."""
        allow = self.mask(tokens[0])
        changed = False
        if allow is not None:
            before = int(logits[0].argmax())
            logits = logits.clone()
            logits[0].masked_fill_(~allow.to(logits.device), float("-inf"))
            changed = int(logits[0].argmax()) != before
        self.constrained.append(allow is not None)
        self.changed_top.append(changed)
        return logits

    def record(self) -> dict[str, Any]:
        """What to keep in trace.metadata["structured"]: per token constrained / changed_top, and problems."""
        return {
            "enforced": True,
            "schema": self.schema,
            "constrained": list(self.constrained),
            "changed_top": list(self.changed_top),
            "problems": list(self.problems),
        }


def constraint_for(
    response_format: dict[str, Any] | None, tokenizer: Any, vocab_size: int
) -> tuple[SchemaConstraint | None, dict[str, Any] | None]:
    """The constraint chat installs for a response format, and what to record when there is none.

    Enforced unless the format says `"strict": False` (OpenAI's flag for it); without llguidance installed
    the chat runs unenforced with a warning (`pip install ossscope[agent]`).
    Returns (constraint or None, metadata record or None when there is no response format).
    """
    if not response_format:
        return None, None
    if response_format.get("strict", True) is False:
        return None, {"enforced": False, "reason": "strict is False"}
    if not available():
        import warnings

        warnings.warn("llguidance is not installed: the response format is asked for but not enforced "
                      "(pip install 'ossscope[agent]')", stacklevel=3)  # fmt: skip
        return None, {"enforced": False, "reason": "llguidance is not installed"}
    return SchemaConstraint(schema_of(response_format), tokenizer, vocab_size), None
