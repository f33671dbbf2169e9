"""The trainable twin computes the inference model's math; the checkpoint it writes loads back to the same logits."""

import json

import pytest
import torch

from ossscope.loading import load, write_checkpoint
from ossscope.nano import eval as nano_eval
from ossscope.nano import train
from ossscope.nano.data import UNKNOWN_O200K_ID


def _random_twin(seed: int = 0) -> train.NanoTwin:
    config = train.nano_config(vocab_size=97, smoke=True)
    twin = train.NanoTwin(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every parameter off its initial value, so no term hides behind a zero
        for p in twin.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return twin.eval()


def _vocab(n: int) -> dict:
    return {"o200k_ids": list(range(1000, 1000 + n - 1)) + [UNKNOWN_O200K_ID], "unknown_id": n - 1}


def test_checkpoint_loads_back_to_the_twins_logits(tmp_path):
    twin = _random_twin()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(7))  # longer than the window
    with torch.no_grad():
        before = twin(ids)
        twin.round_to_checkpoint()
        after = twin(ids)
    assert (before - after).abs().max() > 1e-3  # rounding and MXFP4 change the logits...
    write_checkpoint(train.to_model(twin, _vocab(97)), tmp_path)
    model = load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert model.vocab_map == _vocab(97)["o200k_ids"] and model.unknown_id == 96
    with torch.no_grad():
        loaded = model(ids)
    torch.testing.assert_close(loaded, after, rtol=1e-5, atol=1e-5)  # ...and the checkpoint computes the twin


