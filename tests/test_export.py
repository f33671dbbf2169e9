"""The offline HTML export: self-contained (nothing to fetch), text escaped, data intact, fast and small for a
1,000-token gpt-oss-20b-shaped trace."""

from __future__ import annotations

import json
import re
import time

import ossscope.widgets as W
import pytest
import torch
from _widget_fixtures import EVIL, synthetic_trace

from ossscope.trace import Trace


def _embedded(page: str) -> list[dict]:
    match = re.search(r'<script type="application/json" id="ossscope-data">(.*?)</script>', page, re.S)
    assert match, "the data element is missing"
    return json.loads(match.group(1))


def test_export_is_self_contained_and_escapes_model_and_user_text(tmp_path):
    trace = synthetic_trace(T=30, user_text=EVIL, evil_token=True)
    trace.final = EVIL
    trace.parse_errors = [EVIL]
    path = trace.to_html(tmp_path / "t.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Nothing to load: no external scripts, styles, frames or images, and a policy that forbids fetching.
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", page, re.I)
    assert not re.search(r"https?://", page)
    assert "default-src 'none'" in page
    # The evil strings never appear raw: only inside the escaped JSON.
    assert "<img src=x" not in page and "\u2028" not in page and "\u2029" not in page
    assert page.count("</script>") == 3  # the data, the viewer and the mount script: nothing closed early
    payloads = _embedded(page)
    assert payloads == json.loads(json.dumps([W.trace_payload(trace)]))
    assert payloads[0]["conversation"][1]["text"] == EVIL and payloads[0]["tokens"][3] == EVIL


def test_export_several_runs_with_titles(tmp_path):
    traces = [synthetic_trace(T=10, seed=s) for s in range(3)]
    path = W.export_trace_html(traces, tmp_path / "runs.html", titles=["a", "b", "c"], title="three runs")
    page = path.read_text()
    assert [p["title"] for p in _embedded(page)] == ["a", "b", "c"] and "<title>three runs</title>" in page
    with pytest.raises(ValueError, match="2 titles for 3 traces"):
        W.export_trace_html(traces, tmp_path / "x.html", titles=["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        W.export_trace_html([], tmp_path / "x.html")


def test_title_is_escaped(tmp_path):
    path = W.export_trace_html(synthetic_trace(T=5), tmp_path / "t.html", title="</title><script>x()</script>")
    assert "<title>&lt;/title&gt;&lt;script&gt;" in path.read_text()


def test_attention_rows_are_kept_within_the_budget():
    trace = synthetic_trace(T=50, L=2, H=4, P=10)
    S = 60
    pattern = torch.zeros(50, 4, S, dtype=torch.float16)
    pattern[:, :, 0] = 0.5
    trace.captured["attention.L1"] = pattern
    payload = W.trace_payload(trace, attention_budget=20 * 4 * S)
    assert payload["attention"]["1"]["rows"] == list(range(20)) and payload["attention"]["1"]["keys"] == S


def gpt_oss_20b_trace(T: int = 1000, seed: int = 0) -> Trace:
    """A trace of gpt-oss-20b's shape: 24 layers, 4 of 32 experts, 64 heads."""
    trace = synthetic_trace(T=T, L=24, E=32, k=4, H=64, P=120, seed=seed)
    trace.metadata["model"] = "gpt-oss-20b (shape)"
    return trace


def test_a_1000_token_gpt_oss_20b_trace_exports_fast_and_small(tmp_path):
    trace = gpt_oss_20b_trace()
    started = time.perf_counter()
    path = trace.to_html(tmp_path / "20b.html")
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    print(f"\n1,000-token gpt-oss-20b-shaped trace: {seconds:.2f} s, {size / 1e6:.2f} MB")
    assert size < 10e6 and seconds < 5.0


def test_export_writes_atomically(tmp_path, monkeypatch):
    path = synthetic_trace(T=5).to_html(tmp_path / "t.html")
    before = path.read_text(encoding="utf-8")
    # A page that fails half-way through the write (a lone surrogate cannot be UTF-8): the old file stays whole.
    monkeypatch.setattr(W.export, "render_html", lambda payloads, title: "<!DOCTYPE html>" + "x" * 100_000 + "\ud800")
    with pytest.raises(UnicodeEncodeError):
        synthetic_trace(T=6).to_html(path)
    assert path.read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.html"]  # no temporary file left behind
    with pytest.raises(IsADirectoryError, match="is a folder"):
        synthetic_trace(T=5).to_html(tmp_path)


def test_export_into_a_missing_folder_is_refused_and_creates_nothing(tmp_path, monkeypatch):
    # Library callers get what `%oss export` and `demo --out` give: an error naming the folder, no mkdir.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="the folder no/such/dir does not exist"):
        synthetic_trace(T=5).to_html("no/such/dir/x.html")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        W.export_trace_html([synthetic_trace(T=5)], tmp_path / "missing" / "runs.html")
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        synthetic_trace(T=5).to_html(tmp_path / "plain" / "x.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # no folder, no page, no temporary file


def test_nan_values_export_as_null(tmp_path):
    trace = synthetic_trace(T=8, L=2)
    trace.sink[2] = float("nan")
    trace.router_weights[3, 0, 0] = float("nan")
    ids = torch.zeros(8, 2, 3, dtype=torch.long)
    probs = torch.full((8, 2, 3), 0.25)
    probs[1, 1, 2] = float("nan")
    probs[4, 0, 0] = float("inf")
    trace.captured.update({"logit_lens.top_ids": ids, "logit_lens.top_probs": probs})
    page = trace.to_html(tmp_path / "nan.html").read_text(encoding="utf-8")

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    match = re.search(r'<script type="application/json" id="ossscope-data">(.*?)</script>', page, re.S)
    (payload,) = json.loads(match.group(1), parse_constant=refuse)  # valid JSON: no NaN, no Infinity
    assert payload["lens"]["probs"][1][1] == [0.25, 0.25, None] and payload["lens"]["probs"][4][0][0] is None
    assert W.dumps_for_html({"x": [float("nan"), 1.5, {"y": float("-inf")}]}) == '{"x":[null,1.5,{"y":null}]}'
