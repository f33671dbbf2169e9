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

Batches: every row of `input_ids` must have the same length (no padding or attention masks). A row that has
stopped keeps being fed its stop token until all rows stop; only its first `lengths[b]` tokens count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ossscope.cache import ContextLimitError, KVCache
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

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def texts(self, tokenizer: Any) -> list[str]:
        """Decoded text of each sequence's generated tokens."""
        return [tokenizer.decode(t) for t in self.tokens]


@dataclass
class Step:
    """One token per sequence from `Decoder.run`: its index, the tokens fed [B] (model ids; a stopped row repeats
    its last token), the record of what the model did with them (CPU tensors [B, ...]), and whether it was the
    last step of this run."""

    index: int
    tokens: list[int]
    record: dict[str, torch.Tensor]
    last: bool


class _HostCopies:
    """Copies small device tensors to the host without waiting for them: `put` enqueues non-blocking copies into
    pinned buffers (a ring of slots, so the steps in flight don't overwrite each other) and an event; the handle's
    `take()` waits for that event only, not for the work queued after it, and returns CPU tensors."""

    def __init__(self, device: torch.device, slots: int = 4) -> None:
        self.cuda = device.type == "cuda"
        self.slots: list[dict[str, Any]] = [{} for _ in range(slots)]
        self.next = 0
        self.waited_s = 0.0  # host time spent waiting for copies (near all of it: the GPU is the bound)

    def put(self, tensors: dict[str, torch.Tensor]) -> _Copied:
        if not self.cuda:
            return _Copied({name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}, None)
        slot = self.slots[self.next]
        self.next = (self.next + 1) % len(self.slots)
        out = {}
        for name, t in tensors.items():
            buffer = slot.get(name)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
                buffer = slot[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buffer.copy_(t, non_blocking=True)
            out[name] = buffer
        event = slot.setdefault("_event", torch.cuda.Event())
        event.record()
        return _Copied(out, event, self)


class _Copied:
    def __init__(self, tensors: dict[str, torch.Tensor], event: torch.cuda.Event | None,
                 owner: _HostCopies | None = None) -> None:
        self.tensors, self.event, self.owner = tensors, event, owner

    def take(self) -> dict[str, torch.Tensor]:
        if self.event is None:
            return self.tensors
        started = time.perf_counter()
        self.event.synchronize()
        self.owner.waited_s += time.perf_counter() - started
        return {name: t.clone() for name, t in self.tensors.items()}  # the pinned slot is reused later


class Decoder:
    """Incremental generation over one KV cache: the loop behind `generate` and `chat`.

    `feed(ids)` appends tokens without recording them (a prompt, a tool's answer); `run(max_steps)` samples and
    feeds tokens until every sequence has stopped, yielding a `Step` per token. `resume(b)` lets a stopped row go
    on (the chat's tool loop); `records()` stacks every step's record; `close()` hands the cache back to the engine.
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
        self.tokens: list[list[int]] = [[] for _ in range(self.batch_size)]
        self.done = [False] * self.batch_size
        self.rows: list[dict[str, torch.Tensor]] = []  # per step: the record [B, ...], on the CPU
        B = self.batch_size
        self._stop_ids = torch.tensor(sorted(self.stop_tokens), dtype=torch.long, device=device)
        self._done_dev = torch.zeros(B, dtype=torch.bool, device=device)  # rows stopped, as the device sees them
        self._last_dev = torch.zeros(B, dtype=torch.long, device=device)
        self._token_copies = _HostCopies(device)
        self._record_copies = _HostCopies(device)
        # Structured Outputs (ossscope.structured.SchemaConstraint): `.apply(logits [B, V], tokens) -> logits`
        # masks before sampling; its mask needs the tokens so far, so a constrained run samples in lockstep.
        self.constraint: Any = None

    @property
    def waited_s(self) -> float:
        """Host seconds spent waiting for the device's results so far."""
        return self._token_copies.waited_s + self._record_copies.waited_s

    @property
    def room(self) -> int:
        """How many more tokens the cache can take."""
        return self.cache.max_len - self.cache.length

    def feed(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """Append tokens [B, t] (model ids) to the context without recording them; keeps the last logits."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.model.device)
        if ids.dim() != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(f"feed expects [{self.batch_size}, t] token ids, got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.room:
            raise ContextLimitError(
                f"{ids.shape[1]} tokens do not fit: the cache holds {self.cache.length} of {self.cache.max_len}"
            )
        self.logits = self.engine.prefill(ids, self.cache)

    def resume(self, b: int = 0) -> None:
        """Let stopped row b generate again (after a tool's answer was fed)."""
        self.done[b] = False
        self._done_dev[b] = False

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token per row, on the device [B]; rows that stopped repeat their last token."""
        chosen = sample_next(logits, self.temperature, self.top_p, self.generator)
        if self.batch_size > 1:
            chosen = torch.where(self._done_dev, self._last_dev, chosen)
            self._done_dev |= torch.isin(chosen, self._stop_ids)
            self._last_dev = chosen
        return chosen

    def run(self, max_steps: int) -> Iterator[Step]:
        """Generate up to `max_steps` tokens per sequence (fewer if every row stops or the cache fills)."""
        if self.logits is None:
            raise RuntimeError("nothing to continue from: feed a prompt first")
        budget = min(max_steps, self.room)
        if budget < 1 or all(self.done):
            return
        lockstep = self.constraint is not None
        token = self._sample(self._masked(self.logits, self.tokens[0]))  # t_0 on the device
        token_copy = self._token_copies.put({"t": token})
        in_flight: tuple[int, list[int], list[bool], _Copied] | None = None  # launched, not yet handed out
        j = 0
        while True:
            launched = j < budget and not all(self.done)
            if launched:  # feed t_j; the host has seen t_{j-1}, so it knows the batch goes on
                logits, record = self.engine.step(token, self.cache, self.capture)
                record_copy = self._record_copies.put(_record_tensors(record))
                if j + 1 < budget and not lockstep:
                    token = self._sample(logits)  # t_{j+1}, queued behind step j: no waiting
                    next_copy = self._token_copies.put({"t": token})
            if in_flight is not None:  # hand out step j-1 (finished on the GPU before t_j was sampled)
                index, picked, real, copied = in_flight
                row = copied.take()
                self.rows.append(row)
                for b in range(self.batch_size):
                    if real[b]:
                        self.tokens[b].append(picked[b])
                yield Step(index, picked, row, last=not launched)
            if not launched:
                return
            picked = token_copy.take()["t"].tolist()  # t_j: on the host since step j-1 ended
            real = [not done for done in self.done]  # a stopped row's token is filler
            for b in range(self.batch_size):
                if real[b] and picked[b] in self.stop_tokens:
                    self.done[b] = True
            in_flight = (len(self.rows), picked, real, record_copy)
            if j + 1 < budget and lockstep and not all(self.done):  # the mask for t_{j+1} needs t_j first
                generated = self.tokens[0] + picked[:1] if real[0] else self.tokens[0]
                token = self._sample(self._masked(logits, generated))
                next_copy = self._token_copies.put({"t": token})
            if j + 1 < budget and not (lockstep and all(self.done)):
                token_copy = next_copy
            j += 1

    def _masked(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """The logits the constraint (if any) allows, given row 0's tokens generated so far."""
        return logits if self.constraint is None else self.constraint.apply(logits, [generated])

    def router_row(self, step: int, b: int = 0) -> dict[str, torch.Tensor]:
        """Sequence b's record for one step: router_indices [L, k], router_weights [L, k], sink [L, H]."""
        row = self.rows[step]
        return {name: row[name][b] for name in ("router_indices", "router_weights", "sink")}

    def close(self) -> None:
        """Hand the cache back to the engine (a pooling engine gives it to the next chat)."""
        if self._owns_cache and self.cache is not None:
            self.engine.release(self.cache)
            self._owns_cache = False

    def records(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every step's record, stacked, on the CPU:
        ({router_indices [B, N, L, k], router_weights [B, N, L, k], sink [B, N, L, H]}, {name: [B, N, ...]})."""
        steps = range(len(self.rows))
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
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = []
    for t in tensors:
        pad = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d] - t.shape[d]]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.stack(out, dim=1).cpu()


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
) -> GenerationResult | GenerationStream:
    """Generate up to `max_new_tokens` tokens after `input_ids` (model ids, [B, T] or [T]) with a KV cache.

    temperature 0 is greedy; otherwise temperature / top-p sampling from a generator seeded with `seed` (drawn
    and reported in `result.sampling` when None). A sequence stops after a token in `stop_tokens` (default:
    harmony's <|return|> and <|call|>; pass () for none). All rows must share one length.
    Returns a GenerationResult, or with stream=True a GenerationStream of TokenEvents. `capture` names extra
    hooks to record per generated token; `on_token(event)` is called for every token. `engine` defaults to the
    model's (`model.engine`).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    B, T = ids.shape
    limit = model.config.max_context
    if limit <= T:
        raise ContextLimitError(f"the prompt has {T} tokens; the model's context limit is {limit}")
    decoder = Decoder(
        model,
        batch_size=B,
        max_len=min(limit, T + max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_tokens=stop_tokens,
        capture=capture,
        engine=engine,
    )
    started = time.perf_counter()

    def events() -> Iterator[TokenEvent]:
        try:
            decoder.feed(ids)
            for step in decoder.run(max_new_tokens):
                event = TokenEvent(
                    step=step.index,
                    token=step.tokens[0],
                    text=decoder.tokenizer.token_texts([step.tokens[0]])[0],
                    channel="",
                    tokens=step.tokens,
                    record=decoder.router_row(step.index, 0),
                    finished=step.last,
                )
                if on_token is not None:
                    on_token(event)
                yield event
        finally:
            decoder.close()

    def result() -> GenerationResult:
        router, captured = decoder.records()
        reasons = []
        for b in range(B):
            if decoder.done[b]:
                reasons.append("stop")
            elif len(decoder.tokens[b]) >= max_new_tokens:
                reasons.append("length")
            elif decoder.room < 1:
                reasons.append("context")
            else:
                reasons.append("interrupted")
        return GenerationResult(
            prompt_length=T,
            tokens=[list(t) for t in decoder.tokens],
            stop_reasons=reasons,
            **router,
            captured=captured,
            sampling={
                "temperature": decoder.temperature,
                "top_p": decoder.top_p,
                "seed": decoder.seed,
                "max_new_tokens": max_new_tokens,
                "stop_tokens": sorted(decoder.stop_tokens),
            },
            elapsed_s=time.perf_counter() - started,
            engine=decoder.engine.name,
        )

    if stream:
        return GenerationStream(events(), result)
    for _ in events():
        pass
    return result()


def _record_tensors(record: StepRecord) -> dict[str, torch.Tensor]:
    """A StepRecord as one flat dict (router_indices, router_weights, sink, then each captured hook)."""
    return {"router_indices": record.router_indices, "router_weights": record.router_weights, "sink": record.sink,
            **record.captured}
