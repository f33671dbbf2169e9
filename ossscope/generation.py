"""Token generation with a KV cache: sampling, stop tokens, streaming, and a per-token record of what the model did.

The loop is: prefill the prompt into a cache; then, each step, sample the next token from the last logits and
feed that one token back. Feeding token t is also when we record what the model did with it (router choices,
sink mass, any hooks asked for), so record row t always means "what the model did when token t was its input".
Every generated token is fed exactly once, the last one included, so its row is complete too.

The forward passes are the model's engine's (`ossscope.engine`: the torch reference or the Triton kernels with
CUDA graphs); this module knows no harmony (`ossscope.chat` parses). Sampling stays on the device and the loop
runs one step ahead of the host: step j+1 is launched before the host reads token j and the record of step j-1
(copied to pinned memory without waiting), so the GPU never waits for the host's bookkeeping, and a token is only
fed once the host knows its row has not stopped: nothing is ever computed speculatively into the cache.

Batches: each row of the cache holds one sequence at its own length (`KVCache`), so prompts of any lengths share
a batch without padding. A row that has stopped is not fed (it keeps its place and writes nothing), and while
`Decoder.run` waits at a yield its caller may put a new prompt in a free row (continuous batching: `generate`
with `batch_size`, `chat.chat_stream`) or feed a row and let it go on (the chat's tool loop).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ossscope.cache import ContextLimitError, KVCache, to_device
from ossscope.engine import Engine, StepRecord, forward_and_capture, router_hook_names, token_axis

__all__ = ["Decoder", "GenerationResult", "GenerationStream", "TokenEvent", "forward_and_capture", "generate",
           "router_hook_names", "sample_next", "token_axis"]
def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from logits [B, V] -> [B] long, on the logits' device, without a host sync.

    temperature 0 is greedy (argmax). Otherwise sample from softmax(logits / temperature), restricted to the
    smallest set of tokens whose probability reaches `top_p` (the most likely token is always kept).
    Sampling is an exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability p_i, in a
    few element-wise passes (torch.multinomial took 235 us for the 201,088-token vocabulary on an H200; this,
    about a fifth of that).
    """
    if not temperature >= 0 or not 0 < top_p <= 1:  # `not >=` refuses NaN too
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        return argmax_rows(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return argmax_rows(probs / race)


def argmax_rows(x: torch.Tensor, chunks: int = 64) -> torch.Tensor:
    """`x.argmax(-1)` for [B, V] (the first index of the maximum, as torch's), in two passes when V is large: one
    pass over V with a single block per row left most of a GPU idle (29 us for 201,088 logits on an H200)."""
    B, V = x.shape
    if V < 16384 or V % chunks:
        return x.argmax(dim=-1)
    best, where = x.view(B, chunks, V // chunks).max(dim=-1)  # per chunk: [B, chunks]
    chunk = best.argmax(dim=-1, keepdim=True)  # the first chunk holding the maximum
    return (chunk * (V // chunks) + where.gather(-1, chunk)).squeeze(-1)


@dataclass
class TokenEvent:
    """One generated token, as streamed. In `generate`, `token` is a model id; in `chat`, an o200k_harmony id.

    `record` holds this token's row for the first sequence: router_indices [L, k], router_weights [L, k],
    sink [L, H] (CPU tensors).
    """

    step: int  # index of this token among the generated ones
    token: int  # the first sequence's token
    text: str
    channel: str  # chat: "analysis", "commentary", "final" or "" (headers and special tokens); generate: ""
    tokens: list[int]  # this step's token for every sequence of the batch (model ids)
    record: dict[str, torch.Tensor] = field(default_factory=dict)
    finished: bool = False  # generation is over (this was the last token)
    tool_call: Any = None  # chat: the ToolCall this <|call|> token made (already run), else None
    sequence: int = 0  # a batch of chats: which conversation this token belongs to


@dataclass
class GenerationResult:
    """What `generate` produced. Per sequence b: `tokens[b]` (model ids, the stop token included),
    `stop_reasons[b]` ("stop", "length", "context" or "interrupted").

    Records, for N = the longest sequence's token count (a shorter row's tail is filler):
    router_indices [B, N, L, k] int64, router_weights [B, N, L, k] float32, sink [B, N, L, H] float32,
    captured[name] [B, N, ...] (token axis moved second; key axes of attention patterns zero-padded).
    """

    prompt_length: int
    tokens: list[list[int]]
    stop_reasons: list[str]
    router_indices: torch.Tensor
    router_weights: torch.Tensor
    sink: torch.Tensor
    captured: dict[str, torch.Tensor]
    sampling: dict[str, Any]
    elapsed_s: float = 0.0
    engine: str = ""
    prompt_lengths: list[int] = field(default_factory=list)  # each prompt's length (a ragged batch's differ)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def texts(self, tokenizer: Any) -> list[str]:
        """Decoded text of each sequence's generated tokens."""
        return [tokenizer.decode(t) for t in self.tokens]


@dataclass
class Step:
    """One decoding step from `Decoder.run`: its index, the tokens fed [B] (model ids; meaningless for rows that
    were not fed), the record of what the model did with them (CPU tensors [B, ...]), whether it was the last step
    of this run, and the Row each fed row belonged to (None: not fed)."""

    index: int
    tokens: list[int]
    record: dict[str, torch.Tensor]
    last: bool
    rows: list[Any] = field(default_factory=list)

    def finished(self) -> list[Any]:
        """The sequences whose last token this step was (they stopped and nothing resumed them)."""
        return [row for row in self.rows if row is not None and row.done and row.fed == len(row.tokens)]


class _HostCopies:
    """Copies small device tensors to the host without waiting for them: `put` enqueues non-blocking copies into
    pinned buffers and records an event; the handle's `take()` waits for that event only, not for the work
    queued after it, and returns CPU tensors.

    Each put takes a slot of buffers that no handle still waits on, and the pool grows when every slot is held:
    a slot reused before its copy is taken would hand that handle another copy's values. (Several rows starting
    at one step each put their first token while the step's own copy is pending; a fixed ring of 4 once
    recorded a later row's first token for an earlier one's.) `release()` frees the slots of handles that will
    never be taken. On the CPU the copies are plain, into the same slots, so CPU tests exercise the pool."""

    def __init__(self, device: torch.device, slots: int = 4) -> None:
        self.cuda = device.type == "cuda"
        self.slots: list[dict[str, Any]] = [{} for _ in range(slots)]
        self.held = [False] * slots  # a handle of slot i has not been taken yet
        self.waited_s = 0.0  # host time spent waiting for copies (near all of it: the GPU is the bound)

    def put(self, tensors: dict[str, torch.Tensor]) -> _Copied:
        index = next((i for i, held in enumerate(self.held) if not held), None)
        if index is None:
            index = len(self.slots)
            self.slots.append({})
            self.held.append(False)
        self.held[index] = True
        slot = self.slots[index]
        out = {}
        for name, t in tensors.items():
            buffer = slot.get(name)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
                buffer = slot[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
            buffer.copy_(t.detach(), non_blocking=self.cuda)
            out[name] = buffer
        event = None
        if self.cuda:
            event = slot.setdefault("_event", torch.cuda.Event())
            event.record()
        return _Copied(out, event, self, index)

    def release(self) -> None:
        """Every slot is free again: the handles not taken yet are abandoned (a decode loop that ended)."""
        self.held = [False] * len(self.slots)


class _Copied:
    def __init__(self, tensors: dict[str, torch.Tensor], event: torch.cuda.Event | None, owner: _HostCopies,
                 index: int) -> None:
        self.tensors, self.event, self.owner, self.index = tensors, event, owner, index
        self.taken: dict[str, torch.Tensor] | None = None

    def take(self) -> dict[str, torch.Tensor]:
        if self.taken is None:
            if self.event is not None:
                started = time.perf_counter()
                self.event.synchronize()
                self.owner.waited_s += time.perf_counter() - started
            self.taken = {name: t.clone() for name, t in self.tensors.items()}  # the slot is reused later
            self.owner.held[self.index] = False
        return self.taken


@dataclass
class Row:
    """One sequence's generation in a row of a Decoder's batch (a row holds one sequence at a time; under
    continuous batching a finished sequence's row takes the next prompt, and this object keeps the old one's).

    tokens: generated model ids (the stop token included); steps: the decoder step of each token (its record is
    `decoder.rows[step]` at this row's `slot`); done: not generating now; stop_reason: why it stopped ("stop",
    "length", "context", or "" while it runs); limit: how many tokens it may have in all; tag: the caller's.
    """

    slot: int
    limit: int
    tag: Any = None
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    done: bool = False
    stop_reason: str = ""
    fed: int = 0  # tokens fed so far (one ahead of `tokens` while a step is in flight)


class Decoder:
    """Incremental generation over one KV cache: the loop behind `generate` and `chat`, batched or not.

    `feed(ids)` appends tokens [B, t] to every row without recording them (a prompt); `start_row(b, ids)` puts a
    new sequence in row b and `feed_row(b, ids)` appends to it (a tool's answer), each row at its own length
    (`KVCache.row`: a prompt runs at batch 1 with batch-1 numerics). `run(max_steps)` samples and feeds tokens,
    yielding a `Step` per decoding step, until no row generates. Rows are `Row` objects (`rows_now[b]`); a row
    stops on a stop token, at its `limit` or when the cache is full, and a stopped row is not fed (it keeps its
    length: `KVCache.only`). While `run` is suspended at a yield, the caller may start, feed or `resume` rows
    (continuous batching; the chat's tool loop), and the loop goes on with them. `records()` / `row_records(row)`
    stack the records; `close()` hands the cache back to the engine.
    """

    def __init__(
        self,
        model: Any,
        batch_size: int = 1,
        max_len: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        capture: Sequence[str] | Callable[[str], bool] = (),
        engine: Engine | None = None,
        cache: KVCache | None = None,
    ):
        if not temperature >= 0 or not 0 < top_p <= 1:  # `not >=` also refuses NaN
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature=}, {top_p=}")
        self.model = model
        self.engine: Engine = engine if engine is not None else model.engine
        self.tokenizer = model.tokenizer
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.temperature, self.top_p = float(temperature), float(top_p)
        # Without a seed, draw one (from torch's global generator) and keep it, so every run can be replayed.
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
        device = model.device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self.stop_tokens = set(self.tokenizer.stop_ids if stop_tokens is None else (int(t) for t in stop_tokens))
        # Extra hooks to keep: names, or a predicate on names; unknown names fail now, with suggestions.
        self.capture = list(dict.fromkeys(model.resolve_hook_names(capture))) if capture else []
        self._owns_cache = cache is None
        if cache is None:
            max_len = max_len or min(4096, config.max_context)
            cache = self.engine.new_cache(batch_size, max_len)
        self.cache = cache
        self.batch_size = cache.batch_size
        self.logits: torch.Tensor | None = None  # [B, V] after the last fed token (on the device)
        self.rows_now = [Row(slot=b, limit=sys.maxsize) for b in range(self.batch_size)]
        self.rows: list[dict[str, torch.Tensor]] = []  # per step: the record [B, ...], on the CPU
        self._token_copies = _HostCopies(device)
        self._record_copies = _HostCopies(device)
        self._running = False
        self._token: torch.Tensor | None = None  # inside `run`: the tokens the next step feeds [B] (device)
        self._next_step = 0
        self._first_tokens: dict[int, dict[int, _Copied]] = {}  # step -> row -> host copy of a row's new token
        self._forgotten = 0  # self.rows[:_forgotten] were dropped (`forget_finished`)
        # Structured Outputs (ossscope.structured.SchemaConstraint): `.apply(logits [B, V], tokens) -> logits`
        # masks before sampling; its mask needs the tokens so far, so a constrained run samples in lockstep.
        self.constraint: Any = None

    # -- rows ---------------------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[list[int]]:
        """Each row's generated tokens (model ids) of the sequence it holds now."""
        return [row.tokens for row in self.rows_now]

    @property
    def done(self) -> list[bool]:
        return [row.done for row in self.rows_now]

    @property
    def waited_s(self) -> float:
        """Host seconds spent waiting for the device's results so far."""
        return self._token_copies.waited_s + self._record_copies.waited_s

    @property
    def room(self) -> int:
        """How many more tokens the cache can take (in its longest row)."""
        return self.cache.room()

    def _ids(self, input_ids: Any, rows: int) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)  # checked on the host: no device sync
        if ids.dim() == 1 and rows == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != rows or ids.shape[1] == 0:
            raise ValueError(f"expected [{rows}, t] token ids (t >= 1), got shape {tuple(ids.shape)}")
        return ids

    def feed(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """Append tokens [B, t] (model ids) to every row without recording them; keeps the last logits."""
        ids = self._ids(input_ids, self.batch_size)
        if ids.shape[1] > self.room:
            raise ContextLimitError(
                f"{ids.shape[1]} tokens do not fit: the cache holds {self.cache.length} of {self.cache.max_len}"
            )
        if self.batch_size > 1 and not self.cache.shared:  # rows at different lengths: one at a time
            for b in range(self.batch_size):
                self.feed_row(b, ids[b])
            return
        logits = self.engine.prefill(ids, self.cache)
        for b in range(self.batch_size):
            self._set_logits(b, logits[b])

    def start_row(self, b: int, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, tag: Any = None
                  ) -> Row:
        """Empty row b and start a new sequence there: its prompt `input_ids` [t], at most `max_new_tokens`
        generated tokens. Returns its Row (which keeps its tokens after the row is reused)."""
        ids = self._startable(b, input_ids)
        self.cache.reset_row(b)
        row = self.rows_now[b] = Row(slot=b, limit=max_new_tokens, tag=tag, done=True)
        self._prefill_row(b, ids)
        row.done = max_new_tokens < 1
        return row

    def start_rows(self, starts: Sequence[tuple[int, Sequence[int], int, Any]]) -> list[Row]:
        """`start_row` for several rows at once, (b, prompt ids, max_new_tokens, tag) each: their prompts prefill
        together, right-padded (`KVCache.padded`), into a scratch cache copied into the rows. One prefill instead
        of one per prompt: on a GPU the host's work to launch a prefill, not the GPU's, is what a short prompt
        costs. Each row computes what it computes alone, up to the rounding of matrix products of another size."""
        if len(starts) <= 1:
            return [self.start_row(*start) for start in starts]
        prompts = [self._startable(b, ids)[0].tolist() for b, ids, _, _ in starts]
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], dtype=torch.long)
        scratch = self.model.new_cache(batch_size=len(starts), max_len=T)
        with scratch.padded(lengths):
            logits = self.engine.prefill(ids, scratch)  # [n, V] at each row's last real token
        rows = to_device([b for b, *_ in starts], self.model.device)
        for big, small in zip(self.cache.layers, scratch.layers, strict=True):
            S = small.slots  # a fresh row's first S slots are the scratch's (same ring order: slot = position % W)
            big.pos[rows] = -1
            big.k[rows, :S], big.v[rows, :S], big.pos[rows, :S] = small.k, small.v, small.pos
        out = []
        for i, (b, _, new, tag) in enumerate(starts):
            self.cache.lengths[b] = lengths[i]
            row = self.rows_now[b] = Row(slot=b, limit=new, tag=tag, done=True)
            self._set_logits(b, logits[i])
            row.done = new < 1
            out.append(row)
        self.cache.shared = False
        return out

    def _startable(self, b: int, input_ids: Any) -> torch.Tensor:
        """A new sequence's prompt as ids [1, t], once row b is known to be free for it and the prompt to fit."""
        ids = self._ids(input_ids, 1)
        if not 0 <= b < self.batch_size:
            raise IndexError(f"row {b} of a batch of {self.batch_size}")
        if not self.rows_now[b].done and self.cache.lengths[b]:
            raise RuntimeError(f"row {b} still generates; wait until it stops")
        if ids.shape[1] >= self.cache.max_len:
            raise ContextLimitError(f"the prompt has {ids.shape[1]} tokens; the cache holds {self.cache.max_len}")
        return ids

    def feed_row(self, b: int, input_ids: Sequence[int] | torch.Tensor) -> None:
        """Append tokens [t] to row b (a tool's answer) without recording them; `resume(b)` lets it go on."""
        ids = self._ids(input_ids, 1)
        if ids.shape[1] > self.cache.room(b):
            raise ContextLimitError(f"{ids.shape[1]} tokens do not fit in row {b}: it holds "
                                    f"{self.cache.lengths[b]} of {self.cache.max_len}")
        self._prefill_row(b, ids)

    def _prefill_row(self, b: int, ids: torch.Tensor) -> None:
        logits = self.engine.prefill(ids, self.cache.row(b))  # [1, V]
        self._set_logits(b, logits[0])

    def _set_logits(self, b: int, logits: torch.Tensor) -> None:
        """Row b's logits after its last fed token. Inside `run`, its next token is sampled from them now and fed
        by the next step in place of the one sampled for it there."""
        if self.logits is None:
            self.logits = torch.zeros(self.batch_size, logits.shape[-1], device=logits.device, dtype=torch.float32)
        self.logits[b] = logits
        if self._running:
            first = self._sample(self._masked(logits[None], self.rows_now[b].tokens, b))  # [1]
            self._token[b] = first[0]
            self._first_tokens.setdefault(self._next_step, {})[b] = self._token_copies.put({"t": first})

    def resume(self, b: int = 0) -> None:
        """Let stopped row b generate again (after a tool's answer was fed)."""
        row = self.rows_now[b]
        if row.limit <= len(row.tokens):
            raise RuntimeError(f"row {b} has used its {row.limit} tokens")
        row.done, row.stop_reason = False, ""

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token per row, on the device [B] (rows that are not fed get a token that is never used)."""
        return sample_next(logits, self.temperature, self.top_p, self.generator)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> Iterator[Step]:
        """Generate until no row generates; `max_steps` (if given) caps each row now in the batch at that many
        more tokens. Rows started or resumed while the loop is suspended at a yield join it."""
        if self.logits is None:
            raise RuntimeError("nothing to continue from: feed a prompt first")
        if self._running:
            raise RuntimeError("this decoder is already running")
        for row in self.rows_now:
            if self.cache.lengths[row.slot] == 0:  # never fed: nothing to continue from
                row.done = True
            elif max_steps is not None and not row.done:
                row.limit = min(row.limit, len(row.tokens) + max_steps)
                if row.limit <= len(row.tokens):
                    row.done, row.stop_reason = True, "length"
            row.fed = len(row.tokens)
        lockstep = self.constraint is not None
        self._running = True
        try:
            self._token = self._sample(self._masked(self.logits, self.tokens[0]))  # t_0 on the device
            self._first_tokens, j = {}, 0
            token_copy = self._token_copies.put({"t": self._token})
            self._next_step = 0
            in_flight: tuple[int, list[int], list[Row | None], _Copied] | None = None  # launched, not handed out
            while True:
                feeding = [row if not row.done else None for row in self.rows_now]  # the host knows t_{j-1}
                launched = any(feeding)
                if launched:  # feed t_j to the rows that go on
                    active = [row is not None for row in feeding]
                    logits, record = self.engine.step(self._token, self.cache, self.capture, active)
                    record_copy = self._record_copies.put(_record_tensors(record))
                    self._next_step = j + 1
                    if not lockstep:
                        self._token = self._sample(logits)  # t_{j+1}, queued behind step j: no waiting
                        next_copy = self._token_copies.put({"t": self._token})
                if in_flight is not None:  # hand out step j-1 (finished on the GPU before t_j was sampled)
                    index, picked, rows, copied = in_flight
                    in_flight = None
                    record = copied.take()
                    self.rows.append(record)
                    for b, row in enumerate(rows):
                        if row is not None:
                            row.tokens.append(picked[b])
                            row.steps.append(index)
                    yield Step(index, picked, record, last=not launched and all(self.done), rows=rows)
                if not launched:
                    if any(not row.done for row in self.rows_now):
                        continue  # the caller started or resumed a row at the last yield
                    return
                picked = token_copy.take()["t"].tolist()  # t_j: on the host since step j-1 ended
                for b, first in self._first_tokens.pop(j, {}).items():
                    picked[b] = int(first.take()["t"][0])  # a row (re)started after t_j was sampled
                for b, row in enumerate(feeding):
                    if row is not None:
                        self._stop_if_over(row, picked[b])
                in_flight = (len(self.rows), picked, feeding, record_copy)
                if lockstep and all(self.done):  # nothing to sample for; a row resumed later samples its own
                    next_copy = token_copy
                elif lockstep:  # the mask for t_{j+1} needs t_j first (row 0 only: chat's constraint)
                    generated = self.rows_now[0].tokens + picked[:1] if feeding[0] is not None else self.tokens[0]
                    self._token = self._sample(self._masked(logits, generated))
                    next_copy = self._token_copies.put({"t": self._token})
                token_copy = next_copy
                j += 1
        finally:
            self._running, self._token = False, None
            self._token_copies.release()  # t_{j+1} and first tokens nobody will read now
            self._record_copies.release()

    def _stop_if_over(self, row: Row, token: int) -> None:
        """Row `row` was fed `token`: stop it on a stop token, at its limit, or when its cache row is full."""
        row.fed += 1
        if token in self.stop_tokens:
            row.done, row.stop_reason = True, "stop"
        elif row.fed >= row.limit:
            row.done, row.stop_reason = True, "length"
        elif self.cache.room(row.slot) < 1:
            row.done, row.stop_reason = True, "context"

    def _masked(self, logits: torch.Tensor, generated: list[int], b: int = 0) -> torch.Tensor:
        """The logits the constraint (if any) allows, given row 0's tokens generated so far."""
        return logits if self.constraint is None or b != 0 else self.constraint.apply(logits, [generated])

    def forget_finished(self) -> None:
        """Drop the records of steps that no row now in the batch still needs (their sequences were read out with
        `row_records`): a long continuous batch keeps memory for its live rows only."""
        live = [row.steps[0] for row in self.rows_now if row.steps and not (row.done and row.fed == len(row.tokens))]
        keep_from = min(live, default=len(self.rows))
        for step in range(self._forgotten, keep_from):
            self.rows[step] = None  # type: ignore[call-overload]
        self._forgotten = max(self._forgotten, keep_from)

    def router_row(self, step: int, b: int = 0) -> dict[str, torch.Tensor]:
        """Sequence b's record for one step: router_indices [L, k], router_weights [L, k], sink [L, H]."""
        row = self.rows[step]
        return {name: row[name][b] for name in ("router_indices", "router_weights", "sink")}

    def close(self) -> None:
        """Hand the cache back to the engine (a pooling engine gives it to the next chat)."""
        if self._owns_cache and self.cache is not None:
            self.engine.release(self.cache)
            self._owns_cache = False

    def row_records(self, row: Row) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One sequence's records, stacked on the CPU: ({router_indices [N, L, k], router_weights [N, L, k],
        sink [N, L, H]}, {name: [N, ...]}) for its N generated tokens."""
        cfg = self.model.config
        L, k, H = self.num_layers, cfg.experts_per_token, cfg.num_attention_heads
        b = row.slot
        if not row.steps:
            return ({"router_indices": torch.zeros(0, L, k, dtype=torch.int64), "router_weights": torch.zeros(0, L, k),
                     "sink": torch.zeros(0, L, H)}, {name: torch.zeros(0) for name in self.capture})
        records = [self.rows[s] for s in row.steps]
        router = {name: torch.stack([r[name][b] for r in records]).to(dtype)
                  for name, dtype in (("router_indices", torch.int64), ("router_weights", torch.float32),
                                      ("sink", torch.float32))}
        captured = {name: _stack_padded([r[name][b : b + 1] for r in records])[0] for name in self.capture}
        return router, captured

    def records(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every step's record, stacked, on the CPU:
        ({router_indices [B, N, L, k], router_weights [B, N, L, k], sink [B, N, L, H]}, {name: [B, N, ...]})."""
        steps = range(len(self.rows))
        if self._forgotten:
            raise RuntimeError("the records of finished sequences were dropped (forget_finished): read each "
                               "sequence with row_records as it finishes")
        cfg = self.model.config
        B, L, k, H = self.batch_size, self.num_layers, cfg.experts_per_token, cfg.num_attention_heads
        if not steps:
            empty = {
                "router_indices": torch.zeros(B, 0, L, k, dtype=torch.int64),
                "router_weights": torch.zeros(B, 0, L, k),
                "sink": torch.zeros(B, 0, L, H),
            }
            return empty, {name: torch.zeros(B, 0) for name in self.capture}

        def stack(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.stack([self.rows[s][name] for s in steps], dim=1).to("cpu", dtype)  # [B, N, L, ...]

        router = {
            "router_indices": stack("router_indices", torch.int64),
            "router_weights": stack("router_weights", torch.float32),
            "sink": stack("sink", torch.float32),
        }
        captured = {name: _stack_padded([self.rows[s][name] for s in steps]) for name in self.capture}
        return router, captured


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack [B, ...] tensors along a new axis 1, zero-padding trailing axes that grow (attention keys)."""
    shape = torch.Size(max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim()))
    return torch.stack([_pad_to(t, shape) for t in tensors], dim=1).cpu()


class GenerationStream:
    """Iterator of `TokenEvent`s from `generate(..., stream=True)`; `.result` is the result so far (also after
    the consumer stops early)."""

    def __init__(self, events: Iterator[TokenEvent], result: Callable[[], GenerationResult]):
        self._events = events
        self._result = result

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> TokenEvent:
        return next(self._events)

    @property
    def result(self) -> GenerationResult:
        return self._result()


def generate(
    model: Any,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] | None = None,
    stream: bool = False,
    capture: Sequence[str] | Callable[[str], bool] = (),
    on_token: Callable[[TokenEvent], None] | None = None,
    engine: Engine | None = None,
    batch_size: int | None = None,
) -> GenerationResult | GenerationStream:
    """Generate up to `max_new_tokens` tokens after each prompt (model ids) with a KV cache.

    `input_ids`: [B, T] or [T], or a list of prompts of any lengths (a ragged batch: each row at its own
    positions, prefilled at batch 1, so every row gets what it would get alone). With `batch_size` smaller than
    the number of prompts, that many rows run at once and a finished row takes the next prompt (continuous
    batching). temperature 0 is greedy; otherwise temperature / top-p sampling from a generator seeded with
    `seed` (drawn and reported in `result.sampling` when None). A sequence stops after a token in `stop_tokens`
    (default: harmony's <|return|> and <|call|>; pass () for none).
    Returns a GenerationResult, or with stream=True a GenerationStream of TokenEvents (events are for the first
    prompt). `capture` names extra hooks to record per generated token; `on_token(event)` is called for every
    token of the first prompt. `engine` defaults to the model's (`model.engine`).
    """
    prompts = _prompt_list(input_ids)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = model.config.max_context
    longest = max(len(p) for p in prompts)
    if limit <= longest:
        raise ContextLimitError(f"the prompt has {longest} tokens; the model's context limit is {limit}")
    B = len(prompts)
    rows_at_once = B if batch_size is None else batch_size
    if rows_at_once < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows_at_once = min(rows_at_once, B)
    decoder = Decoder(
        model,
        batch_size=rows_at_once,
        max_len=min(limit, longest + max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_tokens=stop_tokens,
        capture=capture,
        engine=engine,
    )
    started = time.perf_counter()
    sequences: list[Row | None] = [None] * B
    records: dict[int, tuple[dict, dict]] = {}
    waiting = iter(range(B))

    def start_next(b: int) -> None:
        i = next(waiting, None)
        if i is not None:
            sequences[i] = decoder.start_row(b, prompts[i], max_new_tokens, tag=i)

    def events() -> Iterator[TokenEvent]:
        try:
            if rows_at_once == B and len({len(p) for p in prompts}) == 1:
                decoder.feed(prompts)  # one prompt length: the whole batch in one prefill
                for b in range(B):
                    sequences[b] = decoder.rows_now[b]
                    sequences[b].tag, sequences[b].limit = next(waiting), max_new_tokens
            else:
                for b in range(rows_at_once):
                    start_next(b)
            for step in decoder.run():
                first = step.rows[0] if step.rows else None
                if first is not None and first.tag == 0:
                    event = TokenEvent(
                        step=len(first.tokens) - 1,
                        token=step.tokens[0],
                        text=decoder.tokenizer.token_texts([step.tokens[0]])[0],
                        channel="",
                        tokens=step.tokens,
                        record=decoder.router_row(step.index, 0),
                        finished=first.done and first.fed == len(first.tokens),
                    )
                    if on_token is not None:
                        on_token(event)
                    yield event
                for row in step.finished():
                    records[row.tag] = decoder.row_records(row)
                    start_next(row.slot)
                if rows_at_once < B:
                    decoder.forget_finished()
        finally:
            decoder.close()

    def result() -> GenerationResult:
        cfg = model.config
        L, k, H = cfg.num_hidden_layers, cfg.experts_per_token, cfg.num_attention_heads
        per_prompt = []
        for i, row in enumerate(sequences):
            if row is not None and i not in records:
                records[i] = decoder.row_records(row)  # stopped early (an interrupted stream)
            per_prompt.append(records.get(i))
        N = max([len(row.tokens) for row in sequences if row is not None] + [0])
        router = {"router_indices": torch.zeros(B, N, L, k, dtype=torch.int64),
                  "router_weights": torch.zeros(B, N, L, k), "sink": torch.zeros(B, N, L, H)}
        for i, pair in enumerate(per_prompt):
            if pair is not None:
                n = pair[0]["router_indices"].shape[0]
                for name, value in pair[0].items():
                    router[name][i, :n] = value
        captured: dict[str, torch.Tensor] = {}
        for name in decoder.capture:  # [B, N, ...], trailing axes padded to the widest (attention keys grow)
            values = [pair[1][name] for pair in per_prompt if pair is not None and pair[1][name].dim() > 1]
            if not values:
                captured[name] = torch.zeros(B, N)
                continue
            trailing = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
            captured[name] = torch.zeros(B, N, *trailing, dtype=values[0].dtype)
            for i, pair in enumerate(per_prompt):
                if pair is not None and pair[1][name].dim() > 1:
                    value = pair[1][name]
                    captured[name][i, : value.shape[0]] = _pad_to(value, torch.Size(trailing))
        reasons = []
        for row in sequences:
            if row is None:
                reasons.append("interrupted")
            elif row.done and row.fed == len(row.tokens):
                reasons.append(row.stop_reason or "stop")
            else:
                reasons.append("interrupted")
        return GenerationResult(
            prompt_length=len(prompts[0]),
            tokens=[list(row.tokens) if row is not None else [] for row in sequences],
            stop_reasons=reasons,
            **router,
            captured=captured,
            sampling={
                "temperature": decoder.temperature,
                "top_p": decoder.top_p,
                "seed": decoder.seed,
                "max_new_tokens": max_new_tokens,
                "stop_tokens": sorted(decoder.stop_tokens),
                "batch_size": rows_at_once,
            },
            elapsed_s=time.perf_counter() - started,
            engine=decoder.engine.name,
            prompt_lengths=[len(p) for p in prompts],
        )

    if stream:
        return GenerationStream(events(), result)
    for _ in events():
        pass
    return result()


def _prompt_list(input_ids: Any) -> list[list[int]]:
    """Prompts as lists of ids: from [B, T] or [T] (tensor or nested lists), or a list of lists of any lengths."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.detach().cpu()
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(ids.shape)}")
        return ids.tolist()
    items = list(input_ids)
    if not items:
        raise ValueError("no prompts given")
    if all(isinstance(t, (int,)) or (isinstance(t, torch.Tensor) and t.dim() == 0) for t in items):
        items = [items]
    prompts = []
    for i, prompt in enumerate(items):
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]  # a batch of one, as model(...) takes it
            if prompt.dim() != 1:
                raise ValueError(f"prompt {i} must be 1-D token ids (or [1, T]), got shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} has no tokens")
        prompts.append(ids)
    return prompts


def _pad_to(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zero-pad [N, ...] trailing axes up to `shape` (attention patterns over a growing cache)."""
    pad = []
    for d in reversed(range(1, value.dim())):
        pad += [0, shape[d - 1] - value.shape[d]]
    return torch.nn.functional.pad(value, pad) if any(pad) else value


def _record_tensors(record: StepRecord) -> dict[str, torch.Tensor]:
    """A StepRecord as one flat dict (router_indices, router_weights, sink, then each captured hook)."""
    return {"router_indices": record.router_indices, "router_weights": record.router_weights, "sink": record.sink,
            **record.captured}
