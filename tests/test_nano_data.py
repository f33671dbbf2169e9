"""The nano corpus: deterministic, correct worked reasoning, held-out sets disjoint, rendering = inference."""

import json
import random
import re

import pytest

from ossscope.nano import data

pytest.importorskip("openai_harmony")


@pytest.fixture(scope="module")
def enc():
    from ossscope.tokenizer import harmony_encoding

    return harmony_encoding()


def test_corpus_is_deterministic_and_seeded():
    a, b, c = data.corpus(200, seed=3), data.corpus(200, seed=3), data.corpus(200, seed=4)
    assert [e.user for e in a] == [e.user for e in b]
    assert [e.analysis_text for e in a] == [e.analysis_text for e in b]
    assert [e.user for e in a] != [e.user for e in c]
    assert {e.kind for e in a} == {"add", "sub", "sort", "spell", "join", "tool", "browser", "python"}
    assert {e.effort for e in a} == set(data.EFFORTS)


def _replay_columns(analysis: str, op: str) -> int:
    """Recompute the answer from the high-effort column lines alone, checking each line's arithmetic."""
    digits = []
    carry = 0
    for line in analysis.splitlines():
        m = re.fullmatch(r"(\w+): (\d) ([+-]) (\d) [+-] (\d)(?: needs a borrow, (\d+) - \d - \d)? = (\d+), "
                         r"write (\d), (carry|borrow) (\d)", line)
        if not m:
            continue
        x, y, c_in = int(m.group(2)), int(m.group(4)), int(m.group(5))
        assert c_in == carry, line
        value = x + y + c_in if op == "add" else x - y - c_in + (10 if m.group(6) else 0)
        assert value == int(m.group(7)) and value % 10 == int(m.group(8)), line
        carry = int(m.group(10))
        assert carry == (value // 10 if op == "add" else int(bool(m.group(6)))), line
        digits.append(value % 10)
    if op == "add" and carry:
        digits.append(carry)
    return int("".join(map(str, reversed(digits))))


@pytest.mark.parametrize("op", ["add", "sub"])
def test_worked_arithmetic_is_right(op):
    rng = random.Random(11)
    for _ in range(300):
        a, b = data.arithmetic_problem(rng, op, four_digit=rng.random() < 0.5)
        truth = a + b if op == "add" else a - b
        high = data.arithmetic_episode(rng, op, a, b, "high")
        assert high.answer == truth
        assert _replay_columns(high.analysis_text, op) == truth
        digits_line = [ln for ln in high.analysis_text.splitlines() if ln.startswith("Digits: ")][0]
        assert int(digits_line[len("Digits: "):].replace(" ", "")) == truth
        for effort in data.EFFORTS:
            text = data.arithmetic_episode(rng, op, a, b, effort).analysis_text
            assert text.endswith(f"= {truth}.")


def test_effort_orders_analysis_length():
    rng = random.Random(5)
    lengths = {e: [] for e in data.EFFORTS}
    for _ in range(100):
        op = rng.choice(["add", "sub"])
        a, b = data.arithmetic_problem(rng, op, four_digit=True)
        for effort in data.EFFORTS:
            lengths[effort].append(len(data.arithmetic_episode(rng, op, a, b, effort).analysis_text))
    low, medium, high = (sum(v) / len(v) for v in lengths.values())
    assert low < medium < high and high > 2 * low


def test_sort_and_tools_are_right():
    rng = random.Random(2)
    for effort in data.EFFORTS:
        ep = data.sort_episode(rng, effort)
        assert ep.answer == sorted(ep.meta["values"])
        assert ep.replies[0][-1].content == ", ".join(map(str, ep.answer))
        tool = data.tool_episode(rng, effort, "convert_units")
        call = tool.replies[0][-1]
        assert call.recipient == "functions.convert_units" and call.channel == "commentary"
        args = json.loads(call.content)
        assert json.loads(tool.between[0][0].content) == data.convert_units(**args)


def test_digit_drills_are_right():
    rng = random.Random(9)
    for effort in data.EFFORTS:
        for n in (7, 40, 305, 4821, 10000, 99999):
            spell = data.digits_episode(rng, effort, "spell", n)
            assert spell.replies[0][-1].content == " ".join(str(n)) and str(n) in spell.user
            join = data.digits_episode(rng, effort, "join", n)
            assert join.replies[0][-1].content == str(n) and " ".join(str(n)) in join.user
            if effort == "high":  # the place names read back to the number
                places = dict(p.rsplit(" ", 1) for p in join.analysis_text.splitlines()[1].split(", "))
                assert sum(int(places[name]) * 10**i for i, name in enumerate(data.PLACE_NAMES) if name in places) == n


def test_held_out_sets_never_appear_in_the_corpus():
    train = data.corpus(3000, seed=0)
    seen = {(e.kind, e.meta["a"], e.meta["b"]) for e in train if e.kind in ("add", "sub")}
    questions = {e.user for e in train if e.kind == "tool"}
    held = data.eval_arithmetic(30)
    assert len(held) == 2 * 3 * 30
    assert all(len(str(e.meta["a"])) == 4 and len(str(e.meta["b"])) == 4 for e in held)
    assert not seen & {(e.kind, e.meta["a"], e.meta["b"]) for e in held}
    assert all(data.is_held_out(e.kind, e.meta["a"], e.meta["b"]) for e in held)
    tools = data.eval_tools(20)
    assert not questions & {e.user for e in tools}


def test_render_matches_what_the_chat_engine_renders(enc):
    """A training sequence = harmony's prompt for call 1 + reply 1 (+ tool answer) = prompt for call 2 + reply 2."""
    from ossscope import harmony
    from ossscope.tokenizer import CALL, RETURN

    rng = random.Random(9)
    episode = data.tool_episode(rng, "high", "get_weather")
    episode.tools = ["get_weather", "convert_units"]
    tokens, mask = data.render_episode(enc, episode)
    prompt1 = harmony.render_prompt(episode.user, reasoning="high",
                                    tools=[data.get_weather, data.convert_units])
    assert tokens[: len(prompt1)] == prompt1
    assert not any(mask[: len(prompt1)])
    # the first reply ends with <|call|>, the turn ends with <|return|>; the mask covers exactly the replies
    ends = [i for i in range(1, len(mask)) if mask[i - 1] and not mask[i]] + [len(mask)]
    assert [tokens[i - 1] for i in ends] == [CALL, RETURN]
    prompt2 = data.render_prompt(enc, episode, 1)
    assert tokens[: len(prompt2)] == prompt2
    call = enc.decode(tokens[len(prompt1): ends[0]])
    assert call.startswith("<|channel|>analysis<|message|>")
    assert 'to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": ' in call


def test_vocab_covers_the_corpus(enc):
    episodes = data.corpus(200, seed=1)
    rendered = [data.render_episode(enc, e)[0] for e in episodes]
    vocab = data.build_vocab(rendered)
    ids = vocab["o200k_ids"]
    assert len(ids) == len(set(ids)) and vocab["unknown_id"] == len(ids) - 1
    assert ids[vocab["unknown_id"]] == data.UNKNOWN_O200K_ID
    assert set(data.HARMONY_SPECIAL_IDS) <= set(ids)
    assert all(t in set(ids) for seq in rendered for t in seq)
