"""The fast GPU path: Triton kernels inside the model's forward, and a CUDA-graph decoder that keeps recording.

- `use_kernels(model)` swaps every block's `attention_fn` / `experts_fn` for `ossscope.kernels` (hooks, ablation
  and steering keep working: they live in the model's own forward).
- `prefill(model, ids, cache, fused=...)` runs a prompt and unembeds only its last position (a 8k prompt would
  otherwise make 3.3 GB of logits for the 20b vocabulary); fused and with no hook active, on fused kernels.
- `GraphDecoder(model, cache)` replays one CUDA graph per decode step. Inside the graph the kernels write the
  router's choices and weights, each head's sink mass, optionally the attention pattern and chosen residual
  hooks, into static buffers. Ablation masks and steering vectors are read from buffers inside the graph, so
  changing them needs no re-capture.

`ossscope.engine.KernelEngine` puts these together for generation, chat and everything above them. Python hook
functions cannot run inside a graph: there, steps with an active hook take the eager path (still on the kernels).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import ops
from .cache import KVCache, to_device

RESIDUAL_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
_RESIDUAL_NAME = re.compile(r"^blocks\.(\d+)\.(" + "|".join(RESIDUAL_HOOKS) + r")$")

# GraphDecoder's MoE: a step with more (token, choice) slots than this (batch * k) takes the grouped decode
# (kernels/moe_batch.py: each used expert read once per step, on the tensor cores); fewer slots keep the per-slot
# streaming kernels, which read an expert once per slot but need no grouping and no padded tiles. A first guess
# (batch 9 and up at k = 4), to be tuned on the GPU: scripts/moe_batch_sweep.py prints the crossover it measures.
GROUPED_DECODE_SLOTS = 32


def residual_hook(name: str) -> bool:
    """Whether `name` is a residual-stream hook (blocks.{l}.hook_resid_pre, ...) that GraphDecoder can record."""
    return _RESIDUAL_NAME.match(name) is not None


def _kernels():
    from ossscope import kernels  # imports triton: only when the fast path is asked for

    return kernels


def use_kernels(model: Any, enable: bool = True) -> Any:
    """Route `model`'s attention and expert computations through the Triton kernels (or back to torch).

    The model must be on a CUDA device (or Triton must run in its interpreter, TRITON_INTERPRET=1).
    Returns the model.
    """
    if enable:
        kernels = _kernels()
        from ossscope.kernels._common import interpreting

        if model.device.type != "cuda" and not interpreting():
            raise ValueError(f"the Triton kernels need the model on a CUDA device; it is on {model.device}")
        for block in model.blocks:
            block.attn.attention_fn = kernels.attention
            block.mlp.experts_fn = kernels.moe_experts
    else:
        for block in model.blocks:
            block.attn.attention_fn = ops.attention
            block.mlp.experts_fn = ops.moe_experts
    return model


@torch.no_grad()
def prefill(model: Any, input_ids: torch.Tensor, cache: KVCache | None = None, fused: bool = False) -> torch.Tensor:
    """Run `input_ids` [B, T] (continuing `cache` if given) and return the last position's logits [B, V].

    The same computation as `model(input_ids, cache)[:, -1]`, minus the unembedding of the other positions.
    With `fused` (the kernels must be on: `use_kernels`) and no hook active, the layers run on the fused
    kernels (`fused_layers` with a `PrefillStage`); otherwise through the blocks' own code, hooks and all.
    """
    input_ids = model._check_input_ids(input_ids)
    B, T = input_ids.shape
    positions, cos, sin = model.positions_and_rope(B, T, cache)
    last = cache.last_indices() if cache is not None else None  # padded rows: each row's last real token
    take_last = (lambda h: h[:, -1]) if last is None else (
        lambda h: h[torch.arange(B, device=h.device), to_device(last, h.device)])
    if positions.dim() == 2:  # per-row positions: the fused RoPE takes one table, right only if rows start alike
        starts = {cache.lengths[b] for b in range(B) if cache.active is None or cache.active[b]}
        fused = fused and len(starts) == 1
        if fused:
            cos, sin = _rope_of_longest(cos, sin, positions)
    if fused and not model.hooks_active():
        x = model.embed(input_ids)  # [B, T, D]
        h = _kernels().rms_norm(x, model.blocks[0].attn.norm.scale, model.config.rms_norm_eps)
        _, h = fused_layers(model, x, h, PrefillStage(model, positions, cos, sin, cache))
        logits = model.unembed(take_last(h))  # [B, V]
    else:
        x = model.hook_embed(model.embed(input_ids))
        for layer, block in enumerate(model.blocks):
            x = block(x, positions, cos, sin, cache.layers[layer] if cache is not None else None)
        logits = model.unembed(model.ln_final(take_last(x)[:, None]))[:, 0]  # [B, V]
    if cache is not None:
        cache.advance(T)
    return logits


def _rope_of_longest(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One RoPE table [T, Dh/2] for rows that start at the same position (a padded prefill): the row with the most
    real tokens has every position, and padding (-1) is never seen, so its table serves every row."""
    longest = (positions >= 0).sum(1).argmax()
    return cos[longest], sin[longest]


