"""The nano model's synthetic harmony corpus: deterministic, seeded, rendered exactly as inference renders it.

Skills, each with reasoning whose length follows the effort in the system message (`Reasoning: low|medium|high`):
- arithmetic: `What is 1234 + 987?` / `What is 5021 - 388?` (and paraphrases), operands up to 4 digits,
  subtraction never goes below zero. `high` works column by column with carries/borrows, one digit a token.
- sorting a short list of numbers below 100 (`high`: repeated "smallest is ..." selection).
- digits: spelling a number digit by digit (`Spell 4821 digit by digit.` -> `4 8 2 1`) and joining digits
  into a number (`Join the digits 8 7 8 8.` -> `8788`). o200k writes numbers in tokens of up to three digits
  ("4821" is "482" + "1"), so column arithmetic needs exactly these two skills: reading the digits out of a
  number's tokens and writing digits back as tokens. Drilling them on their own teaches it faster.
- function calls: the developer message declares `get_weather` and/or `convert_units`; the assistant calls
  `functions.NAME` on the commentary channel with JSON arguments, the tool answers, the assistant answers.

An episode becomes one token sequence with a loss mask: the prompt(s) come from openai-harmony's
`render_conversation_for_completion` (what the chat engine sends), the targets are the tokens the model must
emit after `<|start|>assistant` (ending in `<|return|>` or `<|call|>`). A tool episode is one sequence holding
both model calls (prompt 1, the call, the tool's answer, prompt 2, the final answer); the test checks that
this is exactly prompt 1 + call, then prompt 2 + answer, as the chat engine would see them.

Held-out problems: an arithmetic problem whose hash falls in the eval bucket never appears in training, so
evaluation sets are disjoint from the corpus by construction.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

EFFORTS = ("low", "medium", "high")
COLUMN_NAMES = ("ones", "tens", "hundreds", "thousands")
PLACE_NAMES = COLUMN_NAMES + ("ten-thousands",)
UNKNOWN_O200K_ID = 200004  # <|reserved_200004|>: the o200k id standing for "outside the compact vocabulary"
# Harmony's special tokens that a conversation can contain (o200k_harmony ids).
HARMONY_SPECIAL_IDS = (199998, 199999, 200002, 200003, 200005, 200006, 200007, 200008, 200012)

# -- tools ---------------------------------------------------------------------------------------------------

CITIES = (
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Lisbon", "Dublin",
    "Vienna", "Prague", "Warsaw", "Athens", "Istanbul", "Moscow", "Delhi", "Mumbai", "Beijing", "Shanghai",
    "Seoul", "Bangkok", "Sydney", "Melbourne", "Toronto", "Chicago", "Boston", "Seattle", "Denver", "Miami",
    "Austin", "Mexico City", "Bogota", "Santiago", "Nairobi", "Lagos", "Dubai", "Singapore", "Jakarta",
    "Manila", "Helsinki", "Stockholm", "Zurich", "Amsterdam", "Brussels", "Montreal", "Vancouver",
)  # fmt: skip
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy")
# unit -> (to_unit, factor) pairs; temperatures are handled apart (an offset, not a factor).
CONVERSIONS = {
    ("km", "miles"): 0.621371, ("miles", "km"): 1.609344, ("kg", "pounds"): 2.204623,
    ("pounds", "kg"): 0.453592, ("meters", "feet"): 3.280840, ("feet", "meters"): 0.3048,
    ("liters", "gallons"): 0.264172, ("gallons", "liters"): 3.785412,
    ("celsius", "fahrenheit"): None, ("fahrenheit", "celsius"): None,
}  # fmt: skip


def get_weather(city: str) -> dict[str, Any]:
    """Get the current weather in a city.

    Args:
        city: The city name, e.g. Paris.
    """
    # A deterministic stand-in for a weather service, so notebooks and tests can run the tool loop offline.
    digest = int(hashlib.sha256(city.strip().lower().encode()).hexdigest(), 16)
    return {"city": city, "temperature_c": digest % 41 - 5, "condition": CONDITIONS[(digest >> 8) % len(CONDITIONS)]}


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """Convert a value from one unit to another.

    Args:
        value: The number to convert.
        from_unit: The unit of the value, e.g. km.
        to_unit: The unit to convert to, e.g. miles.
    """
    key = (from_unit.strip().lower(), to_unit.strip().lower())
    if key not in CONVERSIONS:
        return {"error": f"cannot convert {from_unit} to {to_unit}"}
    if key == ("celsius", "fahrenheit"):
        result = value * 9 / 5 + 32
    elif key == ("fahrenheit", "celsius"):
        result = (value - 32) * 5 / 9
    else:
        result = value * CONVERSIONS[key]
    return {"value": value, "from_unit": key[0], "to_unit": key[1], "result": round(result, 2)}


# The tools nano was trained with; pass these functions as `tools=` to model.chat so the developer message
# renders exactly as in training (the schema comes from their signatures and docstrings).
TOOL_FUNCTIONS = {"get_weather": get_weather, "convert_units": convert_units}
TOOLS = tuple(TOOL_FUNCTIONS)


# -- episodes ------------------------------------------------------------------------------------------------


@dataclass
class Msg:
    """One harmony message, independent of openai-harmony (rendered by `to_harmony`)."""

    role: str  # "user", "assistant", "tool"
    content: str
    channel: str | None = None  # analysis / commentary / final for the assistant and tools
    recipient: str | None = None  # "functions.NAME" for a tool call, "assistant" for a tool's answer
    content_type: str | None = None  # "<|constrain|>json" for JSON tool arguments
    name: str | None = None  # the tool's author name ("functions.NAME") for role "tool"


@dataclass
class Episode:
    """A conversation and what it checks. `turns` alternates model calls: each is (context messages, reply)."""

    kind: str  # "add", "sub", "sort", "spell", "join", "tool", "browser", "python" (agentic.py)
    effort: str
    user: str
    tools: list[str]  # names of the tools the developer message declares (may be empty)
    instructions: str | None  # developer instructions, if any
    start_date: str | None  # the system message's conversation start date, if any
    replies: list[list[Msg]]  # what the assistant says at each model call (the last one ends the turn)
    between: list[list[Msg]]  # messages that arrive between model calls (tool answers)
    answer: Any = None  # the final answer (int for arithmetic, list for sort, dict for tool episodes)
    meta: dict[str, Any] = field(default_factory=dict)
    builtin_tools: list[str] = field(default_factory=list)  # "browser" / "python", declared in the system message

    @property
    def analysis_text(self) -> str:
        return " ".join(m.content for reply in self.replies for m in reply if m.channel == "analysis")


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, most significant first, padded with zeros to `width`."""
    return [int(c) for c in str(n).zfill(width)]


