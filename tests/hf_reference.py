"""Build Hugging Face transformers' GptOssForCausalLM with exactly the weights of an ossscope model.

The MXFP4 expert weights are decoded with transformers' own `convert_moe_packed_tensors`, so a test that
compares logits also checks our MXFP4 decoding against theirs.
"""

from __future__ import annotations

import torch
from transformers import GptOssConfig as HFConfig
from transformers import GptOssForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ossscope import Model


def hf_config(model: Model) -> HFConfig:
    c = model.config
    data = c.to_hf_json()
    data.pop("quantization_config")
    data.pop("rope_scaling")
    data.pop("rope_theta")
    data.pop("architectures")
    data.pop("model_type")
    data.pop("experts_per_token")
    return HFConfig(**data, attn_implementation="eager")


@torch.no_grad()
def hf_twin(model: Model, dtype: torch.dtype = torch.float32) -> GptOssForCausalLM:
    """transformers' model holding `model`'s weights (experts dequantized by transformers)."""
    c = model.config
    hf = GptOssForCausalLM(hf_config(model)).to(dtype).eval()
    hf.model.embed_tokens.weight.copy_(model.embed.weight)
    hf.model.norm.weight.copy_(model.ln_final.scale)
    hf.lm_head.weight.copy_(model.unembed.weight)
    q, kv = c.q_width, c.kv_width
    for ours, theirs in zip(model.blocks, hf.model.layers, strict=True):
        attn, mlp = ours.attn, ours.mlp
        theirs.input_layernorm.weight.copy_(attn.norm.scale)
        theirs.post_attention_layernorm.weight.copy_(mlp.norm.scale)
        sa = theirs.self_attn
        for proj, (start, stop) in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv))):
            getattr(sa, f"{proj}_proj").weight.copy_(attn.qkv.weight[start:stop])
            getattr(sa, f"{proj}_proj").bias.copy_(attn.qkv.bias[start:stop])
        sa.o_proj.weight.copy_(attn.out.weight)
        sa.o_proj.bias.copy_(attn.out.bias)
        sa.sinks.copy_(attn.sinks)
        theirs.mlp.router.weight.copy_(mlp.gate.weight)
        theirs.mlp.router.bias.copy_(mlp.gate.bias)
        experts = theirs.mlp.experts
        experts.gate_up_proj.copy_(convert_moe_packed_tensors(mlp.mlp1_blocks, mlp.mlp1_scales, dtype=dtype))
        experts.gate_up_proj_bias.copy_(mlp.mlp1_bias)
        experts.down_proj.copy_(convert_moe_packed_tensors(mlp.mlp2_blocks, mlp.mlp2_scales, dtype=dtype))
        experts.down_proj_bias.copy_(mlp.mlp2_bias)
    return hf


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return float((ours - reference).norm() / reference.norm())
