"""Token generation with a KV cache: sampling, stop tokens, streaming, and a per-token record of what the model did.

The loop is: prefill the prompt into a cache; then, each step, sample the next token from the last logits and
feed that one token back. Feeding token t is also when we record what the model did with it (router choices,
sink mass, any hooks asked for), so record row t always means "what the model did when token t was its input".
Every generated token is fed exactly once, the last one included, so its row is complete too.

`forward_and_capture` is the only place a forward pass happens; it is small on purpose so a faster decoder
(a CUDA graph, say) can replace it: pass `step_fn=...`, or set `model.step_fn`.

Batches: every row of `input_ids` must have the same length (no padding or attention masks). A row that has
stopped keeps being fed its stop token until all rows stop; only its first `lengths[b]` tokens count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ossscope import tokenizer as tk
from ossscope.cache import ContextLimitError, KVCache
from ossscope.harmony import HarmonyStreamParser

StepFn = Callable[[Any, torch.Tensor, KVCache, Sequence[str]], tuple[torch.Tensor, dict[str, torch.Tensor]]]

# Hooks whose tensors put the token axis third ([B, H, T] and [B, H, T, S]); all others put it second.
_TOKEN_AXIS_2 = ("attn.hook_sink", "attn.hook_pattern")


def token_axis(hook_name: str) -> int:
    """Which axis of a hook's tensor indexes tokens."""
    return 2 if hook_name.endswith(_TOKEN_AXIS_2) else 1


def router_hook_names(num_layers: int) -> list[str]:
    """The hooks every generation records: top-k indices and weights per layer, and sink mass per layer."""
    names = [f"blocks.{layer}.mlp.hook_topk_indices" for layer in range(num_layers)]
    names += [f"blocks.{layer}.mlp.hook_topk_weights" for layer in range(num_layers)]
    names += [f"blocks.{layer}.attn.hook_sink" for layer in range(num_layers)]
    return names