def is_held_out(op: str, a: int, b: int) -> bool:
    """Whether an arithmetic problem belongs to the evaluation bucket (2% of problems, by a stable hash)."""
    digest = hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()
    return digest[0] < 6  # 6/256, about 2.3%


ADD_QUESTIONS = ("What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "Calculate {a} + {b}.",
                 "How much is {a} + {b}?", "{a} + {b} = ?", "Add {a} and {b}.")  # fmt: skip
SUB_QUESTIONS = ("What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}.", "Calculate {a} - {b}.",
                 "How much is {a} - {b}?", "{a} - {b} = ?", "Subtract {b} from {a}.")  # fmt: skip


def _column_pairs(a: int, b: int, width: int) -> str:
    """Both operands' digits by column, most significant first: "thousands 5 and 1, ..., ones 4 and 8".

    One line holding each column's pair once, so a column step later finds its two digits by the column's name
    alone (two separate per-number lines made the model mix up which line a digit came from).
    """
    da, db = _digits(a, width), _digits(b, width)
    return ", ".join(f"{COLUMN_NAMES[width - 1 - i]} {x} and {y}" for i, (x, y) in enumerate(zip(da, db, strict=True)))


def addition_analysis(a: int, b: int, effort: str) -> str:
    """The worked reasoning for a + b at one effort level."""
    c = a + b
    if effort == "low":
        return f"{a} + {b} = {c}."
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width)[::-1], _digits(b, width)[::-1]  # least significant first
    carry, steps, written = 0, [], []
    for col in range(width):
        s = da[col] + db[col] + carry
        if effort == "medium":
            steps.append(f"{da[col]}+{db[col]}+{carry}={s}")
        else:
            steps.append(f"{COLUMN_NAMES[col]}: {da[col]} + {db[col]} + {carry} = {s}, write {s % 10}, carry {s // 10}")
        written.append(s % 10)
        carry = s // 10
    if effort == "medium":
        return f"Columns from the right: {', '.join(steps)}. So {a} + {b} = {c}."
    if carry:
        written.append(carry)
    lines = [f"Add {a} and {b} column by column, from the right.", _column_pairs(a, b, width)]
    lines += steps
    if carry:
        lines.append(f"The last carry {carry} leads.")
    lines.append("Digits: " + " ".join(str(d) for d in reversed(written)))
    lines.append(f"So {a} + {b} = {c}.")
    return "\n".join(lines)


