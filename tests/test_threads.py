"""Small models on CPU run with one torch thread, restored afterwards, per Python thread."""

from __future__ import annotations

import threading

import pytest
import torch

import ossscope
from ossscope import threads


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def threads_seen_in_forward(model) -> tuple[list[int], list]:
    """A hook that records torch's thread count while the model's forward runs."""
    seen: list[int] = []
    return seen, [("hook_embed", lambda x, hook: seen.append(torch.get_num_threads()))]


def test_a_small_cpu_model_runs_with_one_thread_and_restores(tiny_model, two_threads):
    assert threads.threads_for(tiny_model) == 1
    seen, hooks = threads_seen_in_forward(tiny_model)
    with tiny_model.hooks(hooks):
        tiny_model(torch.tensor([[1, 2, 3]]))
        tiny_model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, stop_tokens=())
    assert len(seen) >= 3 and set(seen) == {1} and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model(torch.tensor([[10**6]]))
    assert torch.get_num_threads() == 2  # restored after an error too


def test_big_models_and_a_users_choice_keep_torchs_setting(tiny_model, two_threads, monkeypatch):
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", 1000)
    assert threads.threads_for(tiny_model) is None
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", 200_000_000)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.threads_for(tiny_model) is None
    seen, hooks = threads_seen_in_forward(tiny_model)
    with tiny_model.hooks(hooks):
        tiny_model(torch.tensor([[1, 2, 3]]))
    assert seen == [2]


def test_parameter_count_counts_packed_values():
    nano = ossscope.load("nano", progress=False)
    assert 20_000_000 < threads.parameter_count(nano) < 21_000_000  # the model card's 20.7M


def test_nano_chat_forwards_run_with_one_thread(two_threads):
    nano = ossscope.load("nano", progress=False)
    seen, hooks = threads_seen_in_forward(nano)
    between = []
    with nano.hooks(hooks):
        nano.chat("What is 2 + 3?", reasoning="low", max_new_tokens=8, temperature=0,
                  on_token=lambda event: between.append(torch.get_num_threads()))
    assert len(seen) >= 2 and set(seen) == {1}
    assert set(between) == {2}  # the caller's code between tokens keeps its own count


def test_forwards_in_several_threads_each_restore_their_own_count(tiny_model, two_threads):
    """torch's OpenMP thread count is per thread: two overlapping forwards must not undo each other."""
    inside, release = threading.Barrier(2, timeout=30), threading.Event()
    seen: dict[str, list[int]] = {"inside": [], "after": []}

    def worker():
        torch.set_num_threads(2)
        with threads.cpu_threads(tiny_model):
            inside.wait()
            seen["inside"].append(torch.get_num_threads())
            with threads.cpu_threads(tiny_model):  # nested: restores only at the outermost exit
                pass
            seen["inside"].append(torch.get_num_threads())
            release.wait(30)
        seen["after"].append(torch.get_num_threads())

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    release.set()
    for w in workers:
        w.join(60)
    assert seen == {"inside": [1, 1, 1, 1], "after": [2, 2]}
    assert torch.get_num_threads() == 2
