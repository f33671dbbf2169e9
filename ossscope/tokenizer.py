"""The o200k_harmony tokenizer, offline, and the mapping to compact model vocabularies.

openai-harmony reads `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` and checks its SHA-256; without that file it
downloads it, which fails on a machine with no network. The `quicktok-v1` package ships the same vocabulary in
a binary form, so when the file is not already available we rebuild it from there into a user cache folder,
check the hash, and point harmony at it. With a network and no quicktok, harmony's own download still works.

Real gpt-oss checkpoints use o200k_harmony ids directly. A checkpoint with a compact vocabulary (the nano
model) ships `vocab_map.json` = `{"o200k_ids": [...], "unknown_id": n}`: model id i stands for o200k id
`o200k_ids[i]`, and any o200k id outside the map becomes model id `unknown_id`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import struct
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ossscope.encode import EncodeError as EncodeError  # re-exported: what encode() raises
from ossscope.encode import encode_text

O200K_BASE_FILE = "o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
CACHE_DIR_ENV = "OSSSCOPE_TIKTOKEN_DIR"  # overrides where the rebuilt vocabulary is cached
O200K_VOCAB_SIZE = 201_088  # o200k_harmony: 199,998 ranks + specials and reserved ids up to 201,087

# Harmony special tokens (o200k_harmony ids).
START_OF_TEXT = 199998
END_OF_TEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
HARMONY_STOP_TOKENS = (RETURN, CALL)  # an assistant turn ends with one of these


# -- the vocabulary file ---------------------------------------------------------------------------------


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where the rebuilt vocabulary lives: $OSSSCOPE_TIKTOKEN_DIR, else ~/.cache/ossscope/tiktoken."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ossscope" / "tiktoken"


def quicktok_vocab_path() -> Path | None:
    """The o200k vocabulary shipped by the `quicktok-v1` package, or None when it is not installed."""
    try:
        import quicktok
    except ImportError:
        return None
    path = Path(quicktok.__file__).parent / "data" / "o200k.vocab"
    return path if path.is_file() else None


def tiktoken_bytes_from_quicktok(vocab_path: str | Path) -> bytes:
    """Convert quicktok's o200k.vocab to the text of o200k_base.tiktoken.

    quicktok's format: a little-endian u32 count, then per entry (u16 byte length, the bytes, u32 rank).
    tiktoken's format: one line per rank, sorted by rank: `base64(bytes) rank`.
    """
    data = Path(vocab_path).read_bytes()
    if len(data) < 4:
        raise ValueError(f"{vocab_path} is too short to be a quicktok vocabulary")
    (count,) = struct.unpack_from("<I", data, 0)
    offset, entries = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 2 + length + 4
        entries.append((rank, token))
    if offset != len(data):
        raise ValueError(f"{vocab_path}: {len(data) - offset} trailing bytes after {count} entries")
    entries.sort()
    return b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n" for rank, token in entries)


def materialize_o200k_base(cache_dir: str | Path | None = None, vocab_path: str | Path | None = None) -> Path:
    """Make sure `cache_dir/o200k_base.tiktoken` exists with the right SHA-256; return the folder.

    A file already there with the right hash is reused; a missing or corrupt one (wrong hash) is rebuilt from
    quicktok's vocabulary and written atomically. Raises RuntimeError when it cannot be built or does not
    check out.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / O200K_BASE_FILE
    if target.is_file():
        if sha256_of(target) == O200K_BASE_SHA256:
            return cache_dir
        warnings.warn(f"{target} is corrupt (SHA-256 mismatch); rebuilding it", stacklevel=2)
    source = Path(vocab_path) if vocab_path is not None else quicktok_vocab_path()
    if source is None or not source.is_file():
        raise RuntimeError(
            "cannot build o200k_base.tiktoken offline: the quicktok-v1 package (quicktok/data/o200k.vocab) "
            "is not installed; `pip install quicktok-v1`, or put a verified o200k_base.tiktoken in "
            f"{cache_dir} or in $TIKTOKEN_ENCODINGS_BASE"
        )
    text = tiktoken_bytes_from_quicktok(source)
    if hashlib.sha256(text).hexdigest() != O200K_BASE_SHA256:
        raise RuntimeError(
            f"the vocabulary rebuilt from {source} does not have the SHA-256 harmony expects "
            f"({O200K_BASE_SHA256}); is the quicktok-v1 package damaged or a different version?"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".o200k_base.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return cache_dir


def ensure_tiktoken_base() -> Path | None:
    """Point `$TIKTOKEN_ENCODINGS_BASE` at a folder holding a verified o200k_base.tiktoken.

    Order: the folder already named by $TIKTOKEN_ENCODINGS_BASE if its file checks out; else our cache folder
    (built from quicktok when needed); else a per-user temporary folder when the cache folder is not writable.
    Returns the folder, or None when nothing could be built offline (harmony will then try its download).
    """
    preset = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if preset:
        candidate = Path(preset) / O200K_BASE_FILE
        if candidate.is_file() and sha256_of(candidate) == O200K_BASE_SHA256:
            return Path(preset)
    errors = []
    for folder in (default_cache_dir(), Path(tempfile.gettempdir()) / f"ossscope-tiktoken-{os.getuid()}"):
        try:
            found = materialize_o200k_base(folder)
        except (OSError, RuntimeError) as exc:
            errors.append(f"{folder}: {exc}")
            continue
        if preset:
            warnings.warn(
                f"$TIKTOKEN_ENCODINGS_BASE={preset} has no valid {O200K_BASE_FILE}; using {found} instead",
                stacklevel=2,
            )
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(found)
        return found
    warnings.warn("could not build o200k_base.tiktoken offline (" + "; ".join(errors) + ")", stacklevel=2)
    return None


@functools.lru_cache(maxsize=1)
def harmony_encoding() -> Any:
    """The openai-harmony encoding for gpt-oss (o200k_harmony), loaded offline when possible."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    folder = ensure_tiktoken_base()
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # harmony raises its own HarmonyError (download or hash failures)
        where = f"the verified file in {folder}" if folder else "no local o200k_base.tiktoken"
        raise RuntimeError(f"openai-harmony could not load o200k_harmony ({where}): {exc}") from exc


# -- the tokenizer -----------------------------------------------------------------------------------------


def load_vocab_map(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint's vocab_map.json: {"o200k_ids": [...], "unknown_id": n}."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "o200k_ids" not in data:
        raise ValueError(f"{path}: expected a JSON object with 'o200k_ids' (and 'unknown_id')")
    return data


class Tokenizer:
    """o200k_harmony text <-> model ids, through a compact vocabulary map when the model has one.

    `encode`/`decode` speak model ids; `to_o200k`/`to_model` convert between model ids and o200k_harmony ids
    (what openai-harmony renders and parses). Without a map the two are the same.
    """

    def __init__(self, o200k_ids: Sequence[int] | None = None, unknown_id: int | None = None):
        self.encoding = harmony_encoding()
        self.o200k_ids: list[int] | None = None if o200k_ids is None else [int(i) for i in o200k_ids]
        self._to_model: dict[int, int] = {}
        self.unknown_id: int | None = None
        if self.o200k_ids is not None:
            if len(set(self.o200k_ids)) != len(self.o200k_ids):
                raise ValueError("vocab map lists the same o200k id twice")
            bad = [i for i in self.o200k_ids if not 0 <= i < O200K_VOCAB_SIZE]
            if bad:
                raise ValueError(f"vocab map holds ids outside o200k_harmony: {bad[:5]}")
            self._to_model = {o: m for m, o in enumerate(self.o200k_ids)}
            if unknown_id is None:
                raise ValueError("a compact vocabulary needs an unknown_id for o200k ids outside its map")
            if not 0 <= unknown_id < len(self.o200k_ids):
                raise ValueError(f"unknown_id {unknown_id} is outside the map of {len(self.o200k_ids)} ids")
            self.unknown_id = int(unknown_id)

    @classmethod
    def for_model(cls, model: Any) -> Tokenizer:
        """The tokenizer of a loaded model, from `model.vocab_map` (None, a list, or the vocab_map.json dict).

        With a plain list the unknown id comes from `model.unknown_id`.
        """
        vocab_map = getattr(model, "vocab_map", None)
        if vocab_map is None:
            return cls.o200k()
        if isinstance(vocab_map, dict):
            return cls(vocab_map["o200k_ids"], vocab_map.get("unknown_id"))
        return cls(list(vocab_map), getattr(model, "unknown_id", None))

    @classmethod
    def from_vocab_map(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint folder's vocab_map.json (or the file itself)."""
        path = Path(path)
        data = load_vocab_map(path / "vocab_map.json" if path.is_dir() else path)
        return cls(data["o200k_ids"], data.get("unknown_id"))

    @classmethod
    def o200k(cls) -> Tokenizer:
        """The full o200k_harmony vocabulary (real gpt-oss checkpoints): model ids are o200k ids."""
        return _full_tokenizer()

    # -- sizes and ids ------------------------------------------------------------------------------------
    @property
    def is_compact(self) -> bool:
        return self.o200k_ids is not None

    @property
    def vocab_size(self) -> int:
        """Number of model ids."""
        return O200K_VOCAB_SIZE if self.o200k_ids is None else len(self.o200k_ids)

    def to_model(self, o200k_ids: Iterable[int]) -> list[int]:
        """o200k_harmony ids -> model ids (ids outside a compact map become `unknown_id`)."""
        if self.o200k_ids is None:
            return [int(i) for i in o200k_ids]
        return [self._to_model.get(int(i), self.unknown_id) for i in o200k_ids]  # type: ignore[misc]

    def to_o200k(self, model_ids: Iterable[int]) -> list[int]:
        """Model ids -> o200k_harmony ids. Ids outside the model vocabulary read as the unknown id's token."""
        if self.o200k_ids is None:
            return [int(i) if 0 <= int(i) < O200K_VOCAB_SIZE else END_OF_TEXT for i in model_ids]
        fallback = self.o200k_ids[self.unknown_id]  # type: ignore[index]
        n = len(self.o200k_ids)
        return [self.o200k_ids[int(i)] if 0 <= int(i) < n else fallback for i in model_ids]

    def in_vocab(self, o200k_id: int) -> bool:
        """Whether an o200k id has its own model id (always true without a compact map)."""
        return self.o200k_ids is None or int(o200k_id) in self._to_model

    def model_id(self, o200k_id: int) -> int | None:
        """The model id of one o200k id, or None when a compact vocabulary lacks it."""
        if self.o200k_ids is None:
            return int(o200k_id)
        return self._to_model.get(int(o200k_id))

    @property
    def stop_ids(self) -> list[int]:
        """Harmony's assistant stop tokens (<|return|>, <|call|>) as model ids, those the vocabulary has."""
        return [m for m in (self.model_id(t) for t in HARMONY_STOP_TOKENS) if m is not None]

    # -- text -------------------------------------------------------------------------------------------
    def encode_o200k(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> o200k_harmony ids, as plain text: `<|start|>` in the text is ordinary characters.

        allow_special=True reads special-token text (`<|start|>`, `<|channel|>`...) as the special tokens,
        for harmony you write by hand. Encoding is bounded and chunked (ossscope.encode): raises EncodeError
        for text over MAX_TEXT_CHARS characters or when harmony's encoder fails.
        """
        if not isinstance(allow_special, bool):
            raise TypeError(f"allow_special must be True or False, got {allow_special!r}")
        return encode_text(self.encoding, text, allow_special)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> model ids (plain text unless allow_special=True; see `encode_o200k`)."""
        return self.to_model(self.encode_o200k(text, allow_special))

    def decode(self, model_ids: Iterable[int]) -> str:
        """Model ids -> text (bytes that are not valid UTF-8 become U+FFFD)."""
        return self.decode_o200k(self.to_o200k(model_ids))

    def decode_o200k(self, o200k_ids: Iterable[int]) -> str:
        """o200k_harmony ids -> text."""
        return self.encoding.decode([int(i) for i in o200k_ids])

    def token_texts(self, model_ids: Iterable[int]) -> list[str]:
        """The text of each model id on its own (a token holding part of a UTF-8 character shows U+FFFD)."""
        return [self.encoding.decode([i]) for i in self.to_o200k(model_ids)]

    def token_texts_o200k(self, o200k_ids: Iterable[int]) -> list[str]:
        """The text of each o200k id on its own."""
        return [self.encoding.decode([int(i)]) for i in o200k_ids]

    def is_special_o200k(self, o200k_id: int) -> bool:
        """Whether an o200k id is a special token (<|start|>, <|channel|>, reserved ids...)."""
        return int(o200k_id) >= START_OF_TEXT

    def __repr__(self) -> str:
        kind = f"compact, {self.vocab_size} ids" if self.is_compact else f"{self.vocab_size} ids"
        return f"Tokenizer(o200k_harmony, {kind})"


@functools.lru_cache(maxsize=1)
def _full_tokenizer() -> Tokenizer:
    return Tokenizer()