def subtraction_analysis(a: int, b: int, effort: str) -> str:
    """The worked reasoning for a - b (a >= b) at one effort level."""
    c = a - b
    if effort == "low":
        return f"{a} - {b} = {c}."
    width = len(str(a))
    da, db = _digits(a, width)[::-1], _digits(b, width)[::-1]
    borrow, steps, written = 0, [], []
    for col in range(width):
        d = da[col] - db[col] - borrow
        new_borrow = int(d < 0)
        if effort == "medium":
            steps.append(f"{da[col] + 10 * new_borrow}-{db[col]}-{borrow}={d + 10 * new_borrow}")
        elif new_borrow:
            steps.append(f"{COLUMN_NAMES[col]}: {da[col]} - {db[col]} - {borrow} needs a borrow, "
                         f"{da[col] + 10} - {db[col]} - {borrow} = {d + 10}, write {d + 10}, borrow 1")
        else:
            steps.append(f"{COLUMN_NAMES[col]}: {da[col]} - {db[col]} - {borrow} = {d}, write {d}, borrow 0")
        written.append(d + 10 * new_borrow)
        borrow = new_borrow
    if effort == "medium":
        return f"Columns from the right: {', '.join(steps)}. So {a} - {b} = {c}."
    lines = [f"Subtract {b} from {a} column by column, from the right.", _column_pairs(a, b, width)]
    lines += steps
    lines.append("Digits: " + " ".join(str(d) for d in reversed(written)))
    lines.append(f"So {a} - {b} = {c}.")
    return "\n".join(lines)


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def arithmetic_problem(rng: random.Random, op: str, four_digit: bool) -> tuple[int, int]:
    """Operands for one problem: both 4-digit, or digit counts drawn from 1..4."""
    if four_digit:
        a, b = _operand(rng, 4), _operand(rng, 4)
    else:
        a, b = _operand(rng, rng.randint(1, 4)), _operand(rng, rng.randint(1, 4))
    if op == "sub" and a < b:
        a, b = b, a
    return a, b


def arithmetic_episode(rng: random.Random, op: str, a: int, b: int, effort: str, question: str | None = None
                       ) -> Episode:
    """An arithmetic episode for a fixed problem (a - b needs a >= b)."""
    if op == "sub" and a < b:
        raise ValueError(f"subtraction episodes need a >= b, got {a} - {b}")
    templates = ADD_QUESTIONS if op == "add" else SUB_QUESTIONS
    question = question or rng.choice(templates)
    analysis = addition_analysis(a, b, effort) if op == "add" else subtraction_analysis(a, b, effort)
    answer = a + b if op == "add" else a - b
    reply = [Msg("assistant", analysis, channel="analysis"), Msg("assistant", str(answer), channel="final")]
    return Episode(op, effort, question.format(a=a, b=b), [], None, None, [reply], [], answer, {"a": a, "b": b})


SORT_QUESTIONS = ("Sort these numbers from smallest to largest: {xs}.", "Put {xs} in ascending order.",
                  "Sort {xs}.", "Order from least to greatest: {xs}.")  # fmt: skip