@torch.no_grad()
def forward_and_capture(
    model: Any, input_ids: torch.Tensor, cache: KVCache, names: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass over `input_ids` [B, t] continuing `cache`, keeping the tensors at hooks `names`.

    Returns (logits at the last position [B, V] float32, {name: tensor with the token axis second [B, t, ...]}).
    """
    kept: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Callable:
        axis = token_axis(name)

        def keep(tensor: torch.Tensor, hook: Any) -> None:
            kept[name] = tensor.detach().movedim(axis, 1) if axis != 1 else tensor.detach()

        return keep

    if names:
        with model.hooks([(name, keeper(name)) for name in names]):
            logits = model(input_ids, cache=cache)
    else:
        logits = model(input_ids, cache=cache)
    return logits[:, -1].float(), kept


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from logits [B, V] -> [B] long.

    temperature 0 is greedy (argmax). Otherwise sample from softmax(logits / temperature), restricted to the
    smallest set of tokens whose probability reaches `top_p` (the most likely token is always kept).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class TokenEvent:
    """One generated token, as streamed. In `generate`, `token` is a model id; in `chat`, an o200k_harmony id.

    `record` holds this token's row for the first sequence: router_indices [L, k], router_weights [L, k],
    sink [L, H] (tensors on the model's device).
    """

    step: int  # index of this token among the generated ones
    token: int  # the first sequence's token
    text: str
    channel: str  # "analysis", "commentary", "final" or "" (headers and special tokens)
    tokens: list[int]  # this step's token for every sequence of the batch (model ids)
    record: dict[str, torch.Tensor] = field(default_factory=dict)
    finished: bool = False  # generation is over (this was the last token)
    tool_call: Any = None  # chat: the ToolCall this <|call|> token made (already run), else None


@dataclass
class GenerationResult:
    """What `generate` produced. Per sequence b: `tokens[b]` (model ids, the stop token included),
    `channels[b]`, `stop_reasons[b]` ("stop", "length", "context" or "interrupted").

    Records, for N = the longest sequence's token count (a shorter row's tail is filler):
    router_indices [B, N, L, k] int64, router_weights [B, N, L, k] float32, sink [B, N, L, H] float32,
    captured[name] [B, N, ...] (token axis moved second; key axes of attention patterns zero-padded).
    """

    prompt_length: int
    tokens: list[list[int]]
    channels: list[list[str]]
    stop_reasons: list[str]
    router_indices: torch.Tensor
    router_weights: torch.Tensor
    sink: torch.Tensor
    captured: dict[str, torch.Tensor]
    sampling: dict[str, Any]
    elapsed_s: float = 0.0

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def texts(self, tokenizer: Any) -> list[str]:
        """Decoded text of each sequence's generated tokens."""
        return [tokenizer.decode(t) for t in self.tokens]


class Decoder:
    """Incremental generation over one KV cache, one token per `step()`; the engine behind `generate` and `chat`.

    `feed(ids)` appends tokens without recording (a prompt, a tool's answer); `step()` samples one token per
    sequence from the latest logits, feeds it, and records what the model did with it.
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
        step_fn: StepFn | None = None,
        cache: KVCache | None = None,
        role: str | None = "assistant",
    ):
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature=}, {top_p=}")
        self.model = model
        self.tokenizer = model.tokenizer
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.temperature, self.top_p = float(temperature), float(top_p)
        # Without a seed, draw one (from torch's global generator) and keep it, so every run can be replayed.
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator(device=model.device).manual_seed(self.seed)
        self.stop_tokens = set(self.tokenizer.stop_ids if stop_tokens is None else (int(t) for t in stop_tokens))
        # Extra hooks to keep: names, or a predicate on names; unknown names fail now, with suggestions.
        self.capture = list(dict.fromkeys(model.resolve_hook_names(capture))) if capture else []
        router_names = router_hook_names(self.num_layers)
        self.names = router_names + [n for n in self.capture if n not in router_names]
        self.step_fn = step_fn or getattr(model, "step_fn", None) or forward_and_capture
        self.cache = cache if cache is not None else model.new_cache(batch_size=batch_size, max_len=max_len)
        self.batch_size = self.cache.batch_size
        self.logits: torch.Tensor | None = None  # [B, V] after the last fed token
        self.tokens: list[list[int]] = [[] for _ in range(self.batch_size)]
        self.done = [False] * self.batch_size
        # Per step: router_indices / router_weights [B, L, k], sink [B, L, H], and each captured name [B, ...].
        # Always fresh tensors: a step function may hand back views of buffers it overwrites (a CUDA graph's).
        self.rows: list[dict[str, torch.Tensor]] = []
        self.parsers = [HarmonyStreamParser(role=role) for _ in range(self.batch_size)]
        self.channels: list[list[str]] = [[] for _ in range(self.batch_size)]
        self.constraint: Any = None  # e.g. structured.SchemaConstraint: .apply(logits [B, V], tokens) -> logits

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
        self.logits, _ = self.step_fn(self.model, ids, self.cache, ())

    def start_turn(self, role: str | None = "assistant") -> None:
        """Reset the channel parsers: the next tokens start a new message (after `<|start|>assistant`)."""
        offsets = [len(t) for t in self.tokens]
        self.parsers = [HarmonyStreamParser(role=role, offset=o) for o in offsets]

    def step(self) -> list[int]:
        """Sample one token per sequence, feed it, record its row. Returns the tokens (model ids) [B]."""
        if self.logits is None:
            raise RuntimeError("nothing to continue from: feed a prompt first")
        if self.room < 1:
            raise ContextLimitError(f"the cache is full ({self.cache.max_len} tokens)")
        logits = self.logits
        if self.constraint is not None:  # Structured Outputs (ossscope.structured): mask before sampling
            logits = self.constraint.apply(logits, self.tokens)
        chosen = sample_next(logits, self.temperature, self.top_p, self.generator)  # [B]
        picked = chosen.tolist()
        for b in range(self.batch_size):
            if self.done[b]:  # a finished row repeats its last token (ignored) so the batch stays rectangular
                picked[b] = self.tokens[b][-1]
            else:
                self.tokens[b].append(picked[b])
        ids = torch.tensor(picked, dtype=torch.long, device=self.model.device)[:, None]  # [B, 1]
        self.logits, kept = self.step_fn(self.model, ids, self.cache, self.names)
        self.rows.append(self._row(kept))
        for b in range(self.batch_size):
            if self.done[b]:
                continue
            o200k = self.tokenizer.to_o200k([picked[b]])[0]
            self.channels[b].append(self.parsers[b].feed(o200k))
            if picked[b] in self.stop_tokens:
                self.done[b] = True
        return picked

    def _row(self, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step's record from the kept hook tensors [B, 1, ...] (copied: stack and clone never alias)."""
        L = range(self.num_layers)
        row = {
            "router_indices": torch.stack([kept[f"blocks.{i}.mlp.hook_topk_indices"][:, 0] for i in L], dim=1),
            "router_weights": torch.stack([kept[f"blocks.{i}.mlp.hook_topk_weights"][:, 0] for i in L], dim=1),
            "sink": torch.stack([kept[f"blocks.{i}.attn.hook_sink"][:, 0] for i in L], dim=1),
        }
        for name in self.capture:
            row[name] = kept[name][:, 0].clone()
        return row

    def router_row(self, step: int, b: int = 0) -> dict[str, torch.Tensor]:
        """Sequence b's record for one step: router_indices [L, k], router_weights [L, k], sink [L, H]."""
        row = self.rows[step]
        return {name: row[name][b] for name in ("router_indices", "router_weights", "sink")}

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
    step_fn: StepFn | None = None,
) -> GenerationResult | GenerationStream:
    """Generate up to `max_new_tokens` tokens after `input_ids` (model ids, [B, T] or [T]) with a KV cache.

    temperature 0 is greedy; otherwise temperature / top-p sampling from a generator seeded with `seed` (drawn
    and reported in `result.sampling` when None). A sequence stops after a token in `stop_tokens` (default:
    harmony's <|return|> and <|call|>; pass () for none). All rows must share one length.
    Returns a GenerationResult, or with stream=True a GenerationStream of TokenEvents. `capture` names extra
    hooks to record per generated token; `on_token(event)` is called for every token.
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
    # Label channels as harmony does when the prompt ends by opening an assistant turn.
    tail = model.tokenizer.to_o200k(ids[0, -2:].tolist())
    opens_turn = len(tail) == 2 and tail[0] == tk.START and model.tokenizer.decode_o200k(tail[1:]) == "assistant"
    decoder = Decoder(
        model,
        role="assistant" if opens_turn else None,
        batch_size=B,
        max_len=min(limit, T + max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_tokens=stop_tokens,
        capture=capture,
        step_fn=step_fn,
    )
    started = time.perf_counter()

    def events() -> Iterator[TokenEvent]:
        decoder.feed(ids)
        for step in range(max_new_tokens):
            if decoder.room < 1:
                break
            picked = decoder.step()
            event = TokenEvent(
                step=step,
                token=picked[0],
                text=decoder.tokenizer.token_texts([picked[0]])[0],
                channel=decoder.channels[0][-1] if len(decoder.channels[0]) == step + 1 else "",
                tokens=picked,
                record=decoder.router_row(step, 0),
                finished=all(decoder.done),
            )
            if on_token is not None:
                on_token(event)
            yield event
            if all(decoder.done):
                return

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
            channels=[list(c) for c in decoder.channels],
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
        )

    if stream:
        return GenerationStream(events(), result)
    for _ in events():
        pass
    return result()
