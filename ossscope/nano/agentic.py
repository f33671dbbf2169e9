"""Browser and python episodes for nano's corpus: harmony's built-in tools, used as gpt-oss uses them.

- browser: the user asks about a fictional town of the shipped corpus (`ossscope/nano/towns/`, one markdown
  page a town, facts nobody can know without reading them). The assistant searches (`browser.search`), opens
  the first result (`browser.open`), and answers citing the line it read: `... 38 meters tall 【1†L4】.`
- python: the user asks for a product or a power too big to work out in the head; the assistant sends
  `print(...)` to `python` and answers with what it printed.

Every tool answer in an episode is what `ossscope.tools.Browser` over the shipped corpus (or Python itself)
answers at inference, so `model.chat(..., tools=[Browser(TOWNS_DIR), Python()])` shows the model exactly what
it was trained on. Calls go on the analysis channel (`to=browser.search`, content type `code`), the tools
answer on it, and the system message declares the tools as openai-harmony's `with_browser_tool()` /
`with_python_tool()` do.

Questions whose hash falls in the eval bucket (`data.is_held_out_question`) are kept for evaluation.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

TOWNS_DIR = Path(__file__).resolve().parent / "towns"  # the shipped corpus, written by `write_towns`

_SYLLABLES = ("vel", "mor", "ka", "dun", "sel", "tir", "bro", "an", "wen", "lo", "qua", "rith", "osk", "ber",
              "fal", "ne", "tor", "ise")  # fmt: skip
_KINDS = ("harbor", "mountain", "river", "market", "mining", "island")
_COASTS = ("north", "south", "east", "west")
# attribute -> (fact sentence, question templates, how the final answer says it)
FACTS = {
    "founded": ("{town} was founded in {v}.", ("When was {town} founded?", "In which year was {town} founded?"),
                "{town} was founded in {v}"),
    "lighthouse": ("The lighthouse of {town} is {v} meters tall.",
                   ("How tall is the lighthouse of {town}?", "How high is the {town} lighthouse?"),
                   "The lighthouse of {town} is {v} meters tall"),
    "bridges": ("{town} has {v} bridges.", ("How many bridges does {town} have?", "Count the bridges of {town}."),
                "{town} has {v} bridges"),
    "people": ("{town} has {v} inhabitants.", ("How many people live in {town}?", "What is the population of {town}?"),
               "{town} has {v} inhabitants"),
}  # fmt: skip
N_TOWNS = 24


def towns(seed: int = 19) -> list[dict[str, Any]]:
    """The shipped corpus's towns: name, kind, coast and one value per fact (deterministic)."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < N_TOWNS:
        name = "".join(rng.sample(_SYLLABLES, rng.choice((2, 3)))).capitalize()
        if name not in names and len(name) <= 11:
            names.append(name)
    return [{"town": name, "kind": rng.choice(_KINDS), "coast": rng.choice(_COASTS),
             "founded": rng.randint(1100, 1950), "lighthouse": rng.randint(12, 90), "bridges": rng.randint(2, 40),
             "people": rng.randint(800, 90000)} for name in names]  # fmt: skip


def town_page(town: dict[str, Any]) -> str:
    """One town's markdown page."""
    name = town["town"]
    lines = [f"# {name}", "", f"{name} is a {town['kind']} town on the {town['coast']} coast."]
    lines += [FACTS[key][0].format(town=name, v=town[key]) for key in FACTS]
    return "\n".join(lines) + "\n"


def write_towns(folder: str | Path = TOWNS_DIR) -> list[Path]:
    """Write the corpus pages (`{town}.md`) into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for town in towns():
        path = folder / f"{town['town'].lower()}.md"
        path.write_text(town_page(town))
        paths.append(path)
    return paths


@functools.lru_cache(maxsize=1)
def _towns_by_name() -> dict[str, dict[str, Any]]:
    return {t["town"]: t for t in towns()}


@functools.lru_cache(maxsize=1)
def _shared_browser() -> Any:
    from ..tools import Browser

    return Browser(TOWNS_DIR)


def _browser() -> Any:
    """The corpus's browser with an empty page stack (one index for all episodes: building it is the cost)."""
    browser = _shared_browser()
    browser.reset()
    return browser