def sort_episode(rng: random.Random, effort: str, values: list[int] | None = None) -> Episode:
    """Sort 3-6 numbers below 100; `high` shows selection of the smallest, step by step."""
    values = values if values is not None else [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    ordered = sorted(values)
    listing = ", ".join(map(str, values))
    if effort == "low":
        analysis = f"Sorted: {', '.join(map(str, ordered))}."
    elif effort == "medium":
        joiner = " < " if len(set(ordered)) == len(ordered) else ", "
        analysis = f"Smallest first: {joiner.join(map(str, ordered))}."
    else:
        lines, left = [f"Start with {listing}."], list(values)
        while len(left) > 1:
            smallest = min(left)
            left.remove(smallest)
            lines.append(f"Smallest is {smallest}; left {', '.join(map(str, left))}.")
        lines.append(f"Last is {left[0]}.")
        lines.append(f"Sorted: {', '.join(map(str, ordered))}.")
        analysis = "\n".join(lines)
    reply = [Msg("assistant", analysis, channel="analysis"),
             Msg("assistant", ", ".join(map(str, ordered)), channel="final")]
    question = rng.choice(SORT_QUESTIONS).format(xs=listing)
    return Episode("sort", effort, question, [], None, None, [reply], [], ordered, {"values": values})


SPELL_QUESTIONS = ("Spell {n} digit by digit.", "What are the digits of {n}?", "List the digits of {n}.",
                   "Write {n} one digit at a time.")  # fmt: skip
JOIN_QUESTIONS = ("Join the digits {ds}.", "Which number has the digits {ds}?", "Put the digits {ds} together.",
                  "Write the digits {ds} as one number.")  # fmt: skip


def digits_episode(rng: random.Random, effort: str, kind: str | None = None, n: int | None = None) -> Episode:
    """Spell a number (0-99999) as digits, or join digits into the number; `high` names each place."""
    kind = kind or rng.choice(("spell", "join"))
    n = n if n is not None else _operand(rng, rng.choice((2, 3, 4, 4, 4, 5)))
    spelled = " ".join(str(n))
    if effort == "low":
        analysis = f"{n}: {spelled}." if kind == "spell" else f"{spelled}: {n}."
    elif effort == "medium":
        analysis = f"{n} has {len(str(n))} digits: {spelled}." if kind == "spell" else \
            f"{len(str(n))} digits {spelled} make {n}."
    else:
        places = ", ".join(f"{PLACE_NAMES[len(str(n)) - 1 - i]} {d}" for i, d in enumerate(str(n)))
        if kind == "spell":
            analysis = f"{n} has {len(str(n))} digits.\n{n}: {places}\nDigits: {spelled}"
        else:
            analysis = f"The digits {spelled} are {len(str(n))} digits.\n{places}\nSo the number is {n}."
    final = spelled if kind == "spell" else str(n)
    template = rng.choice(SPELL_QUESTIONS if kind == "spell" else JOIN_QUESTIONS)
    reply = [Msg("assistant", analysis, channel="analysis"), Msg("assistant", final, channel="final")]
    return Episode(kind, effort, template.format(n=n, ds=spelled), [], None, None, [reply], [], final, {"n": n})


WEATHER_QUESTIONS = ("What's the weather in {city}?", "What is the weather like in {city} right now?",
                     "How warm is it in {city}?", "Is it raining in {city}?", "Weather in {city}?",
                     "Tell me the weather for {city}.")  # fmt: skip
CONVERT_QUESTIONS = ("Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?",
                     "{v} {f} in {t}?")  # fmt: skip


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def is_held_out_question(question: str) -> bool:
    """Whether a tool episode's question (a wording and its arguments) is kept for evaluation (about 10%)."""
    return hashlib.sha256(question.encode()).digest()[0] < 26


def tool_episode(rng: random.Random, effort: str, name: str | None = None, held_out: bool | None = None
                 ) -> Episode:
    """A function-call episode: declare tools, call one with JSON arguments, answer from the result.

    held_out: True draws only evaluation questions, False only training questions, None either.
    """
    while True:
        episode = _tool_episode(rng, effort, name)
        if held_out is None or is_held_out_question(episode.user) == held_out:
            return episode


def _tool_episode(rng: random.Random, effort: str, name: str | None) -> Episode:
    name = name or rng.choice(("get_weather", "convert_units"))
    if name == "get_weather":
        city = rng.choice(CITIES)
        arguments: dict[str, Any] = {"city": city}
        question = rng.choice(WEATHER_QUESTIONS).format(city=city)
        result = {"city": city, "temperature_c": rng.randint(-5, 35), "condition": rng.choice(CONDITIONS)}
        final = f"It is {result['temperature_c']}°C and {result['condition']} in {city}."
        need = f"the weather in {city}"
        how = f"with city {city}"
    else:
        from_unit, to_unit = rng.choice(list(CONVERSIONS))
        value = rng.randint(1, 500)
        arguments = {"value": value, "from_unit": from_unit, "to_unit": to_unit}
        question = rng.choice(CONVERT_QUESTIONS).format(v=value, f=from_unit, t=to_unit)
        result = convert_units(value, from_unit, to_unit)
        final = f"{value} {from_unit} is {_number_text(result['result'])} {to_unit}."
        need = f"{value} {from_unit} in {to_unit}"
        how = f"with value {value}, from_unit {from_unit} and to_unit {to_unit}"
    if effort == "low":
        analysis = f"Call {name}."
    elif effort == "medium":
        analysis = f"The user wants {need}. I will call {name}."
    else:
        analysis = (f"The user wants {need}. The developer declared a {name} tool, so I should not guess. "
                    f"I will call {name} {how}, then answer from its result.")
    others = [t for t in TOOLS if t != name]
    tools = [name] + ([o for o in others if rng.random() < 0.6])
    rng.shuffle(tools)
    call = Msg("assistant", json.dumps(arguments), channel="commentary", recipient=f"functions.{name}",
               content_type="<|constrain|>json")
    answer_msg = Msg("tool", json.dumps(result), channel="commentary", recipient="assistant", name=f"functions.{name}")
    replies = [[Msg("assistant", analysis, channel="analysis"), call], [Msg("assistant", final, channel="final")]]
    expected = {"name": name, "arguments": arguments, "result": result, "final": final}
    return Episode("tool", effort, question, tools, None, None, replies, [[answer_msg]], expected)


INSTRUCTIONS = ("Answer briefly.", "Be concise.", "You are a helpful assistant.", "Show your work in the analysis.")


# Share of episodes replaced by browser/python episodes (agentic.py). Drawn after the episode it replaces, so
# corpus(n, seed, agentic=False) is exactly the corpus of the first nano checkpoint (the one the shipped
# checkpoint was warm-started from; see MODEL_CARD.md).
AGENTIC_SHARE = 0.2


def random_episode(rng: random.Random, agentic: bool = True) -> Episode:
    """One training episode: a skill, an effort, and some variety in the system and developer messages."""
    effort = rng.choice(EFFORTS)
    r = rng.random()
    if r < 0.62:
        op = "add" if r < 0.31 else "sub"
        while True:
            a, b = arithmetic_problem(rng, op, four_digit=rng.random() < 0.6)
            if not is_held_out(op, a, b):
                break
        # Half the arithmetic is worked at high effort: the column method is the skill that takes longest.
        episode = arithmetic_episode(rng, op, a, b, rng.choice(("low", "medium", "high", "high")))
    elif r < 0.74:
        episode = digits_episode(rng, effort)
    elif r < 0.84:
        episode = sort_episode(rng, effort)
    else:
        episode = tool_episode(rng, effort, held_out=False)
    if agentic and rng.random() < AGENTIC_SHARE:  # harmony's built-in tools (a separate draw: see AGENTIC_SHARE)
        from .agentic import browser_episode, python_episode

        return (browser_episode if rng.random() < 0.5 else python_episode)(rng, effort, held_out=False)
    if episode.kind != "tool" and rng.random() < 0.15:  # tools declared but not needed
        episode.tools = rng.sample(list(TOOLS), rng.randint(1, 2))
    if rng.random() < 0.15:
        episode.instructions = rng.choice(INSTRUCTIONS)
    if rng.random() < 0.5:
        episode.start_date = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return episode


def corpus(n: int, seed: int = 0, agentic: bool = True) -> list[Episode]:
    """`n` training episodes, the same for the same seed; `agentic=False` leaves out the browser/python
    episodes (the corpus of the first nano checkpoint, trained before them)."""
    rng = random.Random(seed)
    return [random_episode(rng, agentic) for _ in range(n)]


def eval_arithmetic(n_per_case: int, seed: int = 1234) -> list[Episode]:
    """Held-out 4-digit problems (both operands 4 digits): n per (op, effort), with the canonical question."""
    rng = random.Random(seed)
    episodes = []
    for op in ("add", "sub"):
        problems: list[tuple[int, int]] = []
        while len(problems) < n_per_case:
            a, b = arithmetic_problem(rng, op, four_digit=True)
            if is_held_out(op, a, b) and (a, b) not in problems:
                problems.append((a, b))
        question = ADD_QUESTIONS[0] if op == "add" else SUB_QUESTIONS[0]
        for effort in EFFORTS:
            episodes += [arithmetic_episode(rng, op, a, b, effort, question) for a, b in problems]
    return episodes


def eval_tools(n_per_effort: int, seed: int = 4321) -> list[Episode]:
    """Held-out tool episodes: questions (wording + city, or value and units) the corpus never contains."""
    rng = random.Random(seed)
    return [tool_episode(rng, effort, held_out=True) for effort in EFFORTS for _ in range(n_per_effort)]


def eval_sort(n_per_effort: int, seed: int = 999) -> list[Episode]:
    rng = random.Random(seed)
    return [sort_episode(rng, effort) for effort in EFFORTS for _ in range(n_per_effort)]


# -- rendering with openai-harmony --------------------------------------------------------------------------


def _harmony_message(msg: Msg) -> Any:
    from openai_harmony import Author, Message, Role

    if msg.role == "tool":
        message = Message.from_author_and_content(Author.new(Role.TOOL, msg.name), msg.content)
    else:
        message = Message.from_role_and_content(Role(msg.role), msg.content)
    if msg.channel:
        message = message.with_channel(msg.channel)
    if msg.recipient:
        message = message.with_recipient(msg.recipient)
    if msg.content_type:
        message = message.with_content_type(msg.content_type)
    return message


def header_messages(episode: Episode) -> list[Any]:
    """System (+ developer) + user messages as openai-harmony objects."""
    from openai_harmony import DeveloperContent, Message, ReasoningEffort, Role, SystemContent

    from ..harmony import Tool

    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(episode.effort.capitalize()))
    if episode.start_date:
        system = system.with_conversation_start_date(episode.start_date)
    if "browser" in episode.builtin_tools:  # harmony's own declarations: what ossscope.tools renders by default
        system = system.with_browser_tool()
    if "python" in episode.builtin_tools:
        system = system.with_python_tool()
    messages = [Message.from_role_and_content(Role.SYSTEM, system)]
    if episode.tools or episode.instructions:
        developer = DeveloperContent.new()
        if episode.instructions:
            developer = developer.with_instructions(episode.instructions)
        if episode.tools:
            developer = developer.with_function_tools(
                [Tool.from_function(TOOL_FUNCTIONS[t]).to_harmony() for t in episode.tools]
            )
        messages.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    messages.append(Message.from_role_and_content(Role.USER, episode.user))
    return messages


