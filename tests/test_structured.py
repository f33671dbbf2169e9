"""Structured Outputs: the final channel held to a JSON schema by llguidance, the analysis channel and control
tokens free, the per-token record of where the grammar changed the model's choice, compact vocabularies."""

from __future__ import annotations

import json

import pytest
import torch
from test_chat import ScriptedModel

import ossscope
from ossscope import harmony
from ossscope import tokenizer as tk
from ossscope.chat import chat
from ossscope.config import PRESETS

pytest.importorskip("llguidance")
from ossscope import structured  # noqa: E402 - after the skip: it needs llguidance

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "unit": {"enum": ["km", "miles"]}},
    "required": ["ok", "unit"],
    "additionalProperties": False,
}
FORMAT = {"name": "reply", "schema": SCHEMA}
HEADER = "<|channel|>analysis<|message|>Think first.<|end|><|start|>assistant<|channel|>final<|message|>"


@pytest.fixture(scope="module")
def model():
    return ossscope.random_model(PRESETS["tiny"].replace(vocab_size=201_088), seed=2, device="cpu")


class PrefixModel(ScriptedModel):
    """Forced through `script`, then the wrapped random model's own logits (noise the grammar must tame)."""

    def __call__(self, input_ids, cache=None):
        if self.position >= len(self.script) - 1:
            logits = self._inner(input_ids, cache=cache)
            if self.forced is not None and input_ids.shape[1] == 1 and int(input_ids[0, 0]) == self.forced:
                self.position += 1
            return logits
        return super().__call__(input_ids, cache=cache)


def test_prose_final_answer_is_forced_into_the_schema(model):
    script = HEADER + "The unit is km and yes.<|return|>"
    trace = chat(ScriptedModel(model, script), "Units?", response_format=FORMAT, temperature=0.0, max_new_tokens=60)
    answer = json.loads(trace.final)
    assert harmony.check_arguments(SCHEMA, answer) == []
    assert trace.analysis == "Think first." and trace.metadata["stop_reason"] == "return"
    record = trace.metadata["structured"]
    T = len(trace.tokens)
    assert len(record["constrained"]) == T == len(record["changed_top"]) and record["problems"] == []
    final_start = next(i for i, c in enumerate(trace.channels) if c == "final")
    # Free until the final message's text starts; from there every step is masked, and the model's prose
    # choice ("The") was overruled at the first one.
    assert not any(record["constrained"][:final_start])
    assert all(record["constrained"][final_start:])
    assert record["changed_top"][final_start] and not any(record["changed_top"][:final_start])
    assert trace.tokens[-1] == tk.RETURN  # allowed only once the JSON was complete


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_noise_still_gives_schema_valid_json(model, seed):
    wrapped = PrefixModel(model, HEADER)
    trace = chat(wrapped, "Units?", response_format=FORMAT, temperature=1.0, seed=seed, max_new_tokens=40)
    assert trace.metadata["stop_reason"] == "return", trace.final
    assert harmony.check_arguments(SCHEMA, json.loads(trace.final)) == []


def test_unenforced_when_strict_is_false(model):
    script = HEADER + "Prose.<|return|>"
    loose = dict(FORMAT, strict=False)
    trace = chat(ScriptedModel(model, script), "Units?", response_format=loose, temperature=0.0, max_new_tokens=20)
    assert trace.final == "Prose." and trace.metadata["structured"] == {"enforced": False, "reason": "strict is False"}
    plain = chat(ScriptedModel(model, script), "Units?", temperature=0.0, max_new_tokens=20)
    assert plain.metadata["structured"] is None


def test_mask_over_a_compact_vocabulary():
    # A nano-like vocabulary: a few hundred o200k ids; the mask speaks model ids and never allows the unknown id.
    enc = tk.harmony_encoding()
    words = enc.encode(HEADER + '{"ok": true, "unit": "km"} prose words', allowed_special="all")
    o200k_ids = sorted(set(words) | {tk.RETURN, tk.END, tk.CALL, tk.START, 200004})
    tokenizer = tk.Tokenizer(o200k_ids, unknown_id=o200k_ids.index(200004))
    constraint = structured.SchemaConstraint(SCHEMA, tokenizer, vocab_size=len(o200k_ids) + 3)
    header = tokenizer.encode(HEADER, allow_special=True)
    assert constraint.mask(header[:3]) is None  # inside the analysis message: free
    allow = constraint.mask(header)
    assert allow.shape == (len(o200k_ids) + 3,) and allow.dtype == torch.bool
    allowed_text = [tokenizer.decode([i]) for i in allow.nonzero().flatten().tolist()]
    assert allowed_text and all(text.startswith("{") for text in allowed_text)
    assert not allow[tokenizer.unknown_id] and not allow[-3:].any()
    body = tokenizer.encode('{"ok": true, "unit": "km"}')
    done = constraint.mask(header + body)
    assert {tokenizer.to_o200k([i])[0] for i in done.nonzero().flatten().tolist()} == {tk.RETURN}


def test_bad_schema_is_a_clear_error(model):
    with pytest.raises(ValueError, match="cannot be enforced"):
        structured.SchemaConstraint({"type": "object", "properties": {"a": {"type": "nonsense"}}},
                                    model.tokenizer, model.config.vocab_size)  # fmt: skip
    with pytest.raises(ValueError, match="must be a dict holding a JSON schema"):
        structured.schema_of({"name": "x", "schema": 3})