def fused_layers(model: Any, x: torch.Tensor, h: torch.Tensor, stage: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block on the fused kernels, written once for a prompt (`PrefillStage`) and a decode step
    (`GraphDecoder`): x is the residual stream, h its first norm ([B, T, D] or [B, D]). Per layer: attention of h,
    then one kernel for the residual update and the MoE's norm (with the router), the experts, then one kernel for
    the residual update (plus steering) and the next layer's norm. The stage supplies what differs between many
    tokens and one token per sequence: `attention(layer, block, h) -> attn_out`, `moe(layer, block, x, attn_out,
    next_norm) -> (x, h)` and `keep(layer, hook, tensor)` (residual captures). Returns (x, the final norm's h)."""
    for layer, block in enumerate(model.blocks):
        next_norm = model.blocks[layer + 1].attn.norm if layer + 1 < len(model.blocks) else model.ln_final
        stage.keep(layer, "hook_resid_pre", x)
        attn_out = stage.attention(layer, block, h)
        stage.keep(layer, "hook_attn_out", attn_out)
        x, h = stage.moe(layer, block, x, attn_out, next_norm)
        stage.keep(layer, "hook_resid_post", x)
    return x, h


class PrefillStage:
    """`fused_layers` for T tokens per sequence, continuing `cache` (no hooks: none is active).

    Through the blocks' torch code a 2,048-token prompt took 2,334 launches (about 97 a layer) and the host needed
    about as long to issue them as the GPU to run them; here RoPE, each residual update with the norm after it,
    and the routing are one kernel each (scripts/prefill_profile.py: the host's part went from 65 to 49 ms on an
    H100, docs/PERFORMANCE.md). RoPE is computed in fp32 and rounded once, as in the decoder (the torch path, like
    HF, rounds cos/sin and each product to the model's dtype)."""

    def __init__(self, model: Any, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cache: KVCache | None) -> None:
        self.kernels, self.model, self.cache = _kernels(), model, cache
        self.positions, self.cos, self.sin = positions, cos, sin

    def keep(self, layer: int, hook: str, x: torch.Tensor) -> None:
        pass

    def attention(self, layer: int, block: Any, h: torch.Tensor) -> torch.Tensor:
        kn, cfg, attn = self.kernels, self.model.config, block.attn
        B, T, _ = h.shape
        q, k, v = kn.qkv_rope(attn.qkv(h), self.cos, self.sin, cfg.num_attention_heads, cfg.num_key_value_heads)
        k_pos = self.positions
        if self.cache is not None:
            k, v, k_pos = self.cache.layers[layer].update(k, v, self.positions)  # held keys, then these
        z, _ = kn.attention_prefill(q, k, v, attn.sinks, self.positions, k_pos, attn.window)  # [B, T, H, Dh]
        return attn.out(z.reshape(B, T, -1))  # [B, T, D]

    def moe(self, layer: int, block: Any, x: torch.Tensor, attn_out: torch.Tensor, next_norm: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
        kn, cfg, mlp = self.kernels, self.model.config, block.mlp
        B, T, D = x.shape
        x, h = kn.add_rms_norm(x, attn_out, mlp.norm.scale, cfg.rms_norm_eps)
        indices, weights = kn.route(mlp.gate(h), cfg.experts_per_token, mlp.reroute_mask if mlp.rerouting else None,
                                    mlp.zero_mask if mlp.zeroing else None)  # [B, T, k]
        y = kn.moe_experts(h.reshape(B * T, D), indices.reshape(B * T, -1), weights.reshape(B * T, -1),
                           mlp.mlp1_blocks, mlp.mlp1_scales, mlp.mlp1_bias, mlp.mlp2_blocks, mlp.mlp2_scales,
                           mlp.mlp2_bias, cfg.swiglu_limit, cfg.swiglu_alpha)  # [B * T, D]
        return kn.add_rms_norm(x, y.view(B, T, D), next_norm.scale, cfg.rms_norm_eps, block.steering_vector)


class GraphDecoder:
    """One-token decode steps over `cache`, replayed from a CUDA graph, recording into static buffers.

    After each `step(tokens)`:
      router_indices [L, B, k] int64, router_weights [L, B, k] fp32 (after zero-ablation), router_logits
      [L, B, E] fp32 (the values of the model's dtype, before ablation masks), sink [L, B, H] fp32;
      patterns[l] [B, H, S_l] fp32 if `pattern` (over the cache slots of layer l; `cache.layers[l].pos` gives
      each slot's position, -1 for empty); captured[name] [B, D] for residual hook names in `capture`
      (blocks.{l}.hook_resid_pre | hook_attn_out | hook_resid_mid | hook_mlp_out | hook_resid_post).
    These buffers (and the returned logits) are overwritten by the next step: clone what you keep.

    `graph=False` runs the same step eagerly (no capture): for debugging, and for the CPU interpreter tests.
    """

    def __init__(
        self, model: Any, cache: KVCache, *, capture: Sequence[str] = (), pattern: bool = False, graph: bool = True
    ) -> None:
        self.kernels = _kernels()
        cfg = model.config
        if cache.config != cfg:
            raise ValueError("the cache was made for a different model config")
        if graph and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {model.device}")
        self.model, self.cache, self.graph = model, cache, graph
        B, L, k, H, D = cache.batch_size, cfg.num_hidden_layers, cfg.experts_per_token, cfg.num_attention_heads, \
            cfg.hidden_size
        dev = model.device
        self.batch = B
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.position = torch.zeros(B, dtype=torch.long, device=dev)  # each row's; -1: the row takes no token
        self._positions_in = _Uploads(B, dev)
        self.router_indices = torch.zeros(L, B, k, dtype=torch.long, device=dev)
        self.router_weights = torch.zeros(L, B, k, dtype=torch.float32, device=dev)
        self.router_logits = torch.zeros(L, B, cfg.num_experts, dtype=torch.float32, device=dev)
        self.sink = torch.zeros(L, B, H, dtype=torch.float32, device=dev)
        self.patterns = [torch.zeros(B, H, lc.slots, device=dev) for lc in cache.layers] if pattern else None
        self.captured: dict[str, torch.Tensor] = {}
        self._keep_at: dict[tuple[int, str], torch.Tensor] = {}
        for name in capture:
            match = _RESIDUAL_NAME.match(name)
            if not match or int(match.group(1)) >= L:
                raise ValueError(f"GraphDecoder can capture residual hooks blocks.{{0..{L - 1}}}.{{"
                                 f"{', '.join(RESIDUAL_HOOKS)}}}; got {name!r}")
            self.captured[name] = torch.zeros(B, D, dtype=model.dtype, device=dev)
            self._keep_at[(int(match.group(1)), match.group(2))] = self.captured[name]
        self.steering = torch.zeros(L, D, dtype=model.dtype, device=dev)  # graph input: one vector per layer
        self._steering_src: list[torch.Tensor | None] = [None] * L
        # bf16 models decode their experts on fp8 tensor cores where the GPU has them (kernels/moe_tc.py), from
        # input slices kept in zeroed buffers that the kernels only ever overwrite in place.
        self.tensor_cores = self.kernels.moe_tc.available(torch.empty(0, dtype=model.dtype, device=dev))
        # Large batches group their slots by expert instead (`moe`); the experts' unweighted outputs, fp32
        # [B * k, D], stay in this buffer for the residual norm that sums them.
        self.grouped_moe = B * k > GROUPED_DECODE_SLOTS
        if self.grouped_moe:
            self._moe_parts = torch.empty(B * k, D, dtype=torch.float32, device=dev)
        elif self.tensor_cores:
            self._h_slices = self.kernels.moe_tc.new_slices(B, D, dev)
            self._act_slices = self.kernels.moe_tc.new_slices(B * k, cfg.intermediate_size, dev)
            self._moe_counters = torch.zeros(B, dtype=torch.int32, device=dev)  # the kernels leave them zeroed
        self._counters = self.kernels.decode_counters(B, cfg.num_key_value_heads, dev)
        rings = {lc.slots for lc in cache.layers if lc.ring}
        self._ring_slots = rings.pop() if rings else 1
        self.logits: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self._capture()

    # -- the step ------------------------------------------------------------------------------------------
    def keep(self, layer: int, hook: str, x: torch.Tensor) -> None:
        buffer = self._keep_at.get((layer, hook))
        if buffer is not None:
            buffer.copy_(x)

    def _body(self) -> torch.Tensor:
        """One decode step from the static inputs (tokens, position) to logits [B, V]; capturable."""
        kn, m = self.kernels, self.model
        pos = self.position  # [B]
        freqs = pos.float()[:, None] * m.rope_inv_freq[None, :]  # [B, Dh/2]
        self._cos = (freqs.cos() * m.rope_concentration).contiguous()
        self._sin = (freqs.sin() * m.rope_concentration).contiguous()
        self._slot = pos.clamp(min=0)  # full layers: slot = position (a row at -1 writes nothing)
        self._ring_slot = torch.remainder(self._slot, self._ring_slots)
        x = F.embedding(self.tokens, m.embed.weight)  # [B, D]
        # Every kernel below launches with PDL (kernels/_common.py): it starts while the one before runs.
        h = kn.rms_norm(x, m.blocks[0].attn.norm.scale, m.config.rms_norm_eps, pdl=True)
        _, h = fused_layers(m, x, h, self)
        return F.linear(h, m.unembed.weight)  # [B, V]

    def attention(self, layer: int, block: Any, h: torch.Tensor) -> torch.Tensor:
        """`fused_layers`' attention for one token per sequence: h [B, D] -> attn_out [B, D]."""
        kn, attn, lc, pos = self.kernels, block.attn, self.cache.layers[layer], self.position
        qkv = kn.linear(h, attn.qkv.weight, attn.qkv.bias, pdl=True)  # [B, (H + 2 Hkv) Dh]
        # RoPE, the cache write and the attention, one kernel (kernels/attention.py)
        z, _, _ = kn.attention_decode_step(
            qkv, self._cos, self._sin, lc.k, lc.v, lc.pos, self._ring_slot if lc.ring else self._slot, pos, attn.sinks,
            attn.window, self.model.config.num_attention_heads, need_pattern=self.patterns is not None,
            sink_out=self.sink[layer], pattern_out=self.patterns[layer] if self.patterns is not None else None,
            counters=self._counters, pdl=True, keys_in_order=not lc.ring)  # z [B, 1, H, Dh]
        return kn.linear(z.view(self.batch, -1), attn.out.weight, attn.out.bias, pdl=True)  # [B, D]

    def moe(self, layer: int, block: Any, x: torch.Tensor, attn_out: torch.Tensor, next_norm: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fused_layers`' MoE for one token per sequence, recording the routing: (x, h) [B, D] each."""
        kn, cfg, mlp = self.kernels, self.model.config, block.mlp
        k, eps = cfg.experts_per_token, cfg.rms_norm_eps
        # The norm also gives the router's logits, and the MoE kernels route from them themselves.
        experts = (mlp.mlp1_blocks, mlp.mlp1_scales, mlp.mlp1_bias, mlp.mlp2_blocks, mlp.mlp2_scales,
                   mlp.mlp2_bias, cfg.swiglu_limit, cfg.swiglu_alpha)
        routing = dict(indices_out=self.router_indices[layer], weights_out=self.router_weights[layer], pdl=True)
        router = dict(router=(mlp.gate.weight, mlp.gate.bias), logits_out=self.router_logits[layer], pdl=True)
        # The residual update after the MoE: the weighted sum over the k experts' outputs (fp32 parts
        # [B * k * splits, D], kernels/moe.py) plus steering, and the next norm.
        update = dict(scale=next_norm.scale, eps=eps, extra=self.steering[layer],
                      delta_out=self._keep_at.get((layer, "hook_mlp_out")))
        if self.grouped_moe:  # route and group by expert (one kernel), gate/up, down: parts [B * k, D]
            x, h = kn.add_rms_norm(x, attn_out, mlp.norm.scale, eps, **router)
            self.keep(layer, "hook_resid_mid", x)
            parts, _, weights = kn.moe_decode_grouped(
                h, self.router_logits[layer], k, *experts, mlp.reroute_mask, mlp.zero_mask,
                indices_out=self.router_indices[layer], weights_out=self.router_weights[layer], out=self._moe_parts)
            return kn.add_rms_norm(x, parts, weights=weights, pdl=True, **update)
        if self.tensor_cores:
            x, h = kn.add_rms_norm(x, attn_out, mlp.norm.scale, eps, slices_out=self._h_slices, **router)
            self.keep(layer, "hook_resid_mid", x)
            # The down kernel's last program to finish does the residual update too: no launch of its own.
            x_next, h = torch.empty_like(x), torch.empty_like(x)
            kn.moe_decode_slices(
                self._h_slices, None, *experts, router_logits=self.router_logits[layer], k=k,
                reroute_mask=mlp.reroute_mask, zero_mask=mlp.zero_mask, act_slices=self._act_slices,
                then_norm=dict(x=x, residual_out=x_next, out=h, counters=self._moe_counters, **update),
                **routing)
            return x_next, h
        h_words = torch.empty(self.batch, x.shape[-1], device=x.device, dtype=torch.float32)  # h for the MoE kernels
        x, h = kn.add_rms_norm(x, attn_out, mlp.norm.scale, eps, words_out=h_words, **router)
        self.keep(layer, "hook_resid_mid", x)
        parts, _, weights = kn.moe_decode_routed(h_words, self.router_logits[layer], k, *experts,
                                                 mlp.reroute_mask, mlp.zero_mask, **routing)
        return kn.add_rms_norm(x, parts, weights=weights, pdl=True, **update)

    def _capture(self) -> None:
        # Warm-up and capture run at position -1 in every row: the attention kernels write nothing there, so the
        # cache is as it was (the tokens are zeros; their MoE work is thrown away).
        self.position.fill_(-1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._body()  # compiles the kernels, picks cuBLAS algorithms
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.logits = self._body()

    def _sync_steering(self) -> None:
        for layer, block in enumerate(self.model.blocks):
            vector = block.steering_vector
            if vector is not self._steering_src[layer]:
                if vector is None:
                    self.steering[layer].zero_()
                else:
                    self.steering[layer].copy_(vector)
                self._steering_src[layer] = vector

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (tokens [B] or [B, 1], model ids); returns logits [B, V] (static)."""
        tokens = torch.as_tensor(tokens, device=self.tokens.device).reshape(-1)
        if tokens.shape[0] != self.batch:
            raise ValueError(f"this decoder steps a batch of {self.batch}, got {tokens.shape[0]} tokens")
        cache = self.cache
        cache.check_room(self.batch, 1)
        self.tokens.copy_(tokens)
        fed = cache.active  # the rows this step feeds (`KVCache.only`; None: all); the others sit at -1
        self._positions_in.put([n if fed is None or fed[b] else -1 for b, n in enumerate(cache.lengths)],
                               self.position)
        self._sync_steering()
        if self._graph is not None:
            self._graph.replay()
        else:
            self.logits = self._body()
        cache.advance(1)
        return self.logits


class _Uploads:
    """Small host lists into a device tensor without waiting: through a ring of pinned buffers (a pageable copy
    may synchronize, and rewriting a pinned buffer still being copied would race), each reused only after its
    last copy's event."""

    def __init__(self, n: int, device: torch.device, slots: int = 4) -> None:
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(n, dtype=torch.long, pin_memory=self.cuda) for _ in range(slots)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(slots)]
        self.next = 0

    def put(self, values: list[int], out: torch.Tensor) -> None:
        if not self.cuda:
            out.copy_(torch.tensor(values, dtype=torch.long))
            return
        i, self.next = self.next, (self.next + 1) % len(self.buffers)
        self.events[i].synchronize()  # long done: copies queued several steps ago
        self.buffers[i].numpy()[:] = values  # straight into the pinned buffer
        out.copy_(self.buffers[i], non_blocking=True)
        self.events[i].record()
