"""The gpt-oss math as plain torch functions: the numerical reference.

The model's torch path calls these, and every Triton kernel in `ossscope.kernels` is tested against them.
Index legend: B batch, T tokens, H query heads, Hkv key/value heads, G = H / Hkv, Dh head dim, D hidden,
E experts, k experts per token, I expert intermediate size, N = B * T flattened tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import GptOssConfig
from .expert_cache import EXPERT_CACHE

# -- normalization ----------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 with an fp32 scale, cast back to x's dtype. x [..., D], scale [D]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (scale.float() * xf).to(x.dtype)


# -- rotary embeddings with YaRN ---------------------------------------------------------------------------


def yarn_inv_freq(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Dh/2] blending interpolated and extrapolated RoPE, and YaRN's concentration.

    Dimensions rotating fewer than beta_slow times over the original context are interpolated (divided by the
    scaling factor), those rotating more than beta_fast times are kept, and a linear ramp blends the band
    in between. The concentration multiplies both cos and sin (so q.k scales by its square).
    """
    d_half = config.head_dim // 2
    base, factor, original = config.rope_theta, config.rope_scaling_factor, config.initial_context_length
    freq = base ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    if factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(factor) + 1.0
    low = d_half * math.log(original / (config.rope_ntk_beta * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(original / (config.rope_ntk_alpha * 2 * math.pi)) / math.log(base)
    # transformers clamps the band to [0, head_dim - 1]; for the released shapes (band 8.1..17.4 of 32) this is
    # a no-op, and keeping it makes small test configs match the reference too.
    low, high = max(low, 0.0), min(high, config.head_dim - 1.0)
    if low == high:
        high += 0.001  # as the reference does, to avoid a division by zero
    ramp = ((torch.arange(d_half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * freq)) * ramp + (1.0 / freq) * extrapolation_weight
    return inv_freq, concentration


def rope_tables(config: GptOssConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., Dh/2] in fp32 for absolute `positions` ([T], or [B, T] per sequence), concentration folded
    in."""
    inv_freq, concentration = yarn_inv_freq(config)
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return freqs.cos() * concentration, freqs.sin() * concentration


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first half of each head against the second half (NeoX style). x [B, T, H, Dh];
    cos, sin [T, Dh/2] (every sequence at the same positions) or [B, T, Dh/2] (each at its own)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # [1, T, Dh/2]
    cos = cos.to(x.dtype)[:, :, None, :]  # [B or 1, T, 1, Dh/2]
    sin = sin.to(x.dtype)[:, :, None, :]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


# -- attention with sinks -----------------------------------------------------------------------------------


def visible_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [Tq, Tk]: key j is visible to query i (causal, inside the sliding window, not an empty slot).

    A sliding window of W lets query q see keys q-W+1 .. q (W tokens including itself).
    k_pos = -1 marks an empty slot of a ring-buffer cache. Positions shared by the batch are q_pos [Tq] and
    k_pos [Tk]; per sequence (a ragged batch, each row at its own length) either may be [B, ...], and the
    result is then [B, Tq, Tk].
    """
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= (qp - kp) < window
    return visible


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, sinks: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities over real keys and the sink's mass, computed in fp32.

    q [B, Tq, H, Dh], k [B, Tk, Hkv, Dh], sinks [H] -> pattern [B, H, Tq, Tk], sink_mass [B, H, Tq].
    q_pos [Tq] or [B, Tq], k_pos [Tk] or [B, Tk] (see `visible_keys`).
    The sink is one extra logit per head in the softmax denominator (unscaled, no value vector), so each row
    of the pattern sums to 1 - sink_mass.
    """
    B, Tq, H, Dh = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    qg = q.float().view(B, Tq, Hkv, G, Dh)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.float()) / math.sqrt(Dh)  # [B, Hkv, G, Tq, Tk]
    visible = visible_keys(q_pos, k_pos, window)  # [Tq, Tk] or per sequence [B, Tq, Tk]
    if visible.dim() == 3:
        visible = visible[:, None, None]  # [B, 1, 1, Tq, Tk] against scores [B, Hkv, G, Tq, Tk]
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.float().view(1, Hkv, G, 1, 1).expand(B, Hkv, G, Tq, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)
    pattern = probs[..., :-1].reshape(B, H, Tq, -1)
    sink_mass = probs[..., -1].reshape(B, H, Tq)
    return pattern, sink_mass


def weighted_values(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z [B, Tq, H, Dh] = pattern [B, H, Tq, Tk] @ v [B, Tk, Hkv, Dh] (query head h reads kv head h // G)."""
    B, H, Tq, Tk = pattern.shape
    Hkv, Dh = v.shape[2], v.shape[3]
    pg = pattern.view(B, Hkv, H // Hkv, Tq, Tk)
    z = torch.einsum("bhgqk,bkhd->bqhgd", pg.float(), v.float())
    return z.reshape(B, Tq, H, Dh).to(v.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, q_pos: torch.Tensor,
    k_pos: torch.Tensor, window: int | None, need_pattern: bool = False, query_chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention with sinks: (z [B, Tq, H, Dh], sink_mass [B, H, Tq] fp32, pattern [B, H, Tq, Tk] or None).

    Without `need_pattern`, queries are processed in chunks so memory stays O(chunk * Tk), not O(Tq * Tk).
    """
    if need_pattern:
        pattern, sink_mass = attention_weights(q, k, sinks, q_pos, k_pos, window)
        return weighted_values(pattern, v), sink_mass, pattern
    zs, sinks_out = [], []
    for start in range(0, q.shape[1], query_chunk):
        stop = start + query_chunk
        pattern, sink_mass = attention_weights(q[:, start:stop], k, sinks, q_pos[..., start:stop], k_pos,
                                              window)
        zs.append(weighted_values(pattern, v))
        sinks_out.append(sink_mass)
    return torch.cat(zs, dim=1), torch.cat(sinks_out, dim=2), None


# -- mixture of experts ------------------------------------------------------------------------------------


def route(
    router_logits: torch.Tensor, k: int, reroute_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on raw logits (rerouted experts excluded), softmax over the k chosen values.

    router_logits [..., E] -> indices [..., k] int64, weights [..., k] (fp32).
    """
    logits = router_logits.float()
    if reroute_mask is not None:
        logits = logits.masked_fill(reroute_mask, float("-inf"))
    values, indices = torch.topk(logits, k, dim=-1)
    return indices, torch.softmax(values, dim=-1)


def swiglu(h: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU. h [N, 2I] with gate units in even columns, linear units in odd -> [N, I]."""
    gate, linear = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def moe_experts(
    x: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor,
    mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, per_expert: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run each token through its chosen experts only, dequantizing one expert's MXFP4 weights at a time.

    Decoded experts come from `expert_cache.EXPERT_CACHE` when the model is small enough to keep them.

    x [N, D], topk_indices [N, k], topk_weights [N, k] -> y [N, D] = sum_k weight * expert_out
    (and expert_out [N, k, D], each chosen expert's output with its bias, before weighting, if per_expert).
    Tokens are grouped by expert, so the work is proportional to N * k, never to N * E.
    """
    N, D = x.shape
    k = topk_indices.shape[1]
    flat_experts = topk_indices.reshape(-1)  # [N * k]
    expert_out = x.new_empty(N * k, D)
    for expert in torch.unique(flat_experts).tolist():
        slots = (flat_experts == expert).nonzero().squeeze(1)  # which (token, choice) pairs use this expert
        tokens = x[slots // k]  # [n_e, D]
        w1 = EXPERT_CACHE.get(mlp1_blocks, mlp1_scales, expert, x.dtype)  # [2I, D]
        h = F.linear(tokens, w1, mlp1_bias[expert].to(x.dtype))  # [n_e, 2I]
        w2 = EXPERT_CACHE.get(mlp2_blocks, mlp2_scales, expert, x.dtype)  # [D, I]
        expert_out[slots] = F.linear(swiglu(h, limit, alpha), w2, mlp2_bias[expert].to(x.dtype))
    expert_out = expert_out.view(N, k, D)
    y = (expert_out * topk_weights.to(x.dtype).unsqueeze(-1)).sum(dim=1)
    return (y, expert_out) if per_expert else y
