"""Ragged batches and continuous batching: every sequence gets what it gets alone (torch engine, CPU)."""

from __future__ import annotations

import pytest
import torch

from ossscope.cache import ContextLimitError
from ossscope.engine import TorchEngine
from ossscope.generation import Decoder, generate


def _prompts(lengths, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, new, stop_tokens=()):
    return generate(model, [prompt], max_new_tokens=new, stop_tokens=stop_tokens)


def _assert_same_run(batched, b, alone):
    n = len(alone.tokens[0])
    assert batched.tokens[b] == alone.tokens[0]
    assert batched.stop_reasons[b] == alone.stop_reasons[0]
    assert torch.equal(batched.router_indices[b, :n], alone.router_indices[0])
    torch.testing.assert_close(batched.router_weights[b, :n], alone.router_weights[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.sink[b, :n], alone.sink[0], atol=1e-5, rtol=1e-5)


def test_cache_rows_at_their_own_positions_equal_each_row_alone(tiny_model):
    """A ragged cache (rows 3, 11 and 17 tokens long: past the window of 8) then steps at per-row positions."""
    prompts = _prompts([3, 11, 17])
    cache = tiny_model.new_cache(batch_size=3, max_len=32)
    for b, prompt in enumerate(prompts):
        tiny_model(torch.tensor([prompt]), cache=cache.row(b))
    assert cache.lengths == [3, 11, 17] and not cache.shared
    steps = torch.randint(0, 512, (3, 4), generator=torch.Generator().manual_seed(3))
    batched = torch.cat([tiny_model(steps[:, t : t + 1], cache=cache) for t in range(4)], dim=1)  # [3, 4, V]
    for b, prompt in enumerate(prompts):
        full = tiny_model(torch.tensor([prompt + steps[b].tolist()]))[0, len(prompt):]
        torch.testing.assert_close(batched[b], full, atol=1e-4, rtol=1e-4)
    assert cache.lengths == [7, 15, 21]


def test_rows_left_out_of_a_step_keep_their_cache(tiny_model):
    prompts = _prompts([5, 9])
    cache = tiny_model.new_cache(batch_size=2, max_len=32)
    for b, prompt in enumerate(prompts):
        tiny_model(torch.tensor([prompt]), cache=cache.row(b))
    before = [(lc.k.clone(), lc.pos.clone()) for lc in cache.layers]
    with cache.only([True, False]):
        tiny_model(torch.tensor([[7], [8]]), cache=cache)
    assert cache.lengths == [6, 9]
    for (k, pos), lc in zip(before, cache.layers, strict=True):
        assert torch.equal(lc.k[1], k[1]) and torch.equal(lc.pos[1], pos[1])  # row 1 untouched
        assert not torch.equal(lc.pos[0], pos[0])  # row 0 took its token
    with pytest.raises(ValueError, match="active has 3 entries"):
        with cache.only([True, True, False]):
            pass


def test_ragged_generate_equals_each_prompt_alone(tiny_model):
    prompts = _prompts([4, 13, 7])
    batched = generate(tiny_model, prompts, max_new_tokens=12, stop_tokens=())
    assert batched.prompt_lengths == [4, 13, 7] and batched.lengths == [12, 12, 12]
    for b, prompt in enumerate(prompts):
        _assert_same_run(batched, b, _alone(tiny_model, prompt, 12))


def test_continuous_batching_gives_each_prompt_its_own_run(tiny_model):
    """Five prompts through two rows; stop tokens end rows at different steps, and a freed row takes the next
    prompt while the other row is mid-sequence."""
    prompts = _prompts([6, 3, 10, 5, 8], seed=4)
    alone = [_alone(tiny_model, p, 10) for p in prompts]
    # A stop token that some prompts meet early: the most common first generated token.
    stop = max({r.tokens[0][2] for r in alone}, key=lambda t: sum(t in r.tokens[0] for r in alone))
    alone = [_alone(tiny_model, p, 10, stop_tokens=(stop,)) for p in prompts]
    assert len({len(r.tokens[0]) for r in alone}) > 1  # rows really finish at different steps
    engine = TorchEngine(tiny_model)
    batched = generate(tiny_model, prompts, max_new_tokens=10, stop_tokens=(stop,), batch_size=2, engine=engine)
    assert batched.sampling["batch_size"] == 2
    for b in range(len(prompts)):
        _assert_same_run(batched, b, alone[b])
    # Steps: the longest chain of prompts through one row, not the sum over prompts.
    assert engine.steps < sum(len(r.tokens[0]) for r in alone)


def test_many_rows_starting_at_one_step_keep_their_own_first_tokens(tiny_model):
    """Six rows reach their length limit at one step and six waiting prompts take them at once: each start puts
    its first token to the host while the step's own copy is pending (more copies in flight than a ring of 4)."""
    prompts = _prompts([5, 9, 3, 12, 7, 4, 6, 11, 8, 3, 10, 5], seed=21)
    batched = generate(tiny_model, prompts, max_new_tokens=6, stop_tokens=(), batch_size=6)
    for b, prompt in enumerate(prompts):
        _assert_same_run(batched, b, _alone(tiny_model, prompt, 6))


def test_host_copies_hand_each_handle_its_own_values():
    from ossscope.generation import _HostCopies

    copies = _HostCopies(torch.device("cpu"), slots=2)
    handles = [copies.put({"t": torch.tensor([i])}) for i in range(5)]  # none taken yet: the pool grows
    assert [int(h.take()["t"]) for h in reversed(handles)] == [4, 3, 2, 1, 0]
    assert len(copies.slots) == 5 and not any(copies.held)
    again = copies.put({"t": torch.tensor([9])})  # a taken slot is reused, the first handle keeps its value
    assert int(again.take()["t"]) == 9 and int(handles[0].take()["t"]) == 0 and len(copies.slots) == 5


def test_decoder_rows_and_errors(tiny_model):
    decoder = Decoder(tiny_model, batch_size=2, max_len=16, stop_tokens=())
    first = decoder.start_row(0, _prompts([5])[0], max_new_tokens=3, tag="a")
    with pytest.raises(RuntimeError, match="still generates"):
        decoder.start_row(0, [1, 2], max_new_tokens=2)
    with pytest.raises(ContextLimitError, match="16"):
        decoder.start_row(1, list(range(16)), max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids"):
        decoder.start_row(1, [], max_new_tokens=2)
    steps = list(decoder.run())
    assert first.tokens and len(first.tokens) == 3 and first.stop_reason == "length" and first.tag == "a"
    assert [s.rows[1] for s in steps] == [None] * 3  # the empty row is never fed
    assert decoder.cache.lengths == [8, 0]
    with pytest.raises(RuntimeError, match="used its 3 tokens"):
        decoder.resume(0)
    decoder.close()


def test_prompts_started_together_equal_prompts_started_alone(tiny_model):
    """start_rows: prompts of different lengths prefilled in one right-padded batch (a scratch cache copied into
    their rows) give each row the cache, logits and generation that start_row gives it."""
    prompts = _prompts([3, 12, 7])
    together = Decoder(tiny_model, batch_size=4, max_len=40, stop_tokens=())
    alone = Decoder(tiny_model, batch_size=4, max_len=40, stop_tokens=())
    rows = together.start_rows([(b + 1, p, 5, b) for b, p in enumerate(prompts)])
    for b, p in enumerate(prompts):
        alone.start_row(b + 1, p, 5, b)
    assert together.cache.lengths == alone.cache.lengths == [0, 3, 12, 7]
    torch.testing.assert_close(together.logits, alone.logits, atol=1e-5, rtol=1e-5)
    for big, ref in zip(together.cache.layers, alone.cache.layers, strict=True):
        assert torch.equal(big.pos, ref.pos)
        held = ref.pos >= 0  # the slots in use (the others hold whatever)
        torch.testing.assert_close(big.k[held], ref.k[held], atol=1e-5, rtol=1e-5)
    list(together.run())
    list(alone.run())
    assert [r.tokens for r in rows] == [alone.rows_now[b + 1].tokens for b in range(3)]
    with pytest.raises(RuntimeError, match="still generates"):
        together.rows_now[1].done = False
        together.start_rows([(1, [1, 2], 2, None), (2, [3], 2, None)])


def test_a_long_continuous_batch_keeps_records_of_live_rows_only(tiny_model):
    prompts = _prompts([4, 6, 5, 7, 3, 8], seed=9)
    alone = [_alone(tiny_model, p, 6) for p in prompts]
    decoder = Decoder(tiny_model, batch_size=2, max_len=32, stop_tokens=())
    rows = [decoder.start_row(b, prompts[b], 6, b) for b in range(2)]
    waiting = iter(range(2, 6))
    kept = {}
    for step in decoder.run():
        for row in step.finished():
            kept[row.tag] = decoder.row_records(row)[0]
            i = next(waiting, None)
            if i is not None:
                rows.append(decoder.start_row(row.slot, prompts[i], 6, i))
        decoder.forget_finished()
    assert sorted(kept) == list(range(6))
    for i, result in enumerate(alone):
        assert rows[i].tokens == result.tokens[0]
        assert torch.equal(kept[i]["router_indices"], result.router_indices[0])
    assert sum(r is not None for r in decoder.rows) < len(decoder.rows) // 2  # the finished ones' steps are gone