def render_reply(encoding: Any, reply: list[Msg]) -> list[int]:
    """The o200k tokens the model emits for one reply, after the prompt's `<|start|>assistant`.

    Each message renders as `<|start|>assistant...<|end|>`; the first message's `<|start|>assistant` is already
    in the prompt, and a final message ends the turn with `<|return|>` instead of `<|end|>`.
    """
    from ..tokenizer import END, RETURN, START

    tokens: list[int] = []
    for msg in reply:
        rendered = list(encoding.render(_harmony_message(msg)))
        if msg.channel == "final":
            if rendered[-1] != END:
                raise AssertionError(f"harmony rendered a final message ending with {rendered[-1]}, not <|end|>")
            rendered[-1] = RETURN
        tokens += rendered
    head = encoding.encode("<|start|>assistant", allowed_special="all")
    if tokens[: len(head)] != head or tokens[0] != START:
        raise AssertionError("a rendered assistant reply does not start with <|start|>assistant")
    return tokens[len(head):]


def render_prompt(encoding: Any, episode: Episode, call: int) -> list[int]:
    """The prompt of model call `call` (0-based): what the chat engine renders before the model continues."""
    from openai_harmony import Conversation, Role

    messages = header_messages(episode)
    for i in range(call):
        messages += [_harmony_message(m) for m in episode.replies[i]]
        messages += [_harmony_message(m) for m in episode.between[i]]
    return list(encoding.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT))