def browser_episode(rng: random.Random, effort: str, held_out: bool | None = False) -> Any:
    """Search the shipped corpus, open the first result, answer with a citation of the fact's line."""
    from . import data

    while True:
        town = rng.choice(towns())
        key = rng.choice(list(FACTS))
        question = rng.choice(FACTS[key][1]).format(town=town["town"])
        if held_out is None or data.is_held_out_question(question) == held_out:
            break
    name, value = town["town"], town[key]
    query = f"{name} {key}"
    browser = _browser()  # fresh page stack: cursor 0 is the search, 1 the opened page
    found = browser.search(query)
    opened = browser.open(id=0)
    fact = FACTS[key][0].format(town=name, v=value)
    line = next(i for i, text in enumerate(browser.pages[1].lines) if text == fact)
    final = f"{FACTS[key][2].format(town=name, v=value)} 【1†L{line}】."
    if effort == "low":
        think, read = "Search.", f"L{line}."
    elif effort == "medium":
        think, read = f"I need to look up {name}. Search the browser.", f"Line {line} says it: {value}."
    else:
        think = (f"The user asks about {name}. I do not know this town, so I should not guess. "
                 f"Search the browser for {name}, open the page, and cite the line.")
        read = (f"The page of {name} is open at cursor 1. Line {line}: {fact} "
                f"So the answer is {value}, cite 【1†L{line}】.")
    search_call = _call("browser.search", json.dumps({"query": query}))
    open_call = _call("browser.open", json.dumps({"id": 0}))
    replies = [
        [data.Msg("assistant", think, channel="analysis"), search_call],
        [open_call],
        [data.Msg("assistant", read, channel="analysis"), data.Msg("assistant", final, channel="final")],
    ]
    between = [[_answer("browser.search", found)], [_answer("browser.open", opened)]]
    expected = {"tools": ["browser.search", "browser.open"], "value": value, "url": f"{name.lower()}.md",
                "line": line, "final": final}  # fmt: skip
    episode = data.Episode("browser", effort, question, [], None, None, replies, between, expected,
                           {"town": name, "fact": key})  # fmt: skip
    episode.builtin_tools = ["browser"]
    return episode


PYTHON_QUESTIONS = {
    "mul": ("What is {a} * {b}?", "Compute {a} times {b}.", "Multiply {a} by {b}."),
    "pow": ("What is {a} to the power of {b}?", "Compute {a} ** {b}."),
}


def python_episode(rng: random.Random, effort: str, held_out: bool | None = False) -> Any:
    """Compute a product or a power with the python tool and answer with what it printed."""
    from . import data

    while True:
        op = rng.choice(("mul", "mul", "pow"))
        if op == "mul":
            a, b = rng.randint(12, 9999), rng.randint(12, 999)
            expression, value = f"{a} * {b}", a * b
        else:
            a, b = rng.randint(2, 19), rng.randint(3, 9)
            expression, value = f"{a} ** {b}", a**b
        code = f"print({expression})"
        question = rng.choice(PYTHON_QUESTIONS[op]).format(a=a, b=b)
        if held_out is None or data.is_held_out_question(question) == held_out:
            break
    if effort == "low":
        think, read = "Use python.", "Done."
    elif effort == "medium":
        think, read = "Too big to do in my head; use python.", f"Python printed {value}."
    else:
        think = (f"The user wants {expression}. Working it out by hand is slow and error-prone, so I will run "
                 "it in python and read the output.")
        read = f"Python printed {value}, so the answer is {value}."
    replies = [
        [data.Msg("assistant", think, channel="analysis"), _call("python", code)],
        [data.Msg("assistant", read, channel="analysis"), data.Msg("assistant", str(value), channel="final")],
    ]
    between = [[_answer("python", f"{value}\n")]]
    expected = {"tools": ["python"], "value": value, "code": code, "final": str(value)}
    episode = data.Episode("python", effort, question, [], None, None, replies, between, expected, {"op": op})
    episode.builtin_tools = ["python"]
    return episode


def _call(recipient: str, content: str) -> Any:
    from . import data

    return data.Msg("assistant", content, channel="analysis", recipient=recipient, content_type="code")


def _answer(name: str, content: str) -> Any:
    from . import data

    return data.Msg("tool", content, channel="analysis", recipient="assistant", name=name)


def eval_agentic(n_per_effort: int, seed: int = 1919) -> list[Any]:
    """Held-out browser and python episodes: n of each per effort."""
    from . import data

    rng = random.Random(seed)
    return [make(rng, effort, held_out=True) for effort in data.EFFORTS for make in (browser_episode, python_episode)
            for _ in range(n_per_effort)]  # fmt: skip


def score_chat(episode: Any, trace: Any) -> dict[str, Any]:
    """valid_call: the calls the episode needs, in order, without errors, and about the right thing (python: code
    that prints the value; browser: a search that names the asked-about town); correct: the final answer holds the
    value (and, for the browser, cites the fact's line of its page)."""
    want = episode.answer
    calls = [c for c in trace.tool_calls if c.error is None]
    names = [c.name for c in calls]
    valid = names[: len(want["tools"])] == want["tools"] and len(trace.tool_calls) == len(want["tools"])
    if episode.kind == "python" and valid:
        valid = calls[0].result.strip() == str(want["value"])
    if episode.kind == "browser" and valid:
        query = str((calls[0].parsed_arguments or {}).get("query", ""))
        valid = episode.meta["town"].lower() in query.lower()
    correct = str(want["value"]) in trace.final
    if episode.kind == "browser" and correct:
        from ..tools import CITATION

        cited = [(int(m["cursor"]), int(m["start"])) for m in CITATION.finditer(trace.final)]
        correct = (1, want["line"]) in cited
    tool_calls = [{"name": c.name, "arguments": c.arguments, "result": (c.result or "")[:300], "error": c.error}
                  for c in trace.tool_calls]  # what the tools said, so a failure can be read in the eval's JSON
    return {"kind": episode.kind, "effort": episode.effort, "valid_call": bool(valid), "correct": bool(correct),
            "text": trace.final, "tool_calls": tool_calls}  # fmt: skip
