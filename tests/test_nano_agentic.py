"""nano's browser and python episodes: the shipped corpus, the answers right, the held-out split, and a
training sequence equal to the context `model.chat` builds with the real tools (training = inference)."""

from __future__ import annotations

import random

import pytest
from test_chat import ScriptedModel

import ossscope
from ossscope import harmony
from ossscope.chat import chat
from ossscope.config import PRESETS
from ossscope.nano import agentic, data
from ossscope.tokenizer import harmony_encoding
from ossscope.tools import Browser, Python


@pytest.fixture(scope="module")
def enc():
    return harmony_encoding()


@pytest.fixture(scope="module")
def model(enc):
    """A tiny random model whose compact vocabulary holds every token of the episodes below (prefilling a
    1,000-token prompt through a 201k-wide unembedding would take most of the test's time)."""
    episodes = [agentic.browser_episode(random.Random(11), "medium"), agentic.python_episode(random.Random(12), "high")]
    vocab = data.build_vocab([data.render_episode(enc, e)[0] for e in episodes])
    config = PRESETS["tiny"].replace(vocab_size=len(vocab["o200k_ids"]), num_hidden_layers=2)
    tiny = ossscope.random_model(config, seed=2, device="cpu")
    tiny.vocab_map, tiny.unknown_id = vocab["o200k_ids"], vocab["unknown_id"]
    return tiny


def test_shipped_corpus_is_the_generated_one(tmp_path):
    written = agentic.write_towns(tmp_path)
    shipped = sorted(agentic.TOWNS_DIR.glob("*.md"))
    assert [p.name for p in shipped] == sorted(p.name for p in written) and len(shipped) == agentic.N_TOWNS
    assert all(p.read_text() == (tmp_path / p.name).read_text() for p in shipped)


@pytest.mark.parametrize("effort", data.EFFORTS)
def test_episodes_are_right(effort):
    rng = random.Random(5)
    browser = agentic.browser_episode(rng, effort)
    town = {t["town"]: t for t in agentic.towns()}[browser.meta["town"]]
    assert browser.answer["value"] == town[browser.meta["fact"]]
    page = Browser(agentic.TOWNS_DIR)
    page.open(id=browser.answer["url"])
    (cited,) = page.citations(browser.answer["final"].replace("【1†", "【0†"))
    assert cited["valid"] and str(browser.answer["value"]) in cited["lines"][0]
    python = agentic.python_episode(rng, effort)
    assert int(python.answer["final"]) == eval(python.answer["code"][len("print("):-1])  # noqa: S307 - our own


def test_corpus_mixes_them_in_and_can_leave_them_out():
    kinds = [e.kind for e in data.corpus(400, seed=2)]
    assert 0.05 < (kinds.count("browser") + kinds.count("python")) / len(kinds) < 0.2
    before = data.corpus(300, seed=2, agentic=False)
    assert not {"browser", "python"} & {e.kind for e in before}
    held = agentic.eval_agentic(8)
    train = {e.user for e in data.corpus(800, seed=0) if e.kind in ("browser", "python")}
    assert len(held) == 2 * 3 * 8 and not train & {e.user for e in held}
    assert all(data.is_held_out_question(e.user) for e in held)


def _replay(model, enc, episode, tools):
    """Drive chat with the episode's own replies; return (trace, the episode's training tokens and mask)."""
    tokens, mask = data.render_episode(enc, episode)
    scripted = ScriptedModel(model, "")
    scripted.script = model.tokenizer.to_model([t for t, m in zip(tokens, mask, strict=True) if m])
    trace = chat(scripted, episode.user, reasoning=episode.effort, tools=tools, temperature=0.0,
                 max_new_tokens=len(scripted.script) + 5)  # fmt: skip
    return trace, tokens