def render_episode(encoding: Any, episode: Episode) -> tuple[list[int], list[int]]:
    """One training sequence: o200k tokens [T] and a 0/1 loss mask [T] (1 on the model's own tokens).

    The sequence is prompt 1 + reply 1 (+ tool answer ... + reply 2); the mask marks each reply. Raises if the
    pieces disagree with harmony's rendering of the later prompts (so training matches inference exactly).
    """
    tokens: list[int] = []
    mask: list[int] = []
    for call, reply in enumerate(episode.replies):
        prompt = render_prompt(encoding, episode, call)
        if prompt[: len(tokens)] != tokens:
            raise AssertionError(f"the prompt of call {call} does not extend the previous calls' tokens")
        new = prompt[len(tokens):]
        tokens += new
        mask += [0] * len(new)
        out = render_reply(encoding, reply)
        tokens += out
        mask += [1] * len(out)
    return tokens, mask


# -- the compact vocabulary ---------------------------------------------------------------------------------


def build_vocab(token_lists: list[list[int]]) -> dict[str, Any]:
    """vocab_map.json content: sorted o200k ids seen, harmony's specials, and an unknown id (the last one)."""
    seen = set(HARMONY_SPECIAL_IDS)
    for tokens in token_lists:
        seen.update(tokens)
    seen.discard(UNKNOWN_O200K_ID)
    ids = sorted(seen) + [UNKNOWN_O200K_ID]
    return {"o200k_ids": ids, "unknown_id": len(ids) - 1}
