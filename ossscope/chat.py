"""`model.chat(...)`: a harmony conversation with the tool loop, recorded token by token into a `Trace`.

One chat is one KV cache. The prompt is rendered and prefilled; the model generates until it ends its turn.
If it ended with `<|call|>` to `functions.NAME`, we parse the JSON arguments, call the Python function, feed
the tool's answer (`<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>...<|end|>`) and
`<|start|>assistant`, and let it continue, until a final answer (`<|return|>`), the token budget, the tool-call
budget or the context runs out. Everything the model produces is kept, malformed or not: problems land in
`Trace.parse_errors` and in each `ToolCall.error` (which is also what the model is told), never in an exception.

harmony's built-in tools (`browser.*`, `python`: `ossscope.tools`) go through the same loop: `_run_tool` hands
their calls to `ossscope.tools.base.run_builtin`, and they answer on the call's channel. With a response format,
`ossscope.structured` holds the final message to its schema (the Decoder masks the logits before sampling).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from ossscope import harmony, structured, toolcall
from ossscope import tokenizer as tk
from ossscope.cache import ContextLimitError
from ossscope.engine import Engine
from ossscope.generation import Decoder, TokenEvent
from ossscope.tools import base as builtin_tools
from ossscope.trace import ToolCall, Trace

TOOL_RESERVE = 4096  # cache room kept for tool answers beyond the prompt and the generation budget


class ChatStream:
    """Iterator of `TokenEvent`s (o200k_harmony ids) from `chat(..., stream=True)`.

    `.trace` is the Trace of everything so far: complete after the last event, partial if the consumer stops
    early (a Stop button), in which case its metadata says stop_reason "interrupted".
    """

    def __init__(self, run: _ChatRun):
        self._run = run
        self._events = run.events()

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop generating (the trace keeps what was made)."""
        self._events.close()

    @property
    def trace(self) -> Trace:
        return self._run.trace()


