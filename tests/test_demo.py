"""The README's main job, `python -m ossscope demo`, on the built-in model, and `python -m ossscope info`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ossscope.__main__ import NANO_ABLATION, main

REPO_ROOT = Path(__file__).resolve().parent.parent


def payloads_of(html: str) -> list[dict]:
    """The run payloads embedded in an exported page."""
    match = re.search(r'<script type="application/json" id="ossscope-data">(.*?)</script>', html, re.S)
    assert match, "no payload in the page"
    return json.loads(match[1])


def test_demo_exports_both_efforts_and_an_ablation_that_changes_the_answer(tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "200"]) == 0
    printed = capsys.readouterr().out
    for expected in ("loaded nano", "reasoning=low", "reasoning=high", "router: busiest expert", "ablation at high"):
        assert expected in printed
    # The default question is one nano answers right only at high effort: the demo shows what effort buys,
    # and says which answers are wrong.
    finals = re.findall(r"^final: (.*)$", printed, re.M)
    assert finals[0].endswith("WRONG: the answer is 105") and not finals[0].startswith("'105'")
    assert finals[1] == "'105'   (right)"
    # The default ablation really matters: the answer changes and is called wrong.
    after = re.search(r"^  final after:  '(.*)'$", printed, re.M)
    assert after and after[1] != "105" and "the ablated model is wrong" in printed

    html = out.read_text()
    assert "What is 79 + 26?" in html and "<script" in html
    low, high, ablated = payloads_of(html)
    layer, experts = next(iter(NANO_ABLATION.items()))
    assert [p["title"] for p in (low, high)] == ["reasoning=low", "reasoning=high"]
    assert f"layer {layer}" in ablated["title"] and "rerouted" in ablated["title"]
    assert [p["check"] for p in (low, high, ablated)] == [
        {"expected": "105", "correct": False}, {"expected": "105", "correct": True},
        {"expected": "105", "correct": False}]
    assert [p["final"] for p in (low, high, ablated)] == [finals[0].split("'")[1], "105", after[1]]
    for payload in (low, high, ablated):
        # every tab has data: the logit lens at every token, every layer's attention pattern
        assert payload["window"] == 64 and payload["sliding"] == [True, False] * 3
        assert payload["lens"]["rows"] == list(range(payload["dims"]["T"]))
        assert sorted(payload["attention"], key=int) == [str(l) for l in range(6)]
        assert payload["attention"]["0"]["rows"] and payload["context"]


def test_demo_rejects_bad_arguments_in_one_line_before_any_work(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["demo", "--model", str(missing), "--out", str(tmp_path / "x.html")]) == 2
    assert main(["info", str(missing)]) == 2
    assert main(["demo", "--out", str(tmp_path / "no-such-folder" / "x.html")]) == 2
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--ablate", "5", "--out", str(tmp_path / "x.html")]) == 2
    assert main(["demo", "--ablate", "9:1", "--out", str(tmp_path / "x.html")]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]  # (and nano's loading bar)
    assert len(errors) == 6 and "Traceback" not in stderr
    assert "no-such-model" in errors[0] and "no-such-model" in errors[1]
    assert "no-such-folder does not exist" in errors[2] and "is a folder" in errors[3]
    assert "LAYER:EXPERT" in errors[4] and "layer 9 is out of range" in errors[5]
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "no-such-folder").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_on_cuda_without_cuda_is_one_clear_line(tmp_path, capsys):
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path / "x.html")]) == 2
    assert main(["demo", "--device", "tpu9", "--out", str(tmp_path / "x.html")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and errors[0].startswith("error: --device cuda: no CUDA GPU is available")
    assert "not a device torch knows" in errors[1]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="not a git checkout")
def test_the_default_output_is_ignored_by_git():
    # `bash run.sh demo` writes ./ossscope-demo.html in the repository root: it must not show up as untracked.
    checked = subprocess.run(["git", "check-ignore", "-q", "ossscope-demo.html"], cwd=REPO_ROOT)
    assert checked.returncode == 0


def test_info_describes_the_checkpoint_in_a_few_lines(capsys):
    assert main(["info", "nano"]) == 0
    printed = capsys.readouterr().out
    assert "layers 6 (3 sliding, window 64), experts 16 top-2 (MXFP4), heads 8/2 of dim 32" in printed
    assert "packed MXFP4 experts" in printed
    assert len(printed.splitlines()) <= 8 and "HookPoint" not in printed
