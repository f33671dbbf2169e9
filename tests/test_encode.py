"""Bounded, chunked encoding: the same ids as harmony's encoder wherever the cut is natural, no panic and no
quadratic time on a megabyte without spaces, clear errors, special tokens never split."""

from __future__ import annotations

import base64
import random
import time

import pytest

from ossscope import encode, harmony
from ossscope import tokenizer as tk

MEGABYTE_BLOB = base64.b64encode(bytes(750_000)).decode()  # 1,000,000 x "A": made harmony's encoder panic


def enc():
    return tk.harmony_encoding()


def _random_text(rng: random.Random, n: int) -> str:
    """Mixed-script text with the characters the pre-tokenizer treats differently."""
    alphabet = (list("abcXYZ019") + list("'\".,!?-_/<>|=") + [" ", "  ", "\t", "\n", "\r\n", "\n\n"]
                + list("éÉßü") + ["e\u0301", "\u0301"] + list("中文字，。") + list("²½Ⅷ")
                + ["'s", "'LL", "<|start|>", "<|end|>", "\U0001f600", "\x00", "\u00a0"])
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_natural_cuts_give_exactly_the_ids_of_the_whole_text():
    rng = random.Random(0)
    exact_texts = 0
    for _ in range(1000):
        text = _random_text(rng, rng.randint(1, 60))
        pieces = list(encode.chunks(text, size=10))
        assert "".join(p for p, _ in pieces) == text and all(len(p) <= 10 for p, _ in pieces)
        if not all(exact for _, exact in pieces):
            continue
        exact_texts += 1
        joined = [i for piece, _ in pieces for i in enc().encode(piece, allowed_special=set(), disallowed_special=())]
        assert joined == enc().encode(text, allowed_special=set(), disallowed_special=()), repr(text)
    assert exact_texts > 400  # most texts had natural cuts only: the comparison above is not vacuous


def test_long_ordinary_text_encodes_as_harmony_does():
    rng = random.Random(1)
    words = ["the", "model", "wrote", "x=42;", "naïve", "中文", "it's", "https://example.com/a/b?c=1", "\n", "  "]
    text = " ".join(rng.choice(words) for _ in range(4000))
    text += base64.b64encode(rng.randbytes(3000)).decode()  # letters and digits alternate: cuts are natural
    assert len(text) > 5 * encode.CHUNK_CHARS
    assert encode.encode_text(enc(), text) == enc().encode(text, allowed_special=set(), disallowed_special=())


@pytest.mark.parametrize("text", [MEGABYTE_BLOB, " " * 1_000_000, "!" * 1_000_000], ids=["AAAA", "spaces", "!!!!"])
def test_a_megabyte_without_natural_cuts_encodes_fast(text):
    started = time.perf_counter()
    ids = encode.encode_text(enc(), text)
    elapsed = time.perf_counter() - started
    assert enc().decode(ids) == text
    assert elapsed < 15  # ~0.7 s here; harmony itself panics on these (and took ~6 s on 100k of them)


def test_special_tokens_only_when_asked_and_never_split():
    text = "<|start|>assistant<|channel|>final" * 200  # 6,800 characters, no space: forced and natural cuts
    ids = encode.encode_text(enc(), text, allow_special=True)
    assert ids.count(tk.START) == 200 and ids.count(tk.CHANNEL) == 200
    assert ids == enc().encode(text, allowed_special="all")
    plain = encode.encode_text(enc(), text)
    assert not any(i >= tk.START_OF_TEXT for i in plain) and enc().decode(plain) == text


def test_too_long_text_and_encoder_failures_are_clear_errors(monkeypatch):
    monkeypatch.setattr(encode, "MAX_TEXT_CHARS", 100)
    with pytest.raises(encode.EncodeError, match="101 characters, more than the encoder's limit of 100"):
        encode.encode_text(enc(), "x" * 101)
    with pytest.raises(tk.EncodeError, match="message 0 \\(user\\) has 2,000 characters"):
        harmony.render_prompt("y" * 2000)
    with pytest.raises(encode.EncodeError, match="can only encode text"):
        encode.encode_text(enc(), b"bytes")

    class PanicException(BaseException):  # what pyo3 raises when the Rust side panics
        pass

    class Panicking:
        special_tokens_set: set[str] = set()

        def encode(self, *args, **kwargs):
            raise PanicException("called `Result::unwrap()` on an `Err` value: RuntimeError(StackOverflow)")

    with pytest.raises(encode.EncodeError, match="encoder failed.*PanicException.*StackOverflow"):
        encode.encode_text(Panicking(), "hello")


def test_rendering_a_megabyte_message_or_tool_answer():
    tokens = harmony.render_prompt([{"role": "user", "content": MEGABYTE_BLOB}], developer="Be brief.")
    text = enc().decode(tokens)
    assert f"<|start|>user<|message|>{MEGABYTE_BLOB}<|end|><|start|>assistant" in text
    assert "Be brief." in text
    answer = harmony.render_tool_result("get_weather", MEGABYTE_BLOB)
    assert enc().decode(answer) == (f"<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
                                    f"{MEGABYTE_BLOB}<|end|><|start|>assistant")


def test_long_messages_render_as_harmony_renders_them(monkeypatch):
    def lookup(city: str) -> str:
        """Look a city up."""
        return city

    prose = "Some ordinary words, numbers like 3.14 and 2,718, and a URL https://x.org/a?b=1. " * 60
    messages = [{"role": "system", "content": prose}, {"role": "user", "content": prose},
                {"role": "assistant", "channel": "final", "content": prose[::-1]},
                {"role": "tool", "name": "lookup", "content": prose}, {"role": "user", "content": "and?"}]
    options = {"developer": prose, "tools": [lookup], "response_format": {"name": "r", "schema": {"type": "object"}}}
    ours = harmony.render_prompt(messages, **options)
    monkeypatch.setattr(encode, "CHUNK_CHARS", 10**9)  # harmony renders and encodes every text whole
    assert ours == harmony.render_prompt(messages, **options)


def test_a_panic_inside_harmony_messages_is_an_encode_error():
    from openai_harmony import Message, Role

    message = Message.from_role_and_content(Role.USER, "A" * 1_000_000)  # a harmony Message: rendered as given
    with pytest.raises(encode.EncodeError, match="failed to render.*PanicException"):
        harmony.render_prompt([message])
