"""Engines: what runs the model for generation, and so for `chat`, the Lab, the `%oss` magics, collect and bench.

An engine does two things over a KV cache: `prefill(ids, cache)` (a prompt, or a tool's answer; returns the last
position's logits) and `step(tokens, cache, capture)` (one token per sequence; returns the logits and a
`StepRecord` of what the model did with those tokens). Sampling, stop tokens and the harmony parsing live above it
(`ossscope.generation`, `ossscope.chat`), identical for every engine.

- `TorchEngine`: the model's own forward (`ossscope.ops` underneath), hooks and all. Any device.
- `KernelEngine`: the Triton kernels (`ossscope.kernels`) inside the model's forward; a prompt runs on the fused
  prefill kernels when no hook is active; one-token steps replay a CUDA graph (`fast.GraphDecoder`) that writes the
  router's choices and the sinks into static buffers. Caches come from a pool keyed by batch size and length
  bucket, each with its graphs, so a second chat captures nothing. A step that a graph cannot run (a Python hook is
  active, or a capture the graph cannot record) runs eagerly, still on the kernels.

`ossscope.load(path, engine="auto")` picks the kernels on a CUDA device when Triton is importable, else torch.
Each engine call holds the engine's lock, so chats in several threads can share one model: each has its own
cache and records, and their steps interleave.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import KVCache

log = logging.getLogger("ossscope.engine")

ENGINES = ("auto", "torch", "kernels")
# Hooks whose tensors put the token axis third ([B, H, T] and [B, H, T, S]); all others put it second.
_TOKEN_AXIS_2 = ("attn.hook_sink", "attn.hook_pattern")


def token_axis(hook_name: str) -> int:
    """Which axis of a hook's tensor indexes tokens."""
    return 2 if hook_name.endswith(_TOKEN_AXIS_2) else 1


def router_hook_names(num_layers: int) -> list[str]:
    """The hooks every step records: top-k indices and weights per layer, and sink mass per layer."""
    names = [f"blocks.{layer}.mlp.hook_topk_indices" for layer in range(num_layers)]
    names += [f"blocks.{layer}.mlp.hook_topk_weights" for layer in range(num_layers)]
    names += [f"blocks.{layer}.attn.hook_sink" for layer in range(num_layers)]
    return names


