"""The gpt-oss model, hookable, on packed MXFP4 expert weights.

Reads top to bottom: RMSNorm -> Attention (fused QKV, YaRN RoPE, sinks, sliding window) -> MoE (router, top-k,
experts) -> Block -> Model. Index legend: B batch, T new tokens, S keys attended (cached + new), H query heads,
Hkv key/value heads, Dh head dim, D hidden, E experts, k experts per token, I expert width, V vocabulary.

Parameter names follow the original checkpoint layout ("block.N.attn.qkv.weight" -> "blocks.N.attn.qkv.weight"),
so loading is a rename. The attention and expert computations go through `attention_fn` / `experts_fn`,
which default to the torch reference in `ossscope.ops`; the Triton fast path swaps them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import ops
from .cache import ContextLimitError, KVCache, to_device
from .config import GptOssConfig
from .hooks import HookedModule, HookPoint
from .threads import cpu_threads

ABLATION_MODES = ("reroute", "zero")


class RMSNorm(nn.Module):
    def __init__(self, config: GptOssConfig, device=None) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.scale = nn.Parameter(torch.ones(config.hidden_size, device=device, dtype=torch.float32))
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(ops.rms_norm(x, self.scale, self.eps))


class Attention(nn.Module):
    """Grouped-query attention with a learned sink logit per head; even layers use a sliding window."""

    def __init__(self, config: GptOssConfig, layer: int, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.norm = RMSNorm(config, device)
        qkv_width = config.q_width + 2 * config.kv_width
        self.qkv = nn.Linear(config.hidden_size, qkv_width, bias=True, device=device, dtype=dtype)
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads, device=device, dtype=dtype))
        self.out = nn.Linear(config.q_width, config.hidden_size, bias=True, device=device, dtype=dtype)
        self.attention_fn = ops.attention
        self.hook_q = HookPoint()  # [B, T, H, Dh] after RoPE
        self.hook_k = HookPoint()  # [B, T, Hkv, Dh] after RoPE
        self.hook_v = HookPoint()  # [B, T, Hkv, Dh]
        self.hook_pattern = HookPoint()  # [B, H, T, S] probabilities over real keys (sink column dropped)
        self.hook_sink = HookPoint()  # [B, H, T] the sink's probability mass
        self.hook_z = HookPoint()  # [B, T, H, Dh] attention output per head, before `out`

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_cache=None
    ) -> torch.Tensor:
        cfg = self.config
        B, T, _ = x.shape
        qkv = self.qkv(self.norm(x))  # [B, T, (H + 2 Hkv) Dh]
        q = qkv[..., : cfg.q_width].view(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = qkv[..., cfg.q_width : cfg.q_width + cfg.kv_width].view(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = qkv[..., cfg.q_width + cfg.kv_width :].view(B, T, cfg.num_key_value_heads, cfg.head_dim)
        q = self.hook_q(ops.apply_rope(q, cos, sin))
        k = self.hook_k(ops.apply_rope(k, cos, sin))
        v = self.hook_v(v)

        if layer_cache is not None:
            k, v, k_pos = layer_cache.update(k, v, positions)  # [B, S, Hkv, Dh], k_pos [S]
        else:
            k_pos = positions

        if self.hook_pattern.active:  # materialize the pattern only when someone looks at it (or edits it)
            pattern, sink_mass = ops.attention_weights(q, k, self.sinks, positions, k_pos, self.window)
            z = ops.weighted_values(self.hook_pattern(pattern), v)
        else:
            z, sink_mass, _ = self.attention_fn(q, k, v, self.sinks, positions, k_pos, self.window)
        self.hook_sink(sink_mass)  # observation only: the sink mass is not used downstream
        z = self.hook_z(z)  # [B, T, H, Dh]
        return self.out(z.reshape(B, T, cfg.q_width))


class MoE(nn.Module):
    """Router + experts. Expert weights stay packed MXFP4 (uint8 buffers), decoded one expert at a time."""

    def __init__(self, config: GptOssConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        E, D, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.norm = RMSNorm(config, device)
        self.gate = nn.Linear(D, E, bias=True, device=device, dtype=dtype)  # the router
        u8 = dict(device=device, dtype=torch.uint8)
        self.register_buffer("mlp1_blocks", torch.zeros(E, 2 * I, D // 32, 16, **u8))
        self.register_buffer("mlp1_scales", torch.zeros(E, 2 * I, D // 32, **u8))
        self.register_buffer("mlp1_bias", torch.zeros(E, 2 * I, device=device, dtype=dtype))
        self.register_buffer("mlp2_blocks", torch.zeros(E, D, I // 32, 16, **u8))
        self.register_buffer("mlp2_scales", torch.zeros(E, D, I // 32, **u8))
        self.register_buffer("mlp2_bias", torch.zeros(E, D, device=device, dtype=dtype))
        # Ablation state, kept as tensors so a CUDA graph can read it as an input.
        self.register_buffer("reroute_mask", torch.zeros(E, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("zero_mask", torch.zeros(E, dtype=torch.bool, device=device), persistent=False)
        self.rerouting = False  # python-side mirrors of mask.any(), so the torch path never syncs to check
        self.zeroing = False
        self.experts_fn = ops.moe_experts
        self.hook_router_logits = HookPoint()  # [B, T, E] raw router logits
        self.hook_topk_indices = HookPoint()  # [B, T, k] chosen experts (editable: routing follows)
        self.hook_topk_weights = HookPoint()  # [B, T, k] mixing weights (after zero-ablation)
        self.hook_expert_out = HookPoint()  # [B, T, k, D] each chosen expert's output before weighting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B, T, D = x.shape
        x = self.norm(x)
        router_logits = self.hook_router_logits(self.gate(x))  # [B, T, E]
        logits = router_logits.float()
        if self.rerouting:  # a rerouted expert can never be chosen; the next best takes its place
            logits = logits.masked_fill(self.reroute_mask, float("-inf"))
        indices = self.hook_topk_indices(torch.topk(logits, cfg.experts_per_token, dim=-1).indices)  # [B, T, k]
        weights = torch.softmax(logits.gather(-1, indices), dim=-1)  # softmax over the k chosen logits
        if self.zeroing:  # routing unchanged; the ablated expert's share is dropped, not renormalized
            weights = weights.masked_fill(self.zero_mask[indices], 0.0)
        weights = self.hook_topk_weights(weights)  # [B, T, k]

        packed = (self.mlp1_blocks, self.mlp1_scales, self.mlp1_bias,
                  self.mlp2_blocks, self.mlp2_scales, self.mlp2_bias)  # fmt: skip
        flat_x, flat_i, flat_w = x.reshape(B * T, D), indices.reshape(B * T, -1), weights.reshape(B * T, -1)
        if self.hook_expert_out.active:
            _, expert_out = self.experts_fn(flat_x, flat_i, flat_w, *packed, cfg.swiglu_limit, cfg.swiglu_alpha,
                                            per_expert=True)  # fmt: skip
            expert_out = self.hook_expert_out(expert_out.view(B, T, -1, D))  # [B, T, k, D]
            y = (expert_out * weights.to(x.dtype).unsqueeze(-1)).sum(dim=2)
        else:
            y = self.experts_fn(flat_x, flat_i, flat_w, *packed, cfg.swiglu_limit, cfg.swiglu_alpha).view(B, T, D)
        return y

    def set_ablation(self, experts: Sequence[int], mode: str) -> None:
        """Ablate `experts` of this layer ("reroute": never chosen; "zero": chosen but contributes nothing)."""
        mask = torch.zeros_like(self.reroute_mask)
        if experts:
            mask[list(experts)] = True
        if mode == "reroute":
            if int(mask.sum()) > self.config.num_experts - self.config.experts_per_token:
                raise ValueError(
                    f"cannot reroute {int(mask.sum())} of {self.config.num_experts} experts: "
                    f"each token needs {self.config.experts_per_token} experts to choose from"
                )
            self.reroute_mask.copy_(mask)
            self.rerouting = bool(mask.any())
        elif mode == "zero":
            self.zero_mask.copy_(mask)
            self.zeroing = bool(mask.any())
        else:
            raise ValueError(f"unknown ablation mode {mode!r}; use one of {ABLATION_MODES}")


class Block(nn.Module):
    """x = x + attn(norm(x)); x = x + moe(norm(x)) (+ an optional steering vector)."""

    def __init__(self, config: GptOssConfig, layer: int, device=None, dtype=None) -> None:
        super().__init__()
        self.layer = layer
        self.attn = Attention(config, layer, device, dtype)
        self.mlp = MoE(config, device, dtype)
        self.steering_vector: torch.Tensor | None = None  # [D], added to the residual after the MoE
        self.hook_resid_pre = HookPoint()  # [B, T, D]
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, positions, cos, sin, layer_cache=None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(x, positions, cos, sin, layer_cache)))
        x = x + self.hook_mlp_out(self.mlp(x))
        if self.steering_vector is not None:
            x = x + self.steering_vector
        return self.hook_resid_post(x)


class Model(HookedModule):
    """A gpt-oss model. `model(input_ids [B, T]) -> logits [B, T, V]`.

    Build one with `ossscope.load(path)` or `ossscope.random_model(preset)`.
    """

    def __init__(self, config: GptOssConfig, device=None, dtype=None, name: str = "gpt-oss") -> None:
        super().__init__()
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.config = config
        self.name = name
        self.vocab_map: list[int] | None = None  # model id -> o200k id, for compact vocabularies
        self.unknown_id: int | None = None  # the compact vocabulary's id for o200k tokens it lacks
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.hook_embed = HookPoint()  # [B, T, D]
        self.blocks = nn.ModuleList(Block(config, layer, device, dtype) for layer in range(config.num_hidden_layers))
        self.ln_final = RMSNorm(config, device)
        self.unembed = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        inv_freq, self.rope_concentration = ops.yarn_inv_freq(config)
        self.register_buffer("rope_inv_freq", inv_freq.to(device), persistent=False)
        self.active_ablation: dict[str, Any] = {}
        from .engine import TorchEngine

        # What generation and chat run on (`ossscope.engine`); `ossscope.load` picks it (engine="auto").
        self.engine = TorchEngine(self)
        self.requires_grad_(False)  # an inference and interpretability model: no autograd by default
        self.setup_hooks()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def layers(self) -> nn.ModuleList:
        return self.blocks

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids LongTensor [B, T] -> logits [B, T, V]. With a cache, continue each row where it is
        (`cache.lengths`).

        A small model on CPU runs with one torch thread (see `ossscope.threads` for why and when).
        """
        with cpu_threads(self):
            return self._forward(input_ids, cache)

    def _forward(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        input_ids = self._check_input_ids(input_ids)
        B, T = input_ids.shape
        positions, cos, sin = self.positions_and_rope(B, T, cache)  # [T] or per row [B, T]; cos/sin [..., Dh/2]
        x = self.hook_embed(self.embed(input_ids))  # [B, T, D]
        for layer, block in enumerate(self.blocks):
            x = block(x, positions, cos, sin, cache.layers[layer] if cache is not None else None)
        logits = self.unembed(self.ln_final(x))  # [B, T, V]
        if cache is not None:
            cache.advance(T)
        return logits

    def positions_and_rope(self, batch: int, new_tokens: int, cache: KVCache | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next tokens' positions ([T] from 0 without a cache, continuing a shared cache; [B, T] per row in a
        ragged one, -1 for rows it does not feed) and their RoPE tables cos, sin [..., Dh/2] fp32, checking that
        they fit the cache and the model's context."""
        if cache is not None:
            cache.check_room(batch, new_tokens)
        longest = cache.length if cache is not None else 0
        if longest + new_tokens > self.config.max_context:
            raise ContextLimitError(
                f"{longest + new_tokens} tokens exceed the model's context limit of {self.config.max_context}")
        if cache is None:
            positions = torch.arange(new_tokens, device=self.device)
        else:
            positions = cache.positions(new_tokens, self.device)
        freqs = positions.float()[..., None] * self.rope_inv_freq  # [..., Dh/2]
        return positions, freqs.cos() * self.rope_concentration, freqs.sin() * self.rope_concentration

    def _check_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            raise ValueError(f"input_ids must be [batch, tokens]; got one dimension {tuple(input_ids.shape)} "
                             "(use input_ids[None] for a batch of one)")
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has no tokens")
        if not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token id {high if high >= self.config.vocab_size else low} is outside the "
                                 f"vocabulary [0, {self.config.vocab_size})")
        return to_device(input_ids.long(), self.device)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (default: 4096)."""
        max_len = max_len or min(4096, self.config.max_context)
        return KVCache(self.config, batch_size, max_len, device=self.device, dtype=self.dtype)

    # -- interventions -----------------------------------------------------------------------------------
    def _normalize_ablation(self, experts_by_layer: Mapping[int, Sequence[int]], mode: str) -> dict[int, list[int]]:
        if mode not in ABLATION_MODES:
            raise ValueError(f"unknown ablation mode {mode!r}; use one of {ABLATION_MODES}")
        cfg, clean = self.config, {}
        for layer, experts in experts_by_layer.items():
            if not isinstance(layer, int) or not 0 <= layer < cfg.num_hidden_layers:
                raise ValueError(
                    f"layer {layer!r} is out of range: the model has layers 0..{cfg.num_hidden_layers - 1}")
            experts = [experts] if isinstance(experts, int) else list(experts)
            for expert in experts:
                if not isinstance(expert, int) or not 0 <= expert < cfg.num_experts:
                    raise ValueError(f"expert {expert!r} (layer {layer}) is out of range: experts are "
                                     f"0..{cfg.num_experts - 1}")
            clean[layer] = sorted(set(experts))
            if mode == "reroute" and len(clean[layer]) > cfg.num_experts - cfg.experts_per_token:
                raise ValueError(
                    f"cannot reroute {len(clean[layer])} of {cfg.num_experts} experts of layer {layer}: "
                    f"each token needs {cfg.experts_per_token} experts to choose from"
                )
        return clean

    def set_ablation(self, experts_by_layer: Mapping[int, Sequence[int]], mode: str = "reroute") -> None:
        """Ablate experts until `clear_ablation()`: {layer: [expert, ...]}. Replaces any earlier ablation.

        reroute: the expert can never be chosen (its logit is removed before top-k; the next best replaces it).
        zero: routing is unchanged but the expert's contribution is dropped (the others are not renormalized).
        A bad request (unknown mode, layer or expert out of range, too many rerouted experts) raises ValueError
        and leaves the ablation that was active untouched.
        """
        clean = self._normalize_ablation(experts_by_layer, mode)  # every check happens before any change
        previous = self.active_ablation
        self.clear_ablation()
        try:
            for layer, experts in clean.items():
                self.blocks[layer].mlp.set_ablation(experts, mode)
        except BaseException:  # not expected after the checks above, but the old state must survive anything
            self.clear_ablation()
            if previous:
                self.set_ablation(previous["experts"], previous["mode"])
            raise
        if clean:
            self.active_ablation = {"mode": mode, "experts": clean}

    def clear_ablation(self) -> None:
        for block in self.blocks:
            block.mlp.set_ablation([], "reroute")
            block.mlp.set_ablation([], "zero")
        self.active_ablation = {}

    @contextmanager
    def ablate(self, experts_by_layer: Mapping[int, Sequence[int]], mode: str = "reroute") -> Iterator[Model]:
        """Ablate experts inside a `with` block; the previous ablation state comes back on exit."""
        previous = dict(self.active_ablation)
        self.set_ablation(experts_by_layer, mode)
        try:
            yield self
        finally:
            self.clear_ablation()
            if previous:
                self.set_ablation(previous["experts"], previous["mode"])

    def set_steering(self, layer: int, vector: torch.Tensor, scale: float = 1.0) -> None:
        """Add `scale * vector` [D] to the residual stream after block `layer` on every token, until cleared."""
        if not 0 <= layer < self.config.num_hidden_layers:
            raise ValueError(
                f"layer {layer} is out of range: the model has layers 0..{self.config.num_hidden_layers - 1}")
        vector = torch.as_tensor(vector)
        if vector.shape != (self.config.hidden_size,):
            raise ValueError(
                f"a steering vector must have shape ({self.config.hidden_size},), got {tuple(vector.shape)}")
        try:
            scale = float(scale)  # a Python, numpy or 0-d torch number
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"the steering scale must be a number, got {scale!r}") from None
        if not math.isfinite(scale):
            raise ValueError(f"the steering scale must be a finite number, got {scale!r}")
        if vector.is_complex() or vector.dtype == torch.bool:
            raise ValueError(f"a steering vector must hold real numbers, got dtype {vector.dtype}")
        steered = (scale * vector.to(self.device, torch.float32)).to(self.dtype)
        if not bool(torch.isfinite(steered).all()):  # a NaN would spread to every logit of every token
            finite_input = bool(torch.isfinite(vector.float()).all())
            raise ValueError(
                "the steering vector holds NaN or Inf values" if not finite_input else
                f"scale * vector overflows {str(self.dtype).removeprefix('torch.')} (scale {scale!r}, "
                f"largest |value| {float(vector.float().abs().max()):.3g})")
        self.blocks[layer].steering_vector = steered

    def clear_steering(self, layer: int | None = None) -> None:
        for index, block in enumerate(self.blocks):
            if layer is None or index == layer:
                block.steering_vector = None

    @property
    def active_steering(self) -> dict[int, torch.Tensor]:
        return {i: b.steering_vector for i, b in enumerate(self.blocks) if b.steering_vector is not None}

    # -- conveniences that live in their own modules -------------------------------------------------------
    @property
    def tokenizer(self):
        """The harmony tokenizer for this model (maps a compact vocabulary to o200k_harmony if there is one)."""
        if getattr(self, "_tokenizer", None) is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.for_model(self)
        return self._tokenizer

    def set_engine(self, engine: str = "auto"):
        """Switch what generation and chat run on: "auto", "kernels" or "torch" (see `ossscope.engine`)."""
        from .engine import set_engine

        return set_engine(self, engine)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any):
        """Low-level generation with a KV cache; see `ossscope.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)

    def chat(self, messages_or_text, **kwargs: Any):
        """Chat in the harmony format and return a Trace; see `ossscope.chat.chat`."""
        from .chat import chat

        return chat(self, messages_or_text, **kwargs)

    def __repr__(self) -> str:
        """A few lines: name, layers, experts, dims, dtype, device, engine (`module_tree()` has every module)."""
        from .threads import parameter_count

        c = self.config
        L = c.num_hidden_layers
        sliding = sum(c.is_sliding(layer) for layer in range(L))
        engine = getattr(self, "engine", None)  # set by ossscope.load(engine=...) where that exists
        if engine is None:
            engine = "Triton kernels" if getattr(self, "kernels_enabled", False) else "torch"
            if getattr(self, "step_fn", None) is not None:
                engine += " + CUDA-graph decode"
        elif not isinstance(engine, str):
            engine = getattr(engine, "name", type(engine).__name__)
        count = parameter_count(self)
        count_text = f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
        return (
            f"Model {self.name!r} (gpt-oss architecture, {count_text} parameters)\n"
            f"  layers {L} ({sliding} sliding, window {c.sliding_window}), experts {c.num_experts} "
            f"top-{c.experts_per_token} (MXFP4), heads {c.num_attention_heads}/{c.num_key_value_heads} of dim "
            f"{c.head_dim}\n"
            f"  d_model {c.hidden_size}, expert width {c.intermediate_size}, vocab {c.vocab_size}, "
            f"context {c.max_context:,}\n"
            f"  {str(self.dtype).removeprefix('torch.')} on {self.device}, engine: {engine}\n"
            f"  (model.module_tree() shows every module and hook point; model.hook_names() lists the hooks)"
        )

    def module_tree(self) -> str:
        """torch's full module listing, every HookPoint included (`repr(model)` is the short form)."""
        return super().__repr__()

    def extra_repr(self) -> str:
        c = self.config
        return (f"name={self.name!r}, layers={c.num_hidden_layers}, "
                f"experts={c.num_experts} (top-{c.experts_per_token}), "
                f"d_model={c.hidden_size}, vocab={c.vocab_size}, dtype={self.dtype}, device={self.device}")
