"""The offline o200k_harmony vocabulary and the compact-vocabulary mapping. Never touches the network."""

from __future__ import annotations

import base64
import json
import os
import random
import struct
from types import SimpleNamespace

import pytest

from ossscope import tokenizer as tk


def test_materialize_builds_a_verified_file(tmp_path):
    folder = tk.materialize_o200k_base(tmp_path / "cache")
    path = folder / tk.O200K_BASE_FILE
    assert tk.sha256_of(path) == tk.O200K_BASE_SHA256
    lines = path.read_bytes().splitlines()
    assert len(lines) == 199_998
    # Spot-check ranks against the harmony encoding itself (an independent reader of the same vocabulary).
    enc = tk.harmony_encoding()
    for rank in random.Random(0).sample(range(199_998), 20):
        token_b64, rank_text = lines[rank].split(b" ")
        assert int(rank_text) == rank
        assert base64.b64decode(token_b64) == bytes(enc._inner.decode_bytes([rank]))


def test_corrupt_cached_file_is_rebuilt(tmp_path):
    folder = tk.materialize_o200k_base(tmp_path)
    path = folder / tk.O200K_BASE_FILE
    damaged = bytearray(path.read_bytes())
    damaged[1000] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match="corrupt"):
        tk.materialize_o200k_base(tmp_path)
    assert tk.sha256_of(path) == tk.O200K_BASE_SHA256


def test_wrong_source_is_reported_clearly(tmp_path):
    # A well-formed quicktok file with the wrong content must not be accepted (hash check), nor a missing one.
    fake = tmp_path / "fake.vocab"
    fake.write_bytes(struct.pack("<I", 1) + struct.pack("<H", 1) + b"a" + struct.pack("<I", 0))
    with pytest.raises(RuntimeError, match="SHA-256"):
        tk.materialize_o200k_base(tmp_path / "out", vocab_path=fake)
    assert not (tmp_path / "out" / tk.O200K_BASE_FILE).exists()
    with pytest.raises(RuntimeError, match="quicktok"):
        tk.materialize_o200k_base(tmp_path / "out2", vocab_path=tmp_path / "missing.vocab")


def test_quicktok_conversion_format(tmp_path):
    entries = [(b"\xff\x00", 2), (b"hi", 0), (b" x", 1)]
    raw = struct.pack("<I", len(entries))
    for token, rank in entries:
        raw += struct.pack("<H", len(token)) + token + struct.pack("<I", rank)
    path = tmp_path / "v.vocab"
    path.write_bytes(raw)
    text = tk.tiktoken_bytes_from_quicktok(path)
    assert text == b"aGk= 0\nIHg= 1\n/wA= 2\n"
    path.write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="trailing"):
        tk.tiktoken_bytes_from_quicktok(path)


def test_ensure_uses_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(tk.CACHE_DIR_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="no valid"):
        folder = tk.ensure_tiktoken_base()
    assert folder == tmp_path / "mine"
    assert tk.sha256_of(folder / tk.O200K_BASE_FILE) == tk.O200K_BASE_SHA256
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(folder)


def test_full_vocabulary_round_trip():
    tok = tk.Tokenizer.o200k()
    text = "Hello, wörld! 2+2=4 ✓ <|start|>"
    ids = tok.encode(text, allow_special=True)
    assert tk.START in ids
    assert tok.decode(ids) == text
    plain = tok.encode(text)  # the default: special-token text is ordinary characters
    assert not any(tok.is_special_o200k(i) for i in plain) and tok.decode(plain) == text
    with pytest.raises(TypeError, match="allow_special"):
        tok.encode(text, "all")
    assert "".join(tok.token_texts(tok.encode("plain ascii text"))) == "plain ascii text"
    assert tok.stop_ids == [tk.RETURN, tk.CALL]
    assert tok.vocab_size == 201_088
    assert tok.decode([tk.CHANNEL]) == "<|channel|>"


def test_compact_vocabulary_maps_both_ways(tmp_path):
    full = tk.Tokenizer.o200k()
    text = "the cat sat on the mat"
    kept = sorted(set(full.encode(text)))
    o200k_ids = [tk.START, tk.END, tk.RETURN, tk.CALL, tk.CHANNEL, tk.MESSAGE, 30] + kept
    unknown = 6  # model id 6 stands for o200k id 30 and for everything outside the map
    path = tmp_path / "vocab_map.json"
    path.write_text(json.dumps({"o200k_ids": o200k_ids, "unknown_id": unknown}))
    tok = tk.Tokenizer.from_vocab_map(tmp_path)
    assert tok.vocab_size == len(o200k_ids)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.to_o200k(ids) == full.encode(text)
    assert tok.decode(ids) == text
    assert tok.stop_ids == [2, 3]
    # Tokens outside the map become the unknown id, never an error.
    outside = tok.encode(" zebra")
    assert outside and set(outside) == {unknown}
    assert tok.to_o200k([10_000, -1]) == [30, 30]


def test_tokenizer_for_model_reads_vocab_map():
    fake = SimpleNamespace(vocab_map={"o200k_ids": [tk.START, tk.RETURN, 1000], "unknown_id": 2})
    tok = tk.Tokenizer.for_model(fake)
    assert tok.to_model([tk.RETURN, tk.CALL]) == [1, 2]
    assert tk.Tokenizer.for_model(SimpleNamespace(vocab_map=[tk.START, 5], unknown_id=1)).to_model([7]) == [1]
    assert not tk.Tokenizer.for_model(SimpleNamespace(vocab_map=None)).is_compact
    with pytest.raises(ValueError, match="unknown_id"):
        tk.Tokenizer([1, 2, 3])
    with pytest.raises(ValueError, match="twice"):
        tk.Tokenizer([1, 1], unknown_id=0)
