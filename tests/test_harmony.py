"""Rendering harmony prompts, tools from Python functions, and the tolerant parser (against openai-harmony's)."""

from __future__ import annotations

import enum
import json
import random
from typing import Annotated, Literal, TypedDict

import pytest
from openai_harmony import Role

from ossscope import harmony
from ossscope import tokenizer as tk


def enc():
    return tk.harmony_encoding()


def toks(text: str) -> list[int]:
    return enc().encode(text, allowed_special="all")


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


class Place(TypedDict):
    city: str
    country: str


def get_weather(city: str, unit: Unit = Unit.C, days: int = 1, detail: bool | None = None) -> str:
    """Get the weather forecast for a city.

    Args:
        city: The city's name,
            in English.
        unit (Unit): Temperature unit.
        days: How many days ahead.

    Returns:
        A short forecast.
    """
    return f"{city}: sunny, 21 {unit.value} for {days} day(s)"


def lookup(tags: list[str], mode: Literal["any", "all"], where: Place, note: Annotated[str, "free text"] = "x"):
    """Look things up.

    :param tags: Tags to match.
    :param mode: How tags combine.
    """


def test_function_schema_from_signature_hints_and_docstring():
    tool = harmony.Tool.from_function(get_weather)
    assert tool.name == "get_weather"
    assert tool.description == "Get the weather forecast for a city."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city's name, in English."},
            "unit": {"enum": ["celsius", "fahrenheit"], "type": "string", "description": "Temperature unit.",
                     "default": "celsius"},
            "days": {"type": "integer", "description": "How many days ahead.", "default": 1},
            "detail": {"type": "boolean"},
        },
        "required": ["city"],
    }  # fmt: skip
    schema = harmony.function_schema(lookup)
    assert schema["properties"]["tags"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": "Tags to match.",
    }
    assert schema["properties"]["mode"] == {
        "enum": ["any", "all"],
        "type": "string",
        "description": "How tags combine.",
    }
    assert schema["properties"]["where"]["properties"] == {
        "city": {"type": "string"},
        "country": {"type": "string"},
    }
    assert schema["properties"]["note"] == {"type": "string", "description": "free text", "default": "x"}
    assert schema["required"] == ["tags", "mode", "where"]


def test_check_arguments():
    schema = harmony.function_schema(get_weather)
    assert harmony.check_arguments(schema, {"city": "Paris", "days": 3}) == []
    problems = harmony.check_arguments(schema, {"days": "3", "unit": "kelvin", "colour": 1})
    assert any("missing required argument 'city'" in p for p in problems)
    assert any("'days'" in p and "integer" in p for p in problems)
    assert any("kelvin" in p for p in problems)
    assert any("unknown argument 'colour'" in p for p in problems)
    assert harmony.check_arguments(schema, ["Paris"]) == ["arguments must be a JSON object, got list"]


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_render_prompt_has_effort_and_ends_at_assistant_turn(effort):
    tokens = harmony.render_prompt("What is 2+2?", reasoning=effort)
    text = enc().decode(tokens)
    assert text.startswith("<|start|>system<|message|>")
    assert f"Reasoning: {effort}" in text
    assert "<|start|>user<|message|>What is 2+2?<|end|>" in text
    assert tokens[-2:] == toks("<|start|>assistant")
    with pytest.raises(ValueError, match="reasoning"):
        harmony.render_prompt("hi", reasoning="extreme")


def test_render_prompt_developer_tools_and_response_format():
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    tokens = harmony.render_prompt(
        [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "2+2?"}],
        developer="You are a calculator.",
        tools=[get_weather],
        response_format={"name": "math_answer", "schema": schema},
    )
    text = enc().decode(tokens)
    developer = text.split("<|start|>developer<|message|>")[1].split("<|end|>")[0]
    assert developer.startswith("# Instructions\n\nYou are a calculator.\n\nAnswer tersely.\n\n# Tools")
    assert "type get_weather = (_: {" in developer
    assert "// Get the weather forecast for a city." in developer
    assert developer.endswith('# Response Formats\n\n## math_answer\n\n{"type":"object","properties":{"answer":'
                              '{"type":"integer"}},"required":["answer"]}')  # fmt: skip
    # The developer text re-encodes exactly as one string (no odd token boundary at the splice).
    start = tokens.index(tk.MESSAGE, tokens.index(tk.START, 1)) + 1
    end = tokens.index(tk.END, start)
    assert tokens[start:end] == enc().encode(developer, allowed_special=set())
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text


