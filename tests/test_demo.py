"""The README's main job, `python -m ossscope demo`, on the built-in model, and `python -m ossscope info`."""

from __future__ import annotations

from ossscope.__main__ import main


def test_demo_chats_at_two_efforts_ablates_and_exports(tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "200"]) == 0
    printed = capsys.readouterr().out
    for expected in ("loaded nano", "reasoning=low", "reasoning=high", "router: busiest expert", "ablation: expert"):
        assert expected in printed
    # The default question is one nano answers right only at high effort: the demo shows what effort buys.
    low, high = (printed.split(f"=== reasoning={e}")[1].split("final: ")[1].split("\n")[0] for e in ("low", "high"))
    assert high == "'105'" and low != "'105'"
    html = out.read_text()
    assert out.stat().st_size > 10_000 and "What is 79 + 26?" in html and "<script" in html


def test_demo_and_info_report_a_missing_model_in_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["demo", "--model", str(missing), "--out", str(tmp_path / "x.html")]) == 2
    assert main(["info", str(missing)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") and "no-such-model" in line for line in errors)
    assert not (tmp_path / "x.html").exists()


def test_info_describes_the_checkpoint(capsys):
    assert main(["info", "nano"]) == 0
    printed = capsys.readouterr().out
    assert "layers 6 (3 sliding, window 64), experts 16 top-2, heads 8/2" in printed
    assert "packed MXFP4 experts" in printed