def chat(
    model: Any,
    messages_or_text: str | Sequence[Any],
    reasoning: str = "medium",
    developer: str | None = None,
    tools: Iterable[Any] | None = None,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
    capture: Sequence[str] | Callable[[str], bool] = (),
    on_token: Callable[[TokenEvent], None] | None = None,
    response_format: dict[str, Any] | None = None,
    max_tool_calls: int = 8,
    model_identity: str | None = None,
    date: str | None = None,
    engine: Engine | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Trace | ChatStream | list[Trace]:
    """Talk to the model in harmony and return the Trace of what it generated and did inside.

    messages_or_text: a user message, or a list of messages (dicts with role/content[/channel/recipient/name],
        e.g. a previous `trace.messages` plus a new user turn). A list of conversations (each a string or a
        list of messages) runs them as one batch and returns a list of Traces (`chat_many`; `batch_size` rows at
        once, default all; `progress`: a bar of the chats finished, shown by default for a list).
    reasoning: "low" | "medium" | "high", written into the system message.
    developer: developer instructions. tools: Python functions the model may call (schema from the signature,
        type hints and docstring), and harmony's built-in tools `ossscope.tools.Browser(corpus)` / `Python()`
        (declared in the system message; their state, the browser's pages and the kernel, outlives the chat).
        response_format: {"name", "schema"} for structured output.
    max_new_tokens: budget of generated tokens for the whole chat (all turns of the tool loop).
    temperature 0 is greedy; the default 1.0 / top_p 1.0 is gpt-oss's recommended sampling. seed: drawn and
        recorded in trace.metadata when None, so any chat can be replayed.
    capture: extra hook names (or a predicate) to record per generated token, into trace.captured.
    stream: return a ChatStream of token events instead (its .trace holds the Trace); on_token(event) is
        called for every token either way.
    engine: what runs the forward passes; default `model.engine` (chosen at load: the Triton kernels with CUDA
        graphs on a GPU, the torch reference elsewhere; `ossscope.engine`).
    """
    if is_conversation_list(messages_or_text):
        if stream:
            raise ValueError("stream=True takes one conversation; for a list, use on_token (event.sequence says "
                             "which conversation a token belongs to)")
        return chat_many(
            model, messages_or_text, reasoning=reasoning, developer=developer, tools=tools,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, capture=capture,
            on_token=on_token, response_format=response_format, max_tool_calls=max_tool_calls,
            model_identity=model_identity, date=date, engine=engine, batch_size=batch_size, progress=progress,
        )  # fmt: skip
    run = _ChatRun(
        model, messages_or_text, reasoning, developer, tools, max_new_tokens, temperature, top_p, seed, capture,
        on_token, response_format, max_tool_calls, model_identity, date, engine,
    )  # fmt: skip
    if stream:
        return ChatStream(run)
    for _ in run.events():
        pass
    return run.trace()


def is_conversation_list(value: Any) -> bool:
    """Whether `value` is a list of conversations (strings or lists of messages) rather than one conversation."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        return False
    return all(isinstance(item, str) or (isinstance(item, Sequence) and not isinstance(item, bytes))
               for item in value)


def chat_many(
    model: Any,
    conversations: Sequence[str | Sequence[Any]],
    batch_size: int | None = None,
    on_trace: Callable[[int, Trace], None] | None = None,
    progress: bool | None = None,
    **options: Any,
) -> list[Trace]:
    """Chat every conversation, `batch_size` at once (default: all) through one batched decoder, and return their
    Traces in order. Each conversation runs in its own row at its own length (prefilled at batch 1, so it gets
    what it gets alone, up to sampling: one generator serves the batch, seeded once); a conversation that ends
    frees its row for the next (continuous batching), and a tool call runs while the other rows wait one step.
    `options` are `chat`'s; `on_trace(index, trace)` is called as each conversation finishes; `progress`
    (default: for more than one conversation) shows a bar of the chats finished.
    """
    conversations = list(conversations)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    traces: list[Trace | None] = [None] * len(conversations)
    from tqdm.auto import tqdm

    show = len(conversations) > 1 if progress is None else progress
    bar = tqdm(total=len(conversations), desc="chats", unit="chat", leave=False, disable=not show)

    def keep(i: int, trace: Trace) -> None:
        traces[i] = trace
        bar.update(1)
        if on_trace is not None:
            on_trace(i, trace)

    def fail(i: int, exc: BaseException) -> None:
        raise exc

    try:
        chat_stream(model, ((i, c, {}) for i, c in enumerate(conversations)),
                    min(batch_size or len(conversations), max(1, len(conversations))), keep, fail, **options)
    finally:
        bar.close()
    return [trace for trace in traces if trace is not None]


def chat_stream(
    model: Any,
    jobs: Iterable[tuple[Any, str | Sequence[Any], dict[str, Any]]],
    batch_size: int,
    on_trace: Callable[[Any, Trace], None],
    on_error: Callable[[Any, BaseException], None],
    max_len: int | None = None,
    prefill_together: bool | None = None,
    **options: Any,
) -> None:
    """The loop under `chat_many` and `collect --batch-size`: jobs (key, conversation, per-job options: reasoning,
    developer, max_new_tokens, max_tool_calls) are taken one at a time, as rows free up, so a caller can claim
    work lazily. `on_trace(key, trace)` gets each finished chat; a job whose prompt cannot run (rendering, or
    longer than the cache) goes to `on_error(key, exc)` and the batch goes on. The cache holds `max_len` tokens
    a row (default: the first batch's longest need); `options` are `chat`'s, shared by every job.
    `prefill_together` (default: on a GPU) refills freed rows in groups with one padded prefill.
    """
    options = {**_CHAT_DEFAULTS, **options}
    if options["response_format"] is not None:
        raise ValueError("response_format with a list of conversations is not supported (the grammar runs on one "
                         "sequence); chat them one at a time")
    pending = iter(jobs)

    def make_run(item: tuple[Any, Any, dict]) -> _ChatRun:
        key, conversation, own = item
        o = {**options, **own}
        return _ChatRun(model, conversation, o["reasoning"], o["developer"], o["tools"], o["max_new_tokens"],
                        o["temperature"], o["top_p"], o["seed"], o["capture"], o["on_token"], None,
                        o["max_tool_calls"], o["model_identity"], o["date"], o["engine"], shared=True)

    def next_run() -> tuple[Any, _ChatRun] | None:
        for item in pending:
            try:
                return item[0], make_run(item)
            except Exception as exc:  # noqa: BLE001 - one bad prompt must not end the batch
                on_error(item[0], exc)
        return None

    first = [run for run in (next_run() for _ in range(batch_size)) if run is not None]
    if not first:
        return
    rows = len(first)
    if max_len is None:
        max_len = max(run.max_len for _, run in first)
    decoder = Decoder(model, batch_size=rows, max_len=max_len, temperature=options["temperature"],
                      top_p=options["top_p"], seed=options["seed"], capture=options["capture"],
                      engine=options["engine"])
    keys: dict[int, Any] = {}
    runs: dict[int, _ChatRun] = {}
    started_at: dict[int, float] = {}
    count = [0]
    # On a GPU a short prompt's prefill costs the host's launches, not the GPU's work: rows that free up are
    # refilled in groups (one padded prefill: Decoder.start_rows), once an eighth of the batch is free or
    # nothing else generates. On a CPU each row is refilled at once, alone.
    together = model.device.type == "cuda" if prefill_together is None else prefill_together
    admit_at = max(1, rows // 8) if together else 1

    def admit(slots: list[int], jobs: list[tuple[Any, _ChatRun]] | None = None) -> None:
        if jobs is None:
            jobs = [job for job in (next_run() for _ in slots) if job is not None]
        starts = []
        for key, run in jobs:
            if len(run.prompt_ids) >= decoder.cache.max_len:  # one that cannot fit fails alone
                on_error(key, ContextLimitError(f"the prompt has {len(run.prompt_ids)} tokens; this batch's "
                                                f"cache holds {decoder.cache.max_len}"))
                continue
            n = count[0]
            count[0] += 1
            run.decoder, run.sequence = decoder, n
            keys[n], runs[n], started_at[n] = key, run, time.perf_counter()
            starts.append((slots[len(starts)], run.prompt_ids, run.max_new_tokens, n))
        made = decoder.start_rows(starts) if together else [decoder.start_row(*start) for start in starts]
        for row in made:
            runs[row.tag].start(row)

    def finish(n: int) -> None:
        run = runs.pop(n)
        run.elapsed = time.perf_counter() - started_at.pop(n)
        run.metadata_extra["batch"] = {"rows": rows, "index": n}
        on_trace(keys.pop(n), run.trace())

    try:
        admit(list(range(rows)), first)
        if not runs:
            return
        free: list[int] = []
        for step in decoder.run():
            for row in step.rows:
                if row is not None:
                    runs[row.tag].on_step(step)
            for row in step.finished():
                finish(row.tag)
                free.append(row.slot)
            if free:
                decoder.forget_finished()  # records of finished chats are in their traces now
            if free and (len(free) >= admit_at or all(decoder.done)):
                admit(free)
                free = [b for b in free if decoder.done[b]]  # rows no job was left for
    except Exception as exc:
        for n in list(runs):  # the batch failed: every chat still in it failed with it
            runs.pop(n)
            on_error(keys.pop(n), exc)
        raise
    finally:
        decoder.close()


_CHAT_DEFAULTS: dict[str, Any] = dict(
    reasoning="medium", developer=None, tools=None, max_new_tokens=1024, temperature=1.0, top_p=1.0, seed=None,
    capture=(), on_token=None, response_format=None, max_tool_calls=8, model_identity=None, date=None, engine=None,
)


class _ChatRun:
    """The state of one chat: the decoder, the turns, the tool calls; builds the Trace at any moment."""

    def __init__(
        self, model, messages_or_text, reasoning, developer, tools, max_new_tokens, temperature, top_p, seed,
        capture, on_token, response_format, max_tool_calls, model_identity, date, engine, shared=False,
    ):  # fmt: skip
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = model.tokenizer
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the model has {model.config.vocab_size} token ids but its tokenizer needs "
                f"{self.tokenizer.vocab_size}: a model with a small vocabulary needs a vocab_map (vocab_map.json) "
                "to speak harmony"
            )
        self.reasoning = str(reasoning).lower()
        self.builtins, tools = builtin_tools.split_tools(tools)  # harmony's browser/python (ossscope.tools)
        self.tools = {tool.name: tool for tool in harmony.as_tools(tools)}
        self.max_new_tokens = max_new_tokens
        self.max_tool_calls = max_tool_calls
        self.on_token = on_token
        self.inputs = _input_messages(messages_or_text, developer)
        self.prompt = harmony.render_prompt(
            messages_or_text, reasoning, developer, list(self.tools.values()), response_format, model_identity, date,
            builtin_tools=builtin_tools.tool_configs(self.builtins),
        )
        self.prompt_ids = self.tokenizer.to_model(self.prompt)
        limit = model.config.max_context
        if len(self.prompt) >= limit:
            raise ContextLimitError(f"the prompt has {len(self.prompt)} tokens; the model's context limit is {limit}")
        # a model may call a tool it was not given: room to say so
        reserve = TOOL_RESERVE if self.tools or self.builtins else 512
        self.max_len = min(limit, len(self.prompt) + max_new_tokens + reserve)
        self.decoder: Decoder | None = None  # a batch of chats shares one (`chat_many` sets it)
        if not shared:
            self.decoder = Decoder(model, batch_size=1, max_len=self.max_len, temperature=temperature, top_p=top_p,
                                   seed=seed, capture=capture, engine=engine)
        # The harmony parser of each assistant turn, fed token by token as they come (the trace reuses them).
        self.parsers = [harmony.HarmonyStreamParser(role="assistant", offset=0)]
        self.channels: list[str] = []
        # Structured Outputs: the final message held to the response format's schema (ossscope.structured)
        constraint, self.structured_note = structured.constraint_for(
            response_format, self.tokenizer, model.config.vocab_size
        )
        if constraint is not None and shared:
            raise ValueError("response_format with a list of conversations is not supported (the grammar runs on "
                             "one sequence); chat them one at a time")
        if self.decoder is not None:
            self.decoder.constraint = constraint
        self.sequence = 0  # this chat's index in a batch of chats
        self.row: Any = None  # the decoder row (generation.Row) this chat generates in, once started
        self.turn_starts = [0]  # index into the generated tokens where each assistant turn starts
        self.tool_calls: list[ToolCall] = []
        self.inserts: list[dict[str, Any]] = []  # tool answers fed to the model: after which token, which tokens
        self.stop_reason = "interrupted"
        self.problems: list[str] = []  # not parse problems of the text: the tool loop's own (budget, context)
        self.metadata_extra = {"response_format": response_format, "developer": developer}
        self.elapsed = 0.0

    # -- the loop ---------------------------------------------------------------------------------------
    def events(self) -> Iterator[TokenEvent]:
        started = time.perf_counter()
        decoder = self.decoder
        try:
            decoder.feed([self.prompt_ids])
            self.start(decoder.rows_now[0])
            for step in decoder.run():
                event = self.on_step(step)
                yield event
                if event.finished:
                    return
        finally:
            self.elapsed += time.perf_counter() - started
            decoder.close()

    def start(self, row: Any) -> None:
        """This chat generates in `row` (a generation.Row of its decoder) from now on."""
        self.row = row
        row.limit = self.max_new_tokens

    def on_step(self, step: Any) -> TokenEvent:
        """This chat's token of a decoder step: parse it, and at the end of a turn finish or run the tool (its
        answer is fed to this chat's row, which resumes)."""
        row, decoder = self.row, self.decoder
        b = row.slot
        model_id = step.tokens[b]
        index = len(row.tokens) - 1
        token = self.tokenizer.to_o200k([model_id])[0]
        self.channels.append(self.parsers[-1].feed(token))
        call = None
        if row.done and row.fed == len(row.tokens):  # the row stopped at this token
            if row.stop_reason == "stop":
                call = self._end_of_turn(token, index)
            else:  # the budget or the cache ran out mid-turn
                self.stop_reason = row.stop_reason
                if self.stop_reason == "context":
                    self.problems.append("the context is full")
        event = TokenEvent(
            step=index,
            token=token,
            text=self.tokenizer.token_texts_o200k([token])[0],
            channel=self.channels[index],
            tokens=[model_id],
            record=decoder.router_row(step.index, b),
            finished=self.stop_reason != "interrupted",
            tool_call=call,
            sequence=self.sequence,
        )
        if self.on_token is not None:
            self.on_token(event)
        return event

    def _end_of_turn(self, token: int, index: int) -> ToolCall | None:
        """The model stopped (<|return|> or <|call|>): finish, or run the tool and open the next turn."""
        if token != tk.CALL:
            self.stop_reason = "return"
            return None
        parser = self.parsers[-1]
        message = parser.messages[-1] if parser.messages else None
        if message is None or message["token_range"][1] != index + 1:
            self.problems.append(f"token {index}: <|call|> ends no message; nothing to call")
            self.stop_reason = "call_without_message"
            return None
        if len(self.tool_calls) >= self.max_tool_calls:
            self.problems.append(f"token {index}: more than {self.max_tool_calls} tool calls; stopped")
            self.stop_reason = "tool_limit"
            return None
        call = self._run_tool(message, index)
        self.tool_calls.append(call)
        answer = call.result if call.error is None else json.dumps({"error": call.error})
        recipient = message["recipient"] or f"functions.{call.name}"
        channel = builtin_tools.answer_channel(self.builtins, message)  # built-in tools answer on the call's
        try:
            tokens = harmony.render_tool_result(recipient, answer, channel)
        except tk.EncodeError as exc:  # a built-in tool's answer the encoder refuses: told to the model instead
            call.result, call.error = None, f"the tool's answer cannot be read: {exc}"
            answer = json.dumps({"error": call.error})
            tokens = harmony.render_tool_result(recipient, answer, channel)
        b = self.row.slot
        if len(tokens) > self.decoder.cache.room(b) - 1:
            self.problems.append(f"token {index}: the answer of {recipient} ({len(tokens)} tokens) does not fit")
            self.stop_reason = "context"
            return call
        if len(self.row.tokens) >= self.row.limit:
            self.stop_reason = "length"  # the answer would open a turn with no token left to generate
            return call
        self.decoder.feed_row(b, self.tokenizer.to_model(tokens))
        self.inserts.append({"after": index, "tokens": tokens, "recipient": recipient, "channel": channel})
        self.decoder.resume(b)
        self.parsers.append(harmony.HarmonyStreamParser(role="assistant", offset=index + 1))
        self.turn_starts.append(index + 1)
        return call

    def _run_tool(self, message: dict[str, Any], index: int) -> ToolCall:
        """Call the Python function named by the message; every failure becomes `error` (told to the model)."""
        recipient = message["recipient"] or ""
        builtin = builtin_tools.builtin_for(self.builtins, recipient)  # browser.* / python: ossscope.tools
        if builtin is not None:
            return builtin_tools.run_builtin(builtin, message, index)
        namespace, _, name = recipient.partition(".")
        call = ToolCall(name=name or recipient, arguments=message["content"], token_index=index)
        if not recipient:
            call.error = "the call names no recipient (expected to=functions.NAME)"
            return call
        tool = self.tools.get(name) if namespace == "functions" else None
        if tool is None:
            available = ", ".join([f"functions.{n}" for n in self.tools] + list(self.builtins)) or "none"
            call.error = f"unknown tool {recipient!r}; available tools: {available}"
            return call
        text = message["content"].strip()
        try:
            args = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            call.error = f"arguments are not valid JSON ({exc.msg} at character {exc.pos}): {text[:200]!r}"
            return call
        problems = harmony.check_arguments(tool.parameters, args)
        if problems:
            call.error = "bad arguments: " + "; ".join(problems)
            return call
        call.parsed_arguments = args
        if tool.fn is None:
            call.error = f"{recipient} has no Python function behind it"
            return call
        try:  # raised, timed out, or no text/JSON form: the model is told why
            answer = toolcall.answer_text(toolcall.run_with_timeout(tool.fn, args, tool.timeout_s))
        except toolcall.ToolError as exc:
            call.error = str(exc)
            return call
        try:  # rendered now so that an answer the encoder refuses is an error, not a crash (cached for the feed)
            harmony.render_tool_result(recipient, answer)
        except tk.EncodeError as exc:
            call.error = f"the tool's answer cannot be read: {exc}"
            return call
        call.result = answer
        return call

    # -- the record -------------------------------------------------------------------------------------
    def trace(self) -> Trace:
        decoder = self.decoder
        model_ids = list(self.row.tokens) if self.row is not None else []
        tokens = self.tokenizer.to_o200k(model_ids)
        messages = [dict(m, source="prompt", token_range=None) for m in self.inputs]
        errors: list[str] = []
        for turn, live in enumerate(self.parsers):
            parser = live.copy()  # finishing closes an open message: keep the live parser as it is
            messages += [dict(m, source="model") for m in parser.finish()]
            errors += parser.errors
            if turn < len(self.inserts):
                insert = self.inserts[turn]
                call = self.tool_calls[turn]
                content = call.result if call.error is None else json.dumps({"error": call.error})
                channel = insert.get("channel", "commentary")
                messages.append({"role": "tool", "name": insert["recipient"], "channel": channel,
                                 "recipient": "assistant", "content": content, "source": "tool",
                                 "token_range": None, "after": insert["after"]})  # fmt: skip
        produced = [m for m in messages if m["source"] == "model"]
        analysis = "\n\n".join(m["content"] for m in produced if m["channel"] == "analysis")
        final = "\n\n".join(m["content"] for m in produced if m["channel"] == "final")
        if self.row is not None:
            router, captured = decoder.row_records(self.row)
        else:
            router, captured = decoder.records()
            router = {name: value[0] for name, value in router.items()}
            captured = {name: value[0] for name, value in captured.items()}
        T = len(tokens)
        return Trace(
            prompt_tokens=list(self.prompt),
            tokens=tokens,
            channels=list(self.channels[:T]),
            token_texts=self.tokenizer.token_texts_o200k(tokens),
            messages=messages,
            analysis=analysis,
            final=final,
            tool_calls=list(self.tool_calls),
            router_indices=router["router_indices"],
            router_weights=router["router_weights"],
            sink=router["sink"],
            captured=captured,
            reasoning=self.reasoning,
            parse_errors=errors + self.problems,
            prompt_token_texts=self.tokenizer.token_texts_o200k(self.prompt),
            metadata=self._metadata(T),
        )

    def _metadata(self, T: int) -> dict[str, Any]:
        model, config, decoder = self.model, self.model.config, self.decoder
        steering = getattr(model, "active_steering", {}) or {}
        unknown = 0
        if self.tokenizer.is_compact:
            unknown = sum(1 for t in self.prompt if not self.tokenizer.in_vocab(t))
        return {
            "model": getattr(model, "name", type(model).__name__),
            "num_layers": config.num_hidden_layers,
            "num_experts": config.num_experts,
            "experts_per_token": config.experts_per_token,
            "num_heads": config.num_attention_heads,
            "vocab_size": config.vocab_size,
            "sliding_layers": [config.is_sliding(layer) for layer in range(config.num_hidden_layers)],
            "sliding_window": config.sliding_window,
            "device": str(getattr(model, "device", "")),
            "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
            "reasoning": self.reasoning,
            "sampling": {
                "temperature": decoder.temperature,
                "top_p": decoder.top_p,
                "seed": decoder.seed,
                "max_new_tokens": self.max_new_tokens,
            },
            "ablation": _jsonable(getattr(model, "active_ablation", {}) or {}),
            "steering": {str(layer): float(torch.linalg.vector_norm(v.float())) for layer, v in steering.items()},
            "tools": list(self.tools),
            "builtin_tools": list(self.builtins),
            "structured": decoder.constraint.record() if decoder.constraint is not None else self.structured_note,
            "response_format": self.metadata_extra["response_format"],
            "developer": self.metadata_extra["developer"],
            "stop_reason": self.stop_reason,
            "engine": decoder.engine.describe(),
            "tool_inserts": [{"after": i["after"], "tokens": list(i["tokens"])} for i in self.inserts],
            "prompt_tokens_outside_vocab": unknown,
            "elapsed_s": round(self.elapsed, 4),
            "tokens_per_s": round(T / self.elapsed, 2) if self.elapsed > 0 else None,
            "ossscope_version": _version(),
            **({"batch": self.metadata_extra["batch"]} if "batch" in self.metadata_extra else {}),
        }


def _input_messages(messages_or_text: str | Sequence[Any], developer: str | None) -> list[dict[str, Any]]:
    """The conversation as given (before generation), as plain dicts for Trace.messages."""
    items = [{"role": "user", "content": messages_or_text}] if isinstance(messages_or_text, str) else messages_or_text
    if not isinstance(items, Sequence) or isinstance(items, bytes):
        raise TypeError(f"a conversation is a string or a list of messages, got {type(items).__name__}")
    out = [{"role": "developer", "content": developer}] if developer else []
    for number, item in enumerate(items):
        if not isinstance(item, dict) and not hasattr(item, "to_dict"):
            raise ValueError(
                f"message {number} of the conversation is a {type(item).__name__} ({str(item)[:40]!r}): a message is "
                "a dict with 'role' and 'content' or an openai-harmony Message; for several conversations pass a "
                "list of strings or of message lists")
        if isinstance(item, dict):
            clean = {key: item.get(key) for key in ("role", "channel", "recipient", "content_type", "name")}
            clean["content"] = harmony._text_of(item.get("content", ""))
            out.append({key: value for key, value in clean.items() if value is not None})
        else:  # an openai-harmony Message
            data = item.to_dict()
            text = "".join(part.get("text", "") for part in data.get("content", []) if isinstance(part, dict))
            out.append({"role": data.get("role"), "content": text, "channel": data.get("channel")})
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _version() -> str:
    from ossscope import __version__

    return __version__
