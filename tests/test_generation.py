"""Generation: cached decoding equals recomputation, the per-token record, sampling, stop tokens, streaming,
and greedy choices equal to Hugging Face transformers' on a model with the full 201,088-token vocabulary."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import ossscope
from ossscope.config import PRESETS
from ossscope.engine import TorchEngine
from ossscope.generation import argmax_rows, generate, sample_next


class LogitsSpy(TorchEngine):
    """The torch engine, keeping the logits after every prefill and step."""

    def __init__(self, model):
        super().__init__(model)
        self.logits = []

    def prefill(self, input_ids, cache):
        logits = super().prefill(input_ids, cache)
        self.logits.append(logits)
        return logits

    def step(self, tokens, cache, capture=(), active=None):
        logits, record = super().step(tokens, cache, capture, active)
        self.logits.append(logits)
        return logits, record


def test_cached_greedy_generation_matches_full_recompute(tiny_model):
    # 6 prompt + 14 new tokens: well past the sliding window of 8, so the ring buffer is exercised.
    prompt = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(5))
    spy = LogitsSpy(tiny_model)
    result = generate(tiny_model, prompt, max_new_tokens=14, stop_tokens=(), engine=spy)
    step_logits = spy.logits
    assert len(step_logits) == 15  # the prefill, then each of the 14 tokens fed once (the last one too)

    assert result.lengths == [14, 14] and result.stop_reasons == ["length", "length"]
    full_ids = torch.cat([prompt, torch.tensor(result.tokens)], dim=1)  # [2, 20]
    logits, cache = tiny_model.run_with_cache(full_ids, names=lambda n: "hook_topk" in n or "hook_sink" in n)
    # Logits after each fed token (prefill, then every generated token) equal the full recomputation's.
    for step, cached in enumerate(step_logits):
        torch.testing.assert_close(cached, logits[:, 5 + step], atol=1e-4, rtol=1e-4)
    # Greedy: every token is the argmax of the full recomputation at the previous position.
    assert torch.equal(logits[:, 5:-1].argmax(-1), full_ids[:, 6:])
    # Record row t = what the model did with generated token t as input (position 6 + t).
    L = tiny_model.config.num_hidden_layers
    for layer in range(L):
        torch.testing.assert_close(
            result.router_indices[:, :, layer], cache[f"blocks.{layer}.mlp.hook_topk_indices"][:, 6:]
        )
        torch.testing.assert_close(
            result.router_weights[:, :, layer], cache[f"blocks.{layer}.mlp.hook_topk_weights"][:, 6:], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(result.sink[:, :, layer], cache[f"blocks.{layer}.attn.hook_sink"][:, :, 6:].mT)
    assert result.router_indices.shape == (2, 14, L, 2) and result.sink.shape == (2, 14, L, 4)


def test_capture_extra_hooks(tiny_model):
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(6))
    names = ["blocks.2.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_pattern"]
    result = generate(tiny_model, prompt, max_new_tokens=7, stop_tokens=(), capture=names)
    full_ids = torch.cat([prompt, torch.tensor(result.tokens)], dim=1)
    _, cache = tiny_model.run_with_cache(full_ids, names=names)
    torch.testing.assert_close(result.captured[names[0]], cache[names[0]][:, 5:], atol=1e-4, rtol=1e-4)
    # Full layer: keys grow by one a step; padded to the last step's 12 keys, matching the full pattern.
    pattern = result.captured[names[1]]  # [B, N, H, S]
    assert pattern.shape == (1, 7, 4, 12)
    torch.testing.assert_close(pattern, cache[names[1]][:, :, 5:].transpose(1, 2), atol=1e-5, rtol=1e-5)
    # Sliding layer: at most 8 cached keys + the new one; rows sum to 1 - sink mass.
    sliding = result.captured[names[2]]
    assert sliding.shape == (1, 7, 4, 9)
    torch.testing.assert_close(sliding.sum(-1), 1 - result.sink[:, :, 0], atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="unknown hook name"):
        generate(tiny_model, prompt, max_new_tokens=2, capture=["blocks.0.hook_resid_psot"])


def test_stop_tokens_end_each_row_on_its_own(tiny_model):
    prompt = torch.randint(0, 512, (2, 4), generator=torch.Generator().manual_seed(7))
    free = generate(tiny_model, prompt, max_new_tokens=12, stop_tokens=())
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    result = generate(tiny_model, prompt, max_new_tokens=12, stop_tokens=[stop])
    assert result.tokens[0] == free.tokens[0][: first + 1] and result.stop_reasons[0] == "stop"
    if stop in free.tokens[1]:
        assert result.tokens[1] == free.tokens[1][: free.tokens[1].index(stop) + 1]
    else:
        assert result.tokens[1] == free.tokens[1] and result.stop_reasons[1] == "length"
    N = max(result.lengths)
    assert result.router_indices.shape[1] == N
    # A stopped row's real records are unchanged by the rows that go on.
    torch.testing.assert_close(result.router_indices[0, : first + 1], free.router_indices[0, : first + 1])
    # Harmony's stop tokens are the default.
    assert sorted(generate(tiny_model, prompt, max_new_tokens=1).sampling["stop_tokens"]) == [200002, 200012]


def test_sampling_top_p_temperature_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.8, generator=g)
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[2] == 0 and counts[3] == 0  # outside the top 80%
    assert abs(counts[0] - 0.625) < 0.03  # renormalized over {0.5, 0.3}
    draws = sample_next(logits, temperature=1.0, top_p=1.0, generator=g)
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    # A low temperature sharpens towards the argmax; top_p tiny keeps only the argmax.
    cold = sample_next(logits, temperature=0.1, generator=g)
    assert (cold == 0).float().mean() > 0.95
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g), torch.zeros(4000).long())
    assert torch.equal(sample_next(logits, temperature=0.0), torch.zeros(4000).long())
    with pytest.raises(ValueError):
        sample_next(logits, temperature=-1)
    with pytest.raises(ValueError):
        sample_next(logits, temperature=float("nan"))


def test_two_pass_argmax_equals_torch_argmax_ties_and_infinities_included():
    x = torch.randn(4, 201_088, generator=torch.Generator().manual_seed(1))
    x[1, 5000] = x[1, 150_000] = 50.0  # tied across chunks: the first index wins, as in torch
    x[2, 3141] = x[2, 3142] = 60.0  # tied across a chunk boundary
    x[3, 199_999] = float("inf")
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert argmax_rows(x).tolist()[1:] == [5000, 3141, 199_999]
    small = torch.randn(2, 100)
    assert torch.equal(argmax_rows(small), small.argmax(-1))


def test_seeded_sampling_is_reproducible(tiny_model):
    prompt = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(8))
    a = generate(tiny_model, prompt, max_new_tokens=10, temperature=1.0, seed=123, stop_tokens=())
    b = generate(tiny_model, prompt, max_new_tokens=10, temperature=1.0, seed=123, stop_tokens=())
    c = generate(tiny_model, prompt, max_new_tokens=10, temperature=1.0, seed=124, stop_tokens=())
    assert a.tokens == b.tokens and a.tokens != c.tokens
    drawn = generate(tiny_model, prompt, max_new_tokens=10, temperature=1.0, stop_tokens=())
    replay = generate(
        tiny_model, prompt, max_new_tokens=10, temperature=1.0, stop_tokens=(), seed=drawn.sampling["seed"]
    )
    assert drawn.tokens == replay.tokens


def test_streaming_events_and_early_stop(tiny_model):
    prompt = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(9))
    seen = []
    stream = generate(tiny_model, prompt, max_new_tokens=8, stop_tokens=(), stream=True, on_token=seen.append)
    events = []
    for event in stream:
        events.append(event)
        if len(events) == 3:
            break
    partial = stream.result
    assert [e.token for e in events] == partial.tokens[0] and len(seen) == 3
    assert partial.stop_reasons == ["interrupted"] and partial.router_indices.shape[1] == 3
    full = generate(tiny_model, prompt, max_new_tokens=8, stop_tokens=())
    assert full.tokens[0][:3] == partial.tokens[0]
    torch.testing.assert_close(events[1].record["router_indices"], full.router_indices[0, 1])
    assert events[1].record["sink"].shape == (4, 4)


def test_greedy_matches_transformers_with_full_vocabulary():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    import hf_reference  # with transformers installed, a reference that fails to import is a failure

    config = PRESETS["tiny"].replace(vocab_size=201_088)
    model = ossscope.random_model(config, seed=3, device="cpu")
    hf = hf_reference.hf_twin(model)
    prompt = torch.randint(0, 201_088, (1, 7), generator=torch.Generator().manual_seed(10))
    ours = generate(model, prompt, max_new_tokens=13, stop_tokens=())  # 20 tokens: past the window of 8
    with torch.no_grad():
        theirs = hf.generate(
            prompt, max_new_tokens=13, min_new_tokens=13, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert ours.tokens[0] == theirs[0, 7:].tolist()


def test_bad_arguments_are_clear(tiny_model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_model, [1, 2, 3], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model, [1, 2, 3], top_p=0.0)
    result = generate(tiny_model, [1, 2, 3], max_new_tokens=2, stop_tokens=())  # a 1-D prompt is one row
    assert result.lengths == [2]