def test_render_prompt_continues_a_conversation_with_a_tool_result():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "channel": "commentary", "recipient": "functions.get_weather",
         "content_type": "<|constrain|>json", "content": '{"city": "Paris"}'},
        {"role": "tool", "name": "get_weather", "content": "sunny"},
    ]  # fmt: skip
    text = enc().decode(harmony.render_prompt(messages, tools=[get_weather]))
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>" in text
    assert text.endswith("<|start|>assistant")
    assert enc().decode(harmony.render_tool_result("get_weather", "sunny")) == (
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|><|start|>assistant"
    )


WELL_FORMED = [
    "<|channel|>analysis<|message|>User asks 2+2. Easy.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    # The model's own order: recipient after the channel.
    (
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary"
        ' to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
    ),
    # Harmony's rendering order: recipient before the channel.
    ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>',
    "<|channel|>final<|message|>Bonjour — ça va ? ✓<|return|>",
]


@pytest.mark.parametrize("text", WELL_FORMED)
def test_parser_agrees_with_openai_harmony_on_well_formed_output(text):
    tokens = toks(text)
    messages, labels, errors = harmony.parse_completion(tokens)
    reference = enc().parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    assert errors == []
    assert len(messages) == len(reference)
    for ours, ref in zip(messages, reference, strict=True):
        assert ours["role"] == ref.author.role.value
        assert ours["channel"] == ref.channel
        assert ours["recipient"] == ref.recipient
        assert ours["content_type"] == ref.content_type
        assert ours["content"] == ref.content[0].text
        assert ours["complete"]
        s, e = ours["content_range"]
        assert enc().decode(tokens[s:e]) == ours["content"]
        assert all(labels[i] == ours["channel"] for i in range(s, e))
    assert len(labels) == len(tokens)
    assert all(labels[i] == "" for i, t in enumerate(tokens) if t >= tk.START_OF_TEXT)


def test_stream_labels_are_causal():
    tokens = toks(WELL_FORMED[1])
    parser = harmony.HarmonyStreamParser()
    streamed = [parser.feed(t) for t in tokens]
    assert streamed == harmony.parse_completion(tokens)[1]
    assert parser.stop_token == tk.CALL
    assert "analysis" in streamed and "commentary" in streamed


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("<|channel|>analysis<|message|>cut off by the budg", "ended before the message was closed"),
        ("<|channel|>analy", "ended inside a message header"),
        ("plain text with no header", "ended inside a message header"),
        ("<|message|>no channel<|end|>", "names no channel"),
        ("<|channel|>analysis<|message|>a<|end|>stray text<|return|>", "text outside any message"),
        ("<|channel|>analysis<|message|>a<|channel|>final<|message|>b<|return|>", "inside a message"),
        ("<|channel|>analysis<|end|><|channel|>final<|message|>b<|return|>", "inside the message header"),
        ("<|channel|>chitchat<|message|>hi<|end|>", "unknown channel"),
        ("<|channel|>final<|message|>x<|constrain|>y<|end|><|return|><|call|>", "special token"),
    ],
)
def test_parser_tolerates_malformed_output(text, complaint):
    tokens = toks(text)
    _, labels, errors = harmony.parse_completion(tokens)
    assert len(labels) == len(tokens)
    assert any(complaint in e for e in errors), errors


def test_parser_never_raises_on_random_tokens():
    rng = random.Random(0)
    specials = [
        tk.START,
        tk.END,
        tk.MESSAGE,
        tk.CHANNEL,
        tk.CONSTRAIN,
        tk.RETURN,
        tk.CALL,
        tk.END_OF_TEXT,
        200100,
    ]
    for _ in range(50):
        tokens = [rng.choice(specials) if rng.random() < 0.3 else rng.randrange(199_998) for _ in range(60)]
        for role in ("assistant", None):
            messages, labels, _ = harmony.parse_completion(tokens, role=role)
            assert len(labels) == len(tokens)
            assert all(label == "" for t, label in zip(tokens, labels, strict=True) if t >= tk.START_OF_TEXT)
            for m in messages:
                s, e = m["content_range"]
                assert m["token_range"][0] <= s <= e <= m["token_range"][1] <= len(tokens)
            json.dumps(messages)  # plain data, saveable in a Trace