def test_browser_episode_is_what_chat_builds(model, enc):
    episode = agentic.browser_episode(random.Random(11), "medium")
    trace, tokens = _replay(model, enc, episode, [Browser(agentic.TOWNS_DIR)])
    prompt = harmony.render_prompt(episode.user, reasoning="medium", builtin_tools=[Browser(agentic.TOWNS_DIR)])
    assert tokens[: len(prompt)] == prompt
    sequence, _ = trace.context_tokens()
    assert sequence == tokens  # prompt, calls, the real browser's answers, final: token for token
    scored = agentic.score_chat(episode, trace)
    assert {k: scored[k] for k in ("kind", "effort", "valid_call", "correct", "text")} == {
        "kind": "browser", "effort": "medium", "valid_call": True, "correct": True, "text": episode.answer["final"]}
    assert [c["name"] for c in scored["tool_calls"]] == ["browser.search", "browser.open"]
    assert all(c["error"] is None and c["result"] for c in scored["tool_calls"])
    other = agentic.browser_episode(random.Random(12), "medium")  # another town's question, the same calls
    assert other.meta["town"] != episode.meta["town"]
    assert not agentic.score_chat(other, trace)["valid_call"]


def test_python_episode_is_what_chat_builds(model, enc):
    episode = agentic.python_episode(random.Random(12), "high")
    with Python() as kernel:  # the default declaration (120 s), which the corpus renders
        trace, tokens = _replay(model, enc, episode, [kernel])
    sequence, _ = trace.context_tokens()
    assert sequence == tokens
    assert agentic.score_chat(episode, trace)["valid_call"] and agentic.score_chat(episode, trace)["correct"]
    wrong = agentic.score_chat(agentic.python_episode(random.Random(13), "high"), trace)
    assert not wrong["correct"]


def test_evaluate_agentic_scores_each_effort(enc):
    from types import SimpleNamespace

    from ossscope.nano.eval import evaluate_agentic
    from ossscope.trace import ToolCall

    episodes = {e.user: e for e in agentic.eval_agentic(1)}
    prompts = {}

    class Oracle:
        """Answers each held-out question as its episode does (browser) or wrongly (python at low effort)."""

        def chat(self, user, reasoning, tools, **kwargs):
            episode = episodes[user]
            prompts[user] = harmony.render_prompt(user, reasoning=reasoning, builtin_tools=tools)
            if episode.kind == "python":
                (kernel,) = tools
                assert kernel.timeout <= 30  # a short real limit, whatever it declares
            names = episode.answer["tools"]
            result = f"{episode.answer['value']}\n" if episode.kind == "python" else "page"
            calls = [ToolCall(name=n, arguments="", result=result) for n in names]
            final = episode.answer["final"] if (episode.kind, reasoning) != ("python", "low") else "I think 3."
            return SimpleNamespace(tool_calls=calls, final=final, channels=["analysis"] * 4)

    summary, results = evaluate_agentic(Oracle(), 1)
    assert len(results) == 6 and set(summary) == {f"{k}/{e}" for k in ("browser", "python") for e in data.EFFORTS}
    assert summary["browser/high"]["correct"] == 1.0 and summary["python/medium"]["valid_call"] == 1.0
    assert summary["python/low"]["correct"] == 0.0 and summary["python/low"]["mean_analysis_tokens"] == 4
    # The eval shows the model the system prompt it was trained on (harmony's 120 s python declaration too).
    for user, episode in episodes.items():
        tokens, _ = data.render_episode(enc, episode)
        assert prompts[user] == tokens[: len(prompts[user])], (episode.kind, episode.effort)


def test_evaluate_agentic_skips_python_where_no_kernel_starts(monkeypatch, capsys):
    """On a machine without jupyter_client (the GPU image) the python episodes are left out with a note,
    not scored 0% as if the model had failed them."""
    from types import SimpleNamespace

    from ossscope.nano import eval as nano_eval
    from ossscope.tools import python as python_tool

    def no_kernel(name):
        raise ImportError("the python tool ... needs jupyter_client and ipykernel")

    monkeypatch.setattr(python_tool, "_require_kernel", no_kernel)
    asked = []

    class Model:
        def chat(self, user, reasoning, tools, **kwargs):
            asked.append(tools[0].name)
            return SimpleNamespace(tool_calls=[], final="", channels=[])

    summary, results = nano_eval.evaluate_agentic(Model(), 1)
    assert asked == ["browser"] * 3 and set(summary) == {f"browser/{e}" for e in data.EFFORTS}
    assert "python episodes skipped" in capsys.readouterr().err
