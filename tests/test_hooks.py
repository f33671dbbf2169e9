"""Hooks, run_with_cache, ablation and steering semantics."""

from __future__ import annotations

import pytest
import torch

import ossscope

IDS = torch.randint(0, 512, (2, 14), generator=torch.Generator().manual_seed(5))
D, E, K = 64, 8, 2


@pytest.fixture()
def model():
    return ossscope.random_model("tiny", seed=7, device="cpu")


def test_every_documented_hook_exists_with_its_shape(model):
    logits, cache = model.run_with_cache(IDS)
    B, T, H, Hkv, Dh = 2, 14, 4, 2, 16
    expected = {
        "hook_embed": (B, T, D), "ln_final.hook_normalized": (B, T, D),
        "blocks.1.hook_resid_pre": (B, T, D), "blocks.1.hook_resid_mid": (B, T, D),
        "blocks.1.hook_resid_post": (B, T, D), "blocks.1.hook_attn_out": (B, T, D), "blocks.1.hook_mlp_out": (B, T, D),
        "blocks.1.attn.hook_q": (B, T, H, Dh), "blocks.1.attn.hook_k": (B, T, Hkv, Dh),
        "blocks.1.attn.hook_v": (B, T, Hkv, Dh), "blocks.1.attn.hook_z": (B, T, H, Dh),
        "blocks.1.attn.hook_pattern": (B, H, T, T), "blocks.1.attn.hook_sink": (B, H, T),
        "blocks.1.mlp.hook_router_logits": (B, T, E), "blocks.1.mlp.hook_topk_indices": (B, T, K),
        "blocks.1.mlp.hook_topk_weights": (B, T, K), "blocks.1.mlp.hook_expert_out": (B, T, K, D),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert torch.equal(logits, model(IDS))  # observing changes nothing
    pattern, sink = cache["blocks.0.attn.hook_pattern"], cache["blocks.0.attn.hook_sink"]
    torch.testing.assert_close(pattern.sum(-1) + sink, torch.ones_like(sink))
    assert (pattern[..., 10, :3] == 0).all() and (pattern[..., 10, 3:11] > 0).all()  # window 8 on layer 0
    assert (cache["blocks.1.attn.hook_pattern"][..., 10, :11] > 0).all()  # full attention on layer 1


def test_run_with_cache_names_list_and_predicate(model):
    _, cache = model.run_with_cache(IDS, names=["blocks.2.mlp.hook_topk_indices"])
    assert list(cache) == ["blocks.2.mlp.hook_topk_indices"]
    _, cache = model.run_with_cache(IDS, names=lambda n: n.endswith("hook_sink"))
    assert sorted(cache) == [f"blocks.{i}.attn.hook_sink" for i in range(4)]


def test_unknown_hook_name_suggests_close_ones(model):
    with pytest.raises(KeyError, match="Did you mean: blocks.3.mlp.hook_topk_indices"):
        with model.hooks([("blocks.3.mlp.hook_topk_indice", lambda t, h: None)]):
            pass
    _, cache = model.run_with_cache(IDS, names=["hook_embed"])
    with pytest.raises(KeyError, match="did you mean hook_embed"):
        cache["hook_embd"]


def test_unused_hooks_compute_nothing_extra(model):
    """The pattern and per-expert outputs are computed only for layers where someone asked for them."""
    fast_calls = {"attn": [], "experts": []}
    for layer, block in enumerate(model.blocks):
        attn_fn, experts_fn = block.attn.attention_fn, block.mlp.experts_fn
        block.attn.attention_fn = lambda *a, f=attn_fn, i=layer, **k: fast_calls["attn"].append(i) or f(*a, **k)
        block.mlp.experts_fn = lambda *a, f=experts_fn, i=layer, **k: (
            fast_calls["experts"].append((i, k.get("per_expert", False))) or f(*a, **k))
    model(IDS)
    assert fast_calls == {"attn": [0, 1, 2, 3], "experts": [(0, False), (1, False), (2, False), (3, False)]}
    fast_calls["attn"].clear(), fast_calls["experts"].clear()
    model.run_with_cache(IDS, names=["blocks.0.attn.hook_pattern", "blocks.2.mlp.hook_expert_out",
                                     "blocks.1.attn.hook_sink", "blocks.3.mlp.hook_topk_indices"])
    # Only the observed pattern leaves the attention fast path; per-expert outputs are asked of the experts
    # function (so kernels and expert parallelism serve that hook) only at the layer that hooks them.
    assert fast_calls == {"attn": [1, 2, 3], "experts": [(0, False), (1, False), (2, True), (3, False)]}


def test_hooks_are_removed_after_the_block_even_on_error(model):
    with pytest.raises(RuntimeError), model.hooks([("hook_embed", lambda t, h: None)]):
        raise RuntimeError("boom")
    assert not any(point.fns for point in model.hook_dict.values())


def test_replacing_router_logits_changes_routing(model):
    forced = torch.tensor([3, 5])

    def force(logits, hook):
        out = torch.full_like(logits, -10.0)
        out[..., forced] = torch.tensor([2.0, 1.0])
        return out

    with model.hooks([("blocks.1.mlp.hook_router_logits", force)]):
        _, cache = model.run_with_cache(IDS, names=lambda n: n.startswith("blocks.1.mlp.hook_topk"))
    assert (cache["blocks.1.mlp.hook_topk_indices"] == forced).all()
    expected = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_topk_weights"][0, 0], expected)


def test_replacing_topk_weights_changes_the_mix(model):
    with model.hooks([("blocks.2.mlp.hook_topk_weights", lambda w, h: torch.zeros_like(w))]):
        _, cache = model.run_with_cache(IDS, names=["blocks.2.hook_mlp_out"])
    assert cache["blocks.2.hook_mlp_out"].abs().max() == 0


def test_replacing_the_pattern_flows_downstream(model):
    baseline = model(IDS)

    def uniform_over_first_key(pattern, hook):
        edited = torch.zeros_like(pattern)
        edited[..., 0] = 1.0
        return edited

    with model.hooks([("blocks.1.attn.hook_pattern", uniform_over_first_key)]):
        _, cache = model.run_with_cache(IDS, names=["blocks.1.attn.hook_z", "blocks.1.attn.hook_v"])
        edited = model(IDS)
    assert not torch.allclose(edited, baseline)
    v0 = cache["blocks.1.attn.hook_v"][:, 0]  # [B, Hkv, Dh]: every query now reads the first value
    z = cache["blocks.1.attn.hook_z"]
    torch.testing.assert_close(z[:, 5], v0.repeat_interleave(2, dim=1))


def test_reroute_ablation_never_chooses_the_expert_and_restores_state(model):
    names = ["blocks.3.mlp.hook_topk_indices", "blocks.3.mlp.hook_router_logits"]
    _, before = model.run_with_cache(IDS, names=names)
    popular = int(before["blocks.3.mlp.hook_topk_indices"].flatten().mode().values)
    with model.ablate({3: [popular]}, mode="reroute"):
        assert model.active_ablation == {"mode": "reroute", "experts": {3: [popular]}}
        _, during = model.run_with_cache(IDS, names=["blocks.3.mlp.hook_topk_indices"])
    indices = during["blocks.3.mlp.hook_topk_indices"]
    assert (indices != popular).all()
    # the next best takes its place: the chosen set is the top-k of the logits without that expert
    logits = before["blocks.3.mlp.hook_router_logits"].clone()
    logits[..., popular] = float("-inf")
    assert torch.equal(indices.sort(-1).values, logits.topk(K).indices.sort(-1).values)
    assert model.active_ablation == {}
    _, after = model.run_with_cache(IDS, names=["blocks.3.mlp.hook_topk_indices"])
    assert torch.equal(after["blocks.3.mlp.hook_topk_indices"], before["blocks.3.mlp.hook_topk_indices"])


def test_zero_ablation_keeps_routing_and_drops_the_share_without_renormalizing(model):
    _, before = model.run_with_cache(IDS, names=lambda n: n.startswith("blocks.2."))
    expert = int(before["blocks.2.mlp.hook_topk_indices"][0, 0, 0])
    with model.ablate({2: [expert]}, mode="zero"):
        _, during = model.run_with_cache(IDS, names=lambda n: n.startswith("blocks.2."))
    assert torch.equal(during["blocks.2.mlp.hook_topk_indices"], before["blocks.2.mlp.hook_topk_indices"])
    chosen = before["blocks.2.mlp.hook_topk_indices"] == expert
    w_before, w_during = before["blocks.2.mlp.hook_topk_weights"], during["blocks.2.mlp.hook_topk_weights"]
    assert (w_during[chosen] == 0).all()
    assert torch.equal(w_during[~chosen], w_before[~chosen])  # the others are not renormalized
    expected = (before["blocks.2.mlp.hook_expert_out"] * w_during[..., None]).sum(2)
    torch.testing.assert_close(during["blocks.2.hook_mlp_out"], expected)


def test_ablation_errors_and_nesting(model):
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        model.set_ablation({9: [1]})
    with pytest.raises(ValueError, match="expert 8 .layer 1. is out of range"):
        model.set_ablation({1: [8]})
    with pytest.raises(ValueError, match="unknown ablation mode"):
        model.set_ablation({1: [0]}, mode="drop")
    with pytest.raises(ValueError, match="cannot reroute 7 of 8 experts"):
        model.set_ablation({1: list(range(7))})
    assert model.active_ablation == {}
    model.set_ablation({1: [2]}, mode="zero")
    with model.ablate({0: [1]}):
        assert model.active_ablation["experts"] == {0: [1]}
    assert model.active_ablation == {"mode": "zero", "experts": {1: [2]}}
    model.clear_ablation()
    assert not any(b.mlp.zeroing or b.mlp.rerouting for b in model.blocks)


def test_steering_adds_the_vector_to_resid_post(model):
    _, before = model.run_with_cache(IDS, names=["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
    vector = torch.randn(D, generator=torch.Generator().manual_seed(9))
    model.set_steering(1, vector, scale=2.0)
    _, during = model.run_with_cache(IDS, names=["blocks.1.hook_resid_post"])
    torch.testing.assert_close(during["blocks.1.hook_resid_post"], before["blocks.1.hook_resid_post"] + 2 * vector)
    model.clear_steering()
    assert model.active_steering == {}
    with pytest.raises(ValueError, match="shape .64,."):
        model.set_steering(1, torch.zeros(3))


def test_bad_input_ids(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))


def test_repr_is_a_few_lines_and_module_tree_has_every_hook_point(tiny_model):
    text = repr(tiny_model)
    assert len(text.splitlines()) == 5 and "HookPoint" not in text
    assert text.startswith("Model 'tiny' (gpt-oss architecture, ")
    assert "layers 4 (2 sliding, window 8), experts 8 top-2 (MXFP4), heads 4/2 of dim 16" in text
    assert "float32 on cpu, engine: torch" in text
    tree = tiny_model.module_tree()
    assert tree.count("HookPoint(") == len(tiny_model.hook_names())


def test_hooks_active_says_whether_any_function_is_attached(tiny_model):
    assert not tiny_model.hooks_active()
    with tiny_model.hooks([("blocks.2.attn.hook_z", lambda x, hook: None)]):
        assert tiny_model.hooks_active()
    assert not tiny_model.hooks_active()