@dataclass
class StepRecord:
    """What the model did with one token per sequence. Tensors on the model's device; an engine may hand back
    views of buffers that its next step overwrites, so copy what you keep before stepping again.

    router_indices [B, L, k] int64, router_weights [B, L, k] float32 (after zero-ablation), sink [B, L, H] float32
    (each head's attention mass on its sink), captured {hook name: [B, ...]} (the hook's tensor, token axis removed).
    """

    router_indices: torch.Tensor
    router_weights: torch.Tensor
    sink: torch.Tensor
    captured: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def forward_and_capture(
    model: Any, input_ids: torch.Tensor, cache: KVCache | None, names: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass of the model's own (hooked) code over `input_ids` [B, t] continuing `cache`, keeping the
    tensors at hooks `names`.

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


def _record_from_hooks(kept: dict[str, torch.Tensor], num_layers: int, capture: Sequence[str]) -> StepRecord:
    """A StepRecord from `forward_and_capture`'s tensors [B, 1, ...] of the router hooks and `capture`."""
    layers = range(num_layers)
    return StepRecord(
        router_indices=torch.stack([kept[f"blocks.{i}.mlp.hook_topk_indices"][:, 0] for i in layers], dim=1),
        router_weights=torch.stack([kept[f"blocks.{i}.mlp.hook_topk_weights"][:, 0] for i in layers], dim=1).float(),
        sink=torch.stack([kept[f"blocks.{i}.attn.hook_sink"][:, 0] for i in layers], dim=1).float(),
        captured={name: kept[name][:, 0] for name in capture},
    )


class Engine:
    """The interface generation runs on; see the module docstring. Subclasses: TorchEngine, KernelEngine."""

    name = "engine"
    fused_prefill = False  # prompts on the fused kernels when no hook is active (needs the kernels on)

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lock = threading.RLock()  # one engine call at a time: hooks and graph buffers are the model's
        self.steps = 0  # one-token steps run, and how many of them replayed a graph (tests and bench read these)
        self.graph_steps = 0
        self.prefills = 0

    # -- caches ---------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_len` tokens; hand it back with `release`."""
        return self.model.new_cache(batch_size=batch_size, max_len=max_len)

    def release(self, cache: KVCache) -> None:
        """The cache is no longer used (a pooling engine may give it to the next chat)."""

    # -- compute --------------------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run `input_ids` [B, T] continuing `cache` -> the last position's logits [B, V] float32."""
        from .fast import prefill
        from .threads import cpu_threads

        with self.lock, cpu_threads(self.model):  # a small CPU model runs on one thread, as in its forward
            self.prefills += 1
            return prefill(self.model, input_ids, cache, fused=self.fused_prefill).float()

    def step(self, tokens: torch.Tensor, cache: KVCache, capture: Sequence[str] = (),
             active: Sequence[bool] | None = None) -> tuple[torch.Tensor, StepRecord]:
        """Feed one token per sequence (tokens [B] long, model ids) -> (logits [B, V] float32, StepRecord).

        `active` [B] (default: every row): the rows that take their token; the others are left as they are
        (`KVCache.only`), and their logits and record rows mean nothing."""
        with self.lock, cache.only(active):
            self.steps += 1
            return self._eager_step(tokens, cache, capture)

    def _eager_step(self, tokens: torch.Tensor, cache: KVCache, capture: Sequence[str]
                    ) -> tuple[torch.Tensor, StepRecord]:
        L = self.model.config.num_hidden_layers
        router = router_hook_names(L)
        names = router + [n for n in capture if n not in router]
        logits, kept = forward_and_capture(self.model, tokens.reshape(-1, 1), cache, names)
        return logits, _record_from_hooks(kept, L, capture)

    def describe(self) -> str:
        return self.name


class TorchEngine(Engine):
    """The model's own forward (the torch reference in `ossscope.ops`) for every prefill and step."""

    name = "torch"


@dataclass
class _PoolEntry:
    cache: KVCache
    busy: bool = False


class KernelEngine(Engine):
    """The Triton kernels in the forward, fused prefill, graph-replayed decode steps, and a pool of caches.

    `graphs=None` uses CUDA graphs where the model is on a CUDA device; on the CPU (Triton's interpreter) the
    decode step runs the same kernels eagerly. `pool_size` bounds how many cache + graph sets are kept.
    """

    name = "kernels"
    fused_prefill = True

    def __init__(self, model: Any, graphs: bool | None = None, pool_size: int = 4, min_bucket: int = 1024) -> None:
        super().__init__(model)
        from .fast import use_kernels

        use_kernels(model, True)
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.pool_size = pool_size
        self.min_bucket = min_bucket
        self._pool: OrderedDict[int, _PoolEntry] = OrderedDict()  # id(cache) -> entry, least recently used first
        # Graph decoders per cache and residual capture; weak, so a cache the user made and dropped frees them.
        self._decoders: weakref.WeakKeyDictionary[KVCache, dict[tuple[str, ...], Any]] = weakref.WeakKeyDictionary()
        self.captures = 0  # decoders built (graphs captured, on a GPU) so far, and the seconds the graphs took
        self.capture_seconds = 0.0

    # -- caches ---------------------------------------------------------------------------------------------
    def bucket(self, max_len: int) -> int:
        """The cache length a request for `max_len` tokens gets: a power of two, at least `min_bucket`, so that
        chats of similar lengths share a cache and its graphs."""
        limit = self.model.config.max_context
        if max_len > limit:
            return max_len  # KVCache raises the clear error
        size = max(self.min_bucket, 1 << max(0, (max_len - 1).bit_length()))
        return max(max_len, min(size, limit))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        size = self.bucket(max_len)
        with self.lock:
            for key, entry in self._pool.items():
                cache = entry.cache
                if not entry.busy and cache.batch_size == batch_size and cache.max_len == size:
                    entry.busy = True
                    self._pool.move_to_end(key)
                    cache.reset()
                    return cache
            while len(self._pool) >= self.pool_size:  # evict the least recently used idle entry
                idle = next((k for k, e in self._pool.items() if not e.busy), None)
                if idle is None:
                    break  # every entry is in use: this cache lives outside the pool
                del self._pool[idle]
            cache = self.model.new_cache(batch_size=batch_size, max_len=size)
            if len(self._pool) < self.pool_size:
                self._pool[id(cache)] = _PoolEntry(cache, busy=True)
            return cache

    def release(self, cache: KVCache) -> None:
        with self.lock:
            entry = self._pool.get(id(cache))
            if entry is not None and entry.cache is cache:
                entry.busy = False

    def clear_pool(self) -> None:
        """Drop every pooled cache and graph (their GPU memory is freed once nothing else holds them)."""
        with self.lock:
            self._pool.clear()
            self._decoders.clear()

    # -- compute --------------------------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, cache: KVCache, capture: Sequence[str] = (),
             active: Sequence[bool] | None = None) -> tuple[torch.Tensor, StepRecord]:
        from .fast import GraphDecoder, residual_hook

        with self.lock, cache.only(active):
            self.steps += 1
            model = self.model
            graph_records = all(residual_hook(n) or _router_logits_layer(n) is not None for n in capture)
            if model.hooks_active() or not graph_records:
                return self._eager_step(tokens, cache, capture)  # Python hooks run; the kernels stay on
            residual = tuple(n for n in capture if residual_hook(n))
            decoder = self._decoder(cache, residual, GraphDecoder)
            logits = decoder.step(tokens)
            self.graph_steps += 1
            captured = {}
            for name in capture:
                layer = _router_logits_layer(name)
                captured[name] = decoder.captured[name] if layer is None else decoder.router_logits[layer]
            record = StepRecord(decoder.router_indices.transpose(0, 1), decoder.router_weights.transpose(0, 1),
                                decoder.sink.transpose(0, 1), captured)
            return logits.float(), record

    def _decoder(self, cache: KVCache, residual: tuple[str, ...], graph_decoder: type) -> Any:
        decoders = self._decoders.setdefault(cache, {})
        decoder = decoders.get(residual)
        if decoder is None:
            if self.graphs:
                torch.cuda.synchronize()
            started = time.perf_counter()
            decoder = graph_decoder(self.model, cache, capture=residual, graph=self.graphs)
            self.captures += 1
            if self.graphs:
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                self.capture_seconds += seconds
                note = (f"ossscope: captured the decode CUDA graph for batch {cache.batch_size}, {cache.max_len:,} "
                        f"cache slots in {seconds:.1f} s; later chats of this size reuse it")
                if self.captures == 1:
                    print(note, file=sys.stderr)  # once per engine: the first chat's pause, explained
                else:
                    log.info(note)
            decoders[residual] = decoder
        return decoder

    def describe(self) -> str:
        mode = "CUDA graphs" if self.graphs else "eager"
        return f"kernels ({mode}; {self.captures} graphs captured in {self.capture_seconds:.1f} s)"


