"""The torch model against Hugging Face transformers' GptOssForCausalLM (the numerical reference)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import ossscope
from ossscope.config import PRESETS

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed (pip install -e .[test])", allow_module_level=True)
# Imported, not importorskip'd: with transformers installed, a reference that fails to import is a failure.
import hf_reference  # noqa: E402

CONFIGS = {
    "tiny-top2": PRESETS["tiny"],
    # top-4 of 8, one kv head for four query heads, wider heads, a 16-token window
    "tiny-top4-mqa": PRESETS["tiny"].replace(experts_per_token=4, num_key_value_heads=1, head_dim=32,
                                             sliding_window=16, num_hidden_layers=3),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    model = ossscope.random_model(CONFIGS[request.param], seed=11, device="cpu")
    return model, hf_reference.hf_twin(model)


def test_logits_match_transformers(pair):
    model, hf = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))
    assert ids.shape[1] > 2 * model.config.sliding_window  # the window must matter
    with torch.no_grad():
        reference = hf(ids).logits
    ours = model(ids)
    assert ours.shape == (2, 45, model.config.vocab_size)
    assert hf_reference.relative_error(ours, reference) < 1e-5


def test_hook_values_match_transformers(pair):
    model, hf = pair
    ids = torch.randint(0, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(ids, output_attentions=True, output_router_logits=True, output_hidden_states=True)
    _, cache = model.run_with_cache(ids)
    k = model.config.experts_per_token
    for layer in range(model.config.num_hidden_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert hf_reference.relative_error(pattern, out.attentions[layer]) < 1e-5
        # transformers returns probabilities over keys only, so the sink is what the rows are missing
        sink = cache[f"blocks.{layer}.attn.hook_sink"]
        torch.testing.assert_close(sink, 1 - out.attentions[layer].sum(-1), atol=1e-5, rtol=0)
        logits = cache[f"blocks.{layer}.mlp.hook_router_logits"].reshape(-1, model.config.num_experts)
        assert hf_reference.relative_error(logits, out.router_logits[layer]) < 1e-5
        top_values, top_indices = torch.topk(out.router_logits[layer], k)
        assert torch.equal(cache[f"blocks.{layer}.mlp.hook_topk_indices"].reshape(-1, k), top_indices)
        torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_topk_weights"].reshape(-1, k),
                                   torch.softmax(top_values, -1), atol=1e-6, rtol=0)
        if layer + 1 < model.config.num_hidden_layers:  # transformers' last hidden state is after the final norm
            resid = cache[f"blocks.{layer}.hook_resid_post"]
            assert hf_reference.relative_error(resid, out.hidden_states[layer + 1]) < 1e-5
    normalized = cache["ln_final.hook_normalized"]
    assert hf_reference.relative_error(normalized, out.hidden_states[-1]) < 1e-5


def test_expert_outputs_combine_to_mlp_out(tiny_model):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    _, cache = tiny_model.run_with_cache(ids)
    for layer in range(tiny_model.config.num_hidden_layers):
        expert_out = cache[f"blocks.{layer}.mlp.hook_expert_out"]  # [B, T, k, D]
        weights = cache[f"blocks.{layer}.mlp.hook_topk_weights"]
        assert expert_out.shape == (2, 9, 2, 64)
        torch.testing.assert_close((expert_out * weights[..., None]).sum(2), cache[f"blocks.{layer}.hook_mlp_out"])


def test_bfloat16_stays_close_to_float32(tiny_model):
    # Compared before any routing decision can flip (a near-tie in top-k legitimately changes later layers).
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    bf16 = ossscope.random_model("tiny", seed=0, device="cpu", dtype=torch.bfloat16)
    _, ours = bf16.run_with_cache(ids)
    _, reference = tiny_model.run_with_cache(ids)
    for name in ("blocks.0.hook_attn_out", "blocks.0.mlp.hook_router_logits", "blocks.0.hook_mlp_out"):
        assert hf_reference.relative_error(ours[name].float(), reference[name]) < 2e-2, name