def test_warm_start_moves_rows_by_o200k_id_and_computes_the_checkpoint(tmp_path):
    """A grown vocabulary in another order: the warm-started twin computes the checkpoint's logits for the same
    text, and rows the checkpoint never had keep their fresh initialisation."""
    old_twin = _random_twin()
    old_twin.round_to_checkpoint()
    old_vocab = _vocab(97)
    write_checkpoint(train.to_model(old_twin, old_vocab), tmp_path)
    kept = old_vocab["o200k_ids"][:-1][::-1]
    vocab = {"o200k_ids": [5, 6, 7] + kept + [UNKNOWN_O200K_ID], "unknown_id": 99}
    fresh = train.NanoTwin(train.nano_config(vocab_size=100, smoke=True), seed=3)
    twin = train.NanoTwin(train.nano_config(vocab_size=100, smoke=True), seed=3)
    assert train.warm_start(twin, tmp_path, vocab) == 3
    assert torch.equal(twin.embed.weight[:3], fresh.embed.weight[:3])
    old_ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(7))
    old_to_new = torch.tensor([3 + 95 - i for i in range(96)] + [99])  # row i of the old vocab is row this of the new
    with torch.no_grad():
        ref, ours = old_twin.eval()(old_ids), twin.eval()(old_to_new[old_ids])
    torch.testing.assert_close(ours[..., old_to_new], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        train.warm_start(train.NanoTwin(train.nano_config(vocab_size=100)), tmp_path, vocab)


def test_fake_quantize_is_mxfp4_forward_and_identity_backward():
    from ossscope.mxfp4 import dequantize, quantize

    w = torch.randn(6, 64, requires_grad=True)
    q = train.fake_quantize(w)
    torch.testing.assert_close(q, dequantize(*quantize(w.detach()), torch.float32))
    (q * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(64.0).expand(6, 64))


def test_twin_moe_matches_the_reference_experts():
    """The twin's dense expert mixing equals ops.moe_experts on the packed weights."""
    from ossscope import ops
    from ossscope.mxfp4 import quantize

    twin = _random_twin(3)
    twin.round_to_checkpoint()
    moe, c = twin.blocks[0].mlp, twin.config
    x = torch.randn(2, 9, c.hidden_size)
    h = ops.rms_norm(x, moe.norm.scale, c.rms_norm_eps).reshape(18, -1)
    idx, w = ops.route(moe.gate(h), c.experts_per_token)
    ref = ops.moe_experts(h, idx, w, *quantize(moe.mlp1_weight.detach()), moe.mlp1_bias.detach(),
                          *quantize(moe.mlp2_weight.detach()), moe.mlp2_bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(moe(x).reshape(18, -1), ref, rtol=1e-5, atol=1e-5)


def test_greedy_generate_matches_a_step_by_step_loop():
    twin = _random_twin(5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    stop = [11]
    got = nano_eval.greedy_generate(twin, prompts, stop, max_new_tokens=6)
    for prompt, out in zip(prompts, got, strict=True):
        seq, want = list(prompt), []
        for _ in range(6):
            nxt = int(twin(torch.tensor([seq]))[0, -1].argmax())
            want.append(nxt)
            seq.append(nxt)
            if nxt in stop:
                break
        assert out == want


def test_parse_and_score_a_tool_call():
    text = ('<|channel|>analysis<|message|>Call get_weather.<|end|><|start|>assistant to=functions.get_weather'
            '<|channel|>commentary <|constrain|>json<|message|>{"city": "Oslo"}<|call|>')
    messages = nano_eval.parse_completion(text)
    assert [m["channel"] for m in messages] == ["analysis", "commentary"]
    assert messages[1]["recipient"] == "functions.get_weather" and messages[1]["stop"] == "<|call|>"
    item = {"kind": "tool", "effort": "low", "answer": {"name": "get_weather", "arguments": {"city": "Oslo"},
                                                        "final": "It is 3°C and foggy in Oslo."}}
    final = nano_eval.parse_completion("<|channel|>final<|message|>It is 3°C and foggy in Oslo.<|return|>")
    assert nano_eval.score_item(item, messages, final) == {
        "kind": "tool", "effort": "low", "analysis_chars": len("Call get_weather."), "valid_call": True,
        "parses": True, "right_function": True, "right_arguments": True, "correct": True}
    wrong = nano_eval.parse_completion(text.replace("Oslo", "Lima"))
    assert not nano_eval.score_item(item, wrong, None)["valid_call"]
    real_order = nano_eval.parse_completion(text.replace(" to=functions.get_weather<|channel|>commentary",
                                                         "<|channel|>commentary to=functions.get_weather"))
    assert nano_eval.score_item(item, real_order, None)["valid_call"]


def test_analysis_tokens_counts_only_the_analysis_channel():
    # <|channel|> analysis <|message|> a b <|end|> <|start|> assistant <|channel|> final <|message|> c <|return|>
    ids = [200005, 35644, 200008, 10, 11, 200007, 200006, 173781, 200005, 17196, 200008, 12, 200002]
    assert nano_eval.analysis_tokens(ids) == 2


@pytest.mark.slow
def test_smoke_training_runs_end_to_end(tmp_path):
    pytest.importorskip("openai_harmony")
    train.main(["--smoke", "--steps", "6", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["checkpoint_max_abs_diff"] < 1e-4
    assert (tmp_path / "weights" / "model.safetensors").is_file()


def test_corpus_round_trips_through_the_compressed_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (57,), generator=g)
    tokens = torch.randint(0, 60_000, (int(lengths.sum()),), generator=g, dtype=torch.int32)
    mask = torch.rand(len(tokens), generator=g) < 0.4  # a length that is not a multiple of 8 bits
    train.save_corpus(tmp_path / "c.npz", tokens, mask, lengths)
    back = train.load_corpus(tmp_path / "c.npz")
    assert torch.equal(back["tokens"], tokens) and torch.equal(back["mask"], mask)
    assert torch.equal(back["lengths"], lengths)
    with pytest.raises(ValueError, match="65,536"):
        train.save_corpus(tmp_path / "big.npz", tokens + 70_000, mask, lengths)


def test_batches_fill_a_token_budget_and_cover_every_episode_once_per_epoch():
    lengths = torch.tensor([5, 17, 3, 30, 9, 9, 12, 2, 25, 8])
    tokens = torch.arange(int(lengths.sum()), dtype=torch.int32)
    mask = tokens % 3 == 0
    batches = train.Batches({"tokens": tokens, "mask": mask, "lengths": lengths}, batch_tokens=40, pad_id=-1,
                            device="cpu", seed=0)
    starts = torch.cumsum(lengths, 0) - lengths
    seen = []
    for group in batches.groups:
        width = int(lengths[group].max())
        assert len(group) == 1 or len(group) * width <= 40  # the budget holds (a lone long episode may exceed it)
        seen += group.tolist()
    assert sorted(seen) == list(range(len(lengths)))
    it = iter(batches)
    for _ in range(len(batches.groups)):
        batch, batch_mask = next(it)
        for row, row_mask in zip(batch, batch_mask, strict=True):  # each row is one episode, then padding
            n = int((row != -1).sum())
            episode = int(torch.nonzero(lengths == n)[0]) if (lengths == n).sum() == 1 else None
            if episode is not None:
                assert torch.equal(row[:n], tokens[starts[episode] : starts[episode] + n].long())
                assert torch.equal(row_mask[:n], mask[starts[episode] : starts[episode] + n])
            assert not row_mask[n:].any()


def _dense_moe(moe: train.TwinMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then the chosen k mixed: the plainest statement of the twin's MoE."""
    from ossscope import ops

    c = moe.config
    h = ops.rms_norm(x, moe.norm.scale, c.rms_norm_eps).reshape(-1, c.hidden_size)
    indices, weights = ops.route(moe.gate(h), c.experts_per_token)
    h1 = torch.einsum("nd,efd->enf", h, moe.mlp1_weight) + moe.mlp1_bias[:, None]
    out = torch.einsum("eni,edi->end", ops.swiglu(h1, c.swiglu_limit, c.swiglu_alpha), moe.mlp2_weight)
    out = out + moe.mlp2_bias[:, None]  # [E, N, D]
    chosen = out[indices, torch.arange(h.shape[0])[:, None]]  # [N, k, D]
    return (chosen * weights.unsqueeze(-1)).sum(1).view_as(x)


def test_grouped_twin_moe_has_the_dense_forward_and_gradients():
    twin = _random_twin(11)
    moe = twin.blocks[1].mlp
    x = torch.randn(3, 13, twin.config.hidden_size, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grads = []
    for forward in (moe, lambda inp: _dense_moe(moe, inp)):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y = forward(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([y.detach()] + [t.grad.clone() for t in (x, moe.gate.weight, moe.mlp1_weight, moe.mlp1_bias,
                                                              moe.mlp2_weight, moe.mlp2_bias)])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grads[0][3].abs().sum() > 0  # the comparison is not vacuous: gradients reach the experts