def _router_logits_layer(name: str) -> int | None:
    """The layer of a `blocks.{l}.mlp.hook_router_logits` name (the graph records these too), else None."""
    prefix, _, rest = name.partition(".")
    layer, _, hook = rest.partition(".")
    if prefix == "blocks" and hook == "mlp.hook_router_logits" and layer.isdigit():
        return int(layer)
    return None


def kernels_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run for a model on `device`, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed (pip install 'ossscope[gpu]')"
    from .kernels._common import interpreting

    if device.type != "cuda" and not interpreting():
        return False, f"the kernels need a CUDA device (the model is on {device})"
    return True, ""


def make_engine(model: Any, engine: str | Engine = "auto") -> Engine:
    """The engine for `model`: "torch", "kernels", or "auto" (the kernels on a CUDA device with Triton)."""
    if isinstance(engine, Engine):
        return engine
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    if engine == "torch":
        return TorchEngine(model)
    ok, why = kernels_available(model.device)
    if engine == "kernels":
        if not ok:
            raise ValueError(f"engine='kernels' is not available: {why}")
        return KernelEngine(model)
    return KernelEngine(model) if ok and model.device.type == "cuda" else TorchEngine(model)


def set_engine(model: Any, engine: str | Engine = "auto") -> Engine:
    """Give `model` an engine (see `make_engine`); the previous one's kernels are switched off first."""
    from .fast import use_kernels

    chosen = make_engine(model, engine)
    if not isinstance(chosen, KernelEngine):
        use_kernels(model, False)
    model.engine = chosen
    return chosen
