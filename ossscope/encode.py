"""Text -> o200k_harmony ids, bounded and in chunks, so no text can crash or stall harmony's encoder.

harmony's encoder (tiktoken's BPE in Rust) splits text into regex pieces and merges each piece's bytes. Both
steps break on one very long piece (a run without spaces, letter/digit changes or punctuation: 1 MB of "AAAA",
of "!" or of spaces): the regex overflows its stack and pyo3 raises `PanicException`, a BaseException that
`except Exception` does not catch, and the merge is quadratic (100k "X" take ~4 s). So we never hand it more
than `CHUNK_CHARS` characters at once:

- The text is cut where harmony's own regex would end a piece anyway (`natural_cut`): before a space, a
  punctuation mark or a symbol that follows a letter or digit (not before "'", which starts contractions like
  "'s"), between letters and digits, and after a line break before a letter or digit. There the ids of the
  chunks, joined, are exactly the ids of the whole text (tests compare the two on mixed-script text).
- A run of more than `CHUNK_CHARS` characters with no such place is cut every `CHUNK_CHARS` characters
  (never inside a special token's text): only such runs can encode differently from an unbounded encoder.
- Texts longer than `MAX_TEXT_CHARS` are refused with an EncodeError, as is any failure of the encoder
  itself, panics included.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from typing import Any

MAX_TEXT_CHARS = 4_000_000  # refused beyond this: ~30 times gpt-oss's 131,072-token context at 1 char a token
CHUNK_CHARS = 1024  # longest text handed to harmony at once (a 1,024-char piece merges in ~0.4 ms)
_MAX_SPECIAL_CHARS = 32  # longer than any harmony special token's text (<|reserved_200017|> has 19)


class EncodeError(ValueError):
    """Text that cannot be encoded (too long, or the encoder failed); the message says which and why."""


def _letter_or_number(category: str) -> bool:
    return category[0] in "LN"


def natural_cut(before: str, after: str) -> bool:
    """Whether harmony's pre-tokenizer always ends a piece between the characters `before` and `after`.

    The o200k pattern's pieces are letter runs (with one leading non-letter and a trailing contraction),
    digit groups, punctuation runs (with trailing line breaks or '/') and whitespace runs. A letter or digit
    followed by something that none of its pieces can continue with ends the piece, and the next one starts
    right there; so does a line break followed by a letter or digit.
    """
    b, a = unicodedata.category(before), unicodedata.category(after)
    if _letter_or_number(b):
        if a[0] == "M" or after == "'":  # marks continue letters; "'" may start a contraction ('s, 'll)
            return False
        return a[0] != b[0]  # letter -> digit, digit -> letter, either -> punctuation/symbol/space/control
    return before in "\r\n" and _letter_or_number(a)


def _inside_special(text: str, i: int, specials: frozenset[str]) -> int | None:
    """Start of the special token whose text spans position i (a cut at i would split it), else None."""
    j = text.rfind("<|", max(0, i - _MAX_SPECIAL_CHARS), i)
    if j < 0:
        return None
    k = text.find("|>", j + 2, j + _MAX_SPECIAL_CHARS)
    if k < 0 or k + 2 <= i or text[j : k + 2] not in specials:
        return None
    return j


def chunks(text: str, size: int = CHUNK_CHARS, specials: frozenset[str] = frozenset()) -> Iterator[tuple[str, bool]]:
    """Split text into (chunk, exact) pairs of at most `size` characters (a special token may add a few).

    `exact` is False for a chunk that ends at a forced cut (no natural cut in `size` characters): the ids
    there may differ from those of the whole text. `specials` are special tokens' texts that must not be cut.
    """
    if size < 2:
        raise ValueError(f"chunk size must be at least 2 characters, got {size}")
    start, n = 0, len(text)
    while n - start > size:
        end = start + size
        cut = None
        for i in range(end, start, -1):  # the last natural cut in (start, end]
            before, after = text[i - 1], text[i]
            if before == after:  # never a cut; the common case in a pathological run ("AAAA...")
                continue
            if natural_cut(before, after) and (not specials or _inside_special(text, i, specials) is None):
                cut = i
                break
        exact = cut is not None
        if cut is None:
            cut = end
            if specials and (j := _inside_special(text, cut, specials)) is not None:
                cut = j if j > start else text.index("|>", j) + 2
        yield text[start:cut], exact
        start = cut
    yield text[start:], True


def encode_text(encoding: Any, text: str, allow_special: bool = False) -> list[int]:
    """Text -> o200k_harmony ids with harmony's `encoding`, in bounded chunks (see the module docstring).

    allow_special False (plain text): `<|start|>` and the like are ordinary characters. True: special-token
    text becomes the special token. Raises EncodeError for text over MAX_TEXT_CHARS or an encoder failure.
    """
    if not isinstance(text, str):
        raise EncodeError(f"can only encode text (str), got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise EncodeError(f"the text has {len(text):,} characters, more than the encoder's limit of "
                          f"{MAX_TEXT_CHARS:,} (ossscope.encode.MAX_TEXT_CHARS)")
    specials = frozenset(encoding.special_tokens_set) if allow_special else frozenset()
    # disallowed_special=() skips harmony's per-call scan for special text (~1 ms); in plain mode we want that
    # text as ordinary characters anyway, and in special mode every special token is allowed.
    allowed: Any = specials if allow_special else set()
    ids: list[int] = []
    try:
        for chunk, _ in chunks(text, CHUNK_CHARS, specials):
            ids += encoding.encode(chunk, allowed_special=allowed, disallowed_special=())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise EncodeError(f"harmony's encoder failed on a text of {len(text):,} characters: "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    return ids
