"""python -m ossscope.collect: prompts file parsing, statistics, 2 ranks under torchrun (gloo, loopback)
equal to one process, and resuming after a crash without redoing finished prompts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _widget_fixtures import synthetic_trace

import ossscope
from ossscope import collect
from ossscope.collect import PromptFileError, PromptStats

SPECIALS = list(range(199_998, 200_019))  # harmony's special tokens, so the tiny model can chat


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    """The tiny random model with a compact vocabulary (it speaks harmony), written as a checkpoint."""
    model = ossscope.random_model("tiny", seed=3, device="cpu")
    model.vocab_map = list(range(model.config.vocab_size - len(SPECIALS))) + SPECIALS
    model.unknown_id = 0
    return ossscope.write_checkpoint(model, tmp_path_factory.mktemp("collect") / "tiny-chat")


def write_prompts(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) and line.startswith("#raw ") else json.dumps(line))
                            .removeprefix("#raw ") + "\n" for line in lines))
    return path


PROMPTS = [
    "What is 2 + 2?",
    {"id": "weather", "prompt": "Is it raining in Paris?", "reasoning": "low"},
    {"messages": [{"role": "user", "content": "Say hi."}], "seed": 7},
    {"id": "dev", "prompt": "Count to three.", "developer": "Be brief.", "max_new_tokens": 3},
    "Name a colour.",
]


def run_cli(args: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 90.0):
    """Run the command line in a subprocess: plain python for 1 process, torchrun on loopback for more."""
    if nproc == 1:
        command = [sys.executable, "-m", "ossscope.collect", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "--local-addr=127.0.0.1",
                   "-m", "ossscope.collect", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
                **(env or {})}
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)


def single_process(checkpoint: Path, prompts_file: Path, out: Path, runner, mode: str) -> dict:
    """The reference: the same prompts, one process, in this interpreter (1 thread, as the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ossscope.load(checkpoint, device="cpu", progress=False)
        prompts = collect.read_prompts(prompts_file)
        result = collect.collect(model, prompts, out, runner, mode)
        assert not result.failed
        return collect.merge(out, prompts)
    finally:
        torch.set_num_threads(threads)


# -- prompts file --------------------------------------------------------------------------------------------


def test_read_prompts_accepts_every_form(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [*PROMPTS, {"tokens": [1, 2, 3], "id": "raw.ids_1"}])
    path.write_text(path.read_text() + "\n   \n")  # blank lines are skipped
    prompts = collect.read_prompts(path)
    assert [p.id for p in prompts] == ["line-1", "weather", "line-3", "dev", "line-5", "raw.ids_1"]
    assert [p.index for p in prompts] == list(range(6)) and prompts[5].line == 6
    assert prompts[0].messages == "What is 2 + 2?"
    assert prompts[1].options == {"reasoning": "low"}
    assert prompts[2].messages == [{"role": "user", "content": "Say hi."}]
    assert prompts[2].options == {"seed": 7}
    assert prompts[5].tokens == [1, 2, 3] and prompts[5].messages is None


@pytest.mark.parametrize("line, message", [
    ("#raw {\"prompt\": \"unterminated}", r"p\.jsonl:3: not valid JSON: Unterminated string"),
    ("#raw [1, 2", r"p\.jsonl:3: not valid JSON"),
    (42, r"p\.jsonl:3: expected a JSON object or string, got int"),
    ({"id": "a/b", "prompt": "x"}, r"p\.jsonl:3: id 'a/b' must be"),
    ({"id": "first", "prompt": "x"}, r"p\.jsonl:3: id 'first' was already used on line 1"),
    ({"text": "x"}, r"p\.jsonl:3: give exactly one of 'prompt'"),
    ({"prompt": "x", "tokens": [1]}, r"p\.jsonl:3: give exactly one of"),
    ({"messages": "hi"}, r"p\.jsonl:3: 'messages' must be a non-empty list"),
    ({"tokens": [1, -2]}, r"p\.jsonl:3: 'tokens' must be a non-empty list of non-negative"),
    ({"prompt": "x", "max_new_tokens": "5"}, r"p\.jsonl:3: 'max_new_tokens' has the wrong type"),
])
def test_read_prompts_names_the_bad_line(tmp_path, line, message):
    path = write_prompts(tmp_path / "p.jsonl", [{"id": "first", "prompt": "ok"}, "fine", line])
    with pytest.raises(PromptFileError, match=message):
        collect.read_prompts(path)


def test_read_prompts_rejects_tokens_when_chatting_and_empty_files(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", ["ok", {"tokens": [4]}])
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: 'tokens' prompts are only for --no-generate"):
        collect.read_prompts(path, allow_tokens=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        collect.read_prompts(tmp_path / "empty.jsonl")


# -- statistics ----------------------------------------------------------------------------------------------


def test_prompt_stats_count_every_routing_and_add_up(tmp_path):
    T, L, k, E, H = 7, 3, 2, 5, 4
    indices = torch.stack([torch.stack([torch.randperm(E)[:k] for _ in range(L)]) for _ in range(T)])
    sink = torch.rand(T, L, H)
    stats = PromptStats.from_records(indices, sink, E)
    for layer in range(L):
        for expert in range(E):
            assert stats.expert_counts[layer, expert] == int((indices[:, layer] == expert).sum())
    torch.testing.assert_close(stats.sink_mean, sink.double().mean(0))
    assert stats.tokens == T and int(stats.expert_counts.sum()) == T * L * k

    stats.save(tmp_path / "s.safetensors", {"id": "x"})
    loaded, info = PromptStats.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.expert_counts, stats.expert_counts)
    assert torch.equal(loaded.sink_sum, stats.sink_sum)
    assert info == {"id": "x"} and loaded.tokens == T
    both = stats + PromptStats.from_records(indices[:2], sink[:2], E)
    assert both.tokens == T + 2
    again = PromptStats.from_records(torch.cat([indices, indices[:2]]), torch.cat([sink, sink[:2]]), E)
    assert torch.equal(both.expert_counts, again.expert_counts)


def test_forward_stats_match_the_hooks(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 13))
    stats = collect.forward_stats(tiny_model, ids)
    _, cache = tiny_model.run_with_cache(ids)
    E = tiny_model.config.num_experts
    for layer in range(tiny_model.config.num_hidden_layers):
        chosen = cache[f"blocks.{layer}.mlp.hook_topk_indices"][0].flatten()
        assert torch.equal(stats.expert_counts[layer], torch.bincount(chosen, minlength=E))
        sink = cache[f"blocks.{layer}.attn.hook_sink"][0]  # [H, T]
        torch.testing.assert_close(stats.sink_mean[layer], sink.double().mean(-1))
    assert stats.tokens == 13


# -- runs ----------------------------------------------------------------------------------------------------


def test_two_ranks_chat_traces_equal_one_process(tmp_path, chat_checkpoint):
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["--model", str(chat_checkpoint), "--prompts", str(prompts_file), "--out", str(tmp_path / "two"),
            "--max-new-tokens", "6", "--seed", "11"]
    done = run_cli(args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5/5 prompts done" in done.stdout
    assert "[rank 0/2] " in done.stderr and "3 of 5 prompts are this rank's" in done.stderr
    assert "[rank 1/2] " in done.stderr and "2 of 5 prompts are this rank's" in done.stderr

    reference = single_process(chat_checkpoint, prompts_file, tmp_path / "one",
                               collect.chat_runner(max_new_tokens=6, seed=11), "traces")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["settings"]["mode"] == "traces" and summary["done"] == 5
    assert summary["expert_counts"] == reference["expert_counts"]
    assert summary["sink_mean"] == reference["sink_mean"]
    assert summary["tokens"] == reference["tokens"] == 6 * 4 + 3  # "dev" asked for 3 tokens
    assert summary["per_prompt"] == reference["per_prompt"]
    for entry in summary["per_prompt"]:
        ours = ossscope.Trace.load(tmp_path / "two" / entry["trace"])
        theirs = ossscope.Trace.load(tmp_path / "one" / entry["trace"])
        assert ours.tokens == theirs.tokens and ours.prompt_tokens == theirs.prompt_tokens
        assert torch.equal(ours.router_indices, theirs.router_indices)
        assert torch.equal(ours.sink, theirs.sink)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["seed"] == 11


def test_two_ranks_forward_stats_equal_one_process(tmp_path, chat_checkpoint):
    lines = [*PROMPTS, {"id": "ids", "tokens": [5, 9, 200, 3, 3, 17]}]
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", lines)
    args = ["--model", str(chat_checkpoint), "--prompts", str(prompts_file), "--out", str(tmp_path / "two"),
            "--mode", "stats", "--no-generate"]
    done = run_cli(args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = single_process(chat_checkpoint, prompts_file, tmp_path / "one", collect.forward_runner(),
                               "stats")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["expert_counts"] == reference["expert_counts"]
    assert summary["sink_mean"] == reference["sink_mean"]
    assert summary["per_prompt"] == reference["per_prompt"]
    assert not (tmp_path / "two" / "traces").exists()
    assert summary["per_prompt"][-1] == {"id": "ids", "line": 6, "tokens": 6, "trace": None}


RUNNER = """
import json, os
from ossscope import collect

def run(model, prompt):
    # log every call, crash hard (no cleanup, as a killed process) or fail on request
    with open(os.environ["RUNNER_LOG"], "a") as f:
        f.write(prompt.id + "\\n")
    if prompt.id == os.environ.get("CRASH_AT"):
        os._exit(3)
    if prompt.id == os.environ.get("FAIL_AT"):
        raise ValueError("this prompt is cursed")
    return collect.forward_runner()(model, prompt)
"""


def test_resume_after_crash_skips_finished_prompts(tmp_path, chat_checkpoint):
    (tmp_path / "crashy_runner.py").write_text(textwrap.dedent(RUNNER))
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    out, log = tmp_path / "out", tmp_path / "calls.log"
    args = ["--model", str(chat_checkpoint), "--prompts", str(prompts_file), "--out", str(out),
            "--mode", "stats", "--runner", "crashy_runner:run"]
    env = {"PYTHONPATH": str(tmp_path), "RUNNER_LOG": str(log)}

    crashed = run_cli(args, env={**env, "CRASH_AT": "dev", "FAIL_AT": "weather"})
    assert crashed.returncode == 3
    assert log.read_text().split() == ["line-1", "weather", "line-3", "dev"]
    assert sorted(p.name for p in (out / "stats").iterdir()) == ["line-1.safetensors", "line-3.safetensors"]
    assert "cursed" in json.loads((out / "errors" / "weather.json").read_text())["error"]
    assert not (out / "summary.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "stats").iterdir()}

    changed = run_cli([*args, "--seed", "5"], env=env)
    assert changed.returncode != 0 and "other settings (seed: 0 -> 5)" in changed.stderr

    resumed = run_cli(args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log.read_text().split()[4:] == ["weather", "dev", "line-5"]  # the failed, the crashed, the rest
    assert all((out / "stats" / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    assert not (out / "errors" / "weather.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    reference = single_process(chat_checkpoint, prompts_file, tmp_path / "clean", collect.forward_runner(),
                               "stats")
    assert summary["expert_counts"] == reference["expert_counts"]
    assert summary["sink_mean"] == reference["sink_mean"]
    assert summary["failed"] == [] and summary["missing"] == []


def test_failures_are_reported_and_merge_only_lists_them(tmp_path, tiny_model):
    prompts = collect.read_prompts(write_prompts(tmp_path / "p.jsonl", [{"tokens": [1, 2]}, {"tokens": [3]}]))

    def runner(model, prompt):
        if prompt.index == 1:
            raise RuntimeError("boom")
        return collect.forward_stats(model, torch.tensor([prompt.tokens]))

    result = collect.collect(tiny_model, prompts, tmp_path / "out", runner, "stats")
    assert result.done == ["line-1"] and result.failed == ["line-2"]
    summary = collect.merge(tmp_path / "out", prompts)
    assert summary["done"] == 1 and summary["failed"][0]["id"] == "line-2"
    assert "boom" in summary["failed"][0]["error"]
    with pytest.raises(TypeError, match="needs the runner to return a Trace"):
        collect.collect(tiny_model, prompts[:1], tmp_path / "t", runner, "traces", fail_fast=True)
    merge_only = ["--model", "unused", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"),
                  "--mode", "stats", "--merge-only", "--runner", "x:y"]
    assert collect.main(merge_only) == 1  # not every prompt is done


# -- damaged files, other prompts files, shared folders ------------------------------------------------------

FAKE_MODEL = SimpleNamespace(config=SimpleNamespace(num_experts=8))


def _prompt_list(tmp_path: Path, n: int) -> list[collect.Prompt]:
    return collect.read_prompts(write_prompts(tmp_path / "p.jsonl", [f"prompt {i}" for i in range(n)]))


def test_empty_or_truncated_markers_and_traces_are_recomputed(tmp_path):
    prompts = _prompt_list(tmp_path, 4)
    calls = []

    def runner(model, prompt):
        calls.append(prompt.id)
        return synthetic_trace(T=6, seed=prompt.index)

    out = tmp_path / "out"
    assert collect.collect(FAKE_MODEL, prompts, out, runner).done == [p.id for p in prompts]
    (out / "stats" / "line-1.safetensors").write_bytes(b"")  # a zero-byte done-marker
    marker = out / "stats" / "line-2.safetensors"
    marker.write_bytes(marker.read_bytes()[:-5])  # cut short
    trace = out / "traces" / "line-3.safetensors"
    trace.write_bytes(trace.read_bytes()[: trace.stat().st_size // 2])
    damaged = collect.merge(out, prompts)
    assert damaged["missing"] == ["line-1", "line-2"]
    assert damaged["per_prompt"][0] == {"id": "line-3", "line": 3, "tokens": 6, "trace": None}
    calls.clear()
    result = collect.collect(FAKE_MODEL, prompts, out, runner)
    assert calls == result.done == ["line-1", "line-2", "line-3"] and result.skipped == ["line-4"]
    summary = collect.merge(out, prompts)
    assert summary["done"] == 4 and all(entry["trace"] for entry in summary["per_prompt"])
    assert ossscope.Trace.load(trace).tokens == synthetic_trace(T=6, seed=2).tokens


def test_another_prompts_file_into_the_same_folder_is_refused(tmp_path):
    first = write_prompts(tmp_path / "a.jsonl", ["one", "two"])
    second = write_prompts(tmp_path / "b.jsonl", ["one", "three"])
    out = tmp_path / "out"
    out.mkdir()
    args = ["--model", "nano", "--out", str(out), "--mode", "stats", "--no-generate"]
    collect.check_settings(out, collect.run_settings(collect.build_parser().parse_args([*args, "--prompts",
                                                                                        str(first)])))
    assert json.loads((out / "run.json").read_text())["prompts_sha256"] == collect.prompts_sha256(first)
    with pytest.raises(ValueError, match="holds a run of another prompts file"):
        collect.main([*args, "--prompts", str(second)])  # refused before any model is loaded
    # A run.json from before the hash was kept gains it instead of refusing the resume.
    old = {k: v for k, v in json.loads((out / "run.json").read_text()).items() if k != "prompts_sha256"}
    (out / "run.json").write_text(json.dumps(old))
    collect.check_settings(out, collect.run_settings(collect.build_parser().parse_args([*args, "--prompts",
                                                                                        str(second)])))
    assert json.loads((out / "run.json").read_text())["prompts_sha256"] == collect.prompts_sha256(second)


def test_merge_deletes_only_its_own_or_dead_processes_temp_files(tmp_path):
    prompts = _prompt_list(tmp_path, 1)
    out = tmp_path / "out"
    collect.collect(FAKE_MODEL, prompts, out, lambda m, p: PromptStats.zeros(2, 8, 4), "stats")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = collect._HOST_TAG
    mine = out / "stats" / f".line-1.safetensors.{host}.{os.getpid()}.tmp"
    gone = out / "stats" / f".line-1.safetensors.{host}.{int(dead.stdout)}.tmp"
    live = out / "stats" / f".line-1.safetensors.{host}.1.tmp"  # pid 1 is alive: another collect writing
    remote = out / "traces" / f".line-1.safetensors.other-host.{os.getpid()}.tmp"
    odd = out / "stats" / ".notes.tmp"
    for path in (mine, gone, live, remote, odd):
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    collect.merge(out, prompts)
    assert not mine.exists() and not gone.exists()
    assert live.exists() and remote.exists() and odd.exists()


def test_two_collects_on_one_folder_never_compute_a_prompt_twice(tmp_path):
    prompts = _prompt_list(tmp_path, 12)
    out = tmp_path / "out"
    calls: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def runner(model, prompt):
        with lock:
            calls.append((threading.current_thread().name, prompt.id))
        time.sleep(0.02)  # long enough for the other collect to reach the same prompt
        if prompt.id == "line-5":
            raise RuntimeError("cursed")  # failed here: the other collect must not retry it in the same run
        return PromptStats.zeros(2, 8, 4)

    results = {}

    def run(name):
        start.wait()
        results[name] = collect.collect(FAKE_MODEL, prompts, out, runner, "stats")

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    computed = [prompt_id for _, prompt_id in calls]
    assert sorted(computed) == sorted(p.id for p in prompts)  # every prompt once, none twice
    assert {name for name, _ in calls} == {"a", "b"}  # and both collects did some of the work
    a, b = results["a"], results["b"]
    assert sorted(a.done + b.done) == sorted(p.id for p in prompts if p.id != "line-5")
    assert (a.failed + b.failed) == ["line-5"]
    assert not list((out / "claims").glob("*.claim"))  # every claim released
    # A claim left by a process that died is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "claims" / "line-5.claim").write_text(json.dumps({"host": collect._HOST, "pid": int(dead.stdout),
                                                             "token": "x"}))
    calls.clear()
    retry = collect.collect(FAKE_MODEL, prompts, out, runner, "stats")
    assert calls == [("MainThread", "line-5")] and retry.failed == ["line-5"]


def test_a_megabyte_prompt_is_an_error_file_and_the_run_goes_on(tmp_path):
    blob = "A" * 1_000_000  # base64 of zeros, no space: harmony's encoder panicked (a BaseException)
    prompts = collect.read_prompts(write_prompts(tmp_path / "p.jsonl", [{"id": "blob", "prompt": blob}, "Hi."]))
    model = ossscope.random_model("tiny", seed=3, device="cpu")  # a 4,096-token context
    model.vocab_map, model.unknown_id = list(range(model.config.vocab_size - len(SPECIALS))) + SPECIALS, 0
    result = collect.collect(model, prompts, tmp_path / "out", collect.chat_runner(max_new_tokens=2))
    assert result.failed == ["blob"] and result.done == ["line-2"]
    error = json.loads((tmp_path / "out" / "errors" / "blob.json").read_text())["error"]
    assert "ContextLimitError" in error and "context limit" in error

    class PanicException(BaseException):  # pyo3's panics are BaseExceptions: they must not end the run
        pass

    def panicking(model, prompt):
        raise PanicException("called `Result::unwrap()` on an `Err` value")

    result = collect.collect(model, prompts, tmp_path / "again", panicking, "stats")
    assert result.failed == ["blob", "line-2"]
    assert "PanicException" in json.loads((tmp_path / "again" / "errors" / "line-2.json").read_text())["error"]


def test_batched_collect_equals_one_at_a_time_and_resumes(tmp_path, chat_checkpoint):
    """--batch-size: the same files as one prompt at a time (greedy), each prompt claimed and written on its own;
    a rerun recomputes only what is missing; a prompt that cannot run is an error file and the batch goes on."""
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS + [{"id": "hot", "prompt": "Hi",
                                                                          "temperature": 0.7}])
    prompts = collect.read_prompts(prompts_file)
    model = ossscope.load(chat_checkpoint, device="cpu", progress=False)
    runner = collect.chat_runner(max_new_tokens=6, temperature=0.0)
    one = collect.collect(model, prompts, tmp_path / "one", runner, "traces")
    calls = []
    many = runner.many
    runner.many = lambda *args: calls.append(args[2]) or many(*args)
    batched = collect.collect(model, prompts, tmp_path / "many", runner, "traces", batch_size=3)
    assert calls == [3] and sorted(batched.done) == sorted(one.done) and not batched.failed
    for prompt in prompts:
        ours = ossscope.Trace.load(collect.trace_path(tmp_path / "many", prompt))
        theirs = ossscope.Trace.load(collect.trace_path(tmp_path / "one", prompt))
        assert ours.tokens == theirs.tokens and torch.equal(ours.router_indices, theirs.router_indices)
        assert ("batch" in ours.metadata) == (prompt.id != "hot")  # its own temperature: run alone
    assert not list((tmp_path / "many" / "claims").glob("*.claim"))
    collect.trace_path(tmp_path / "many", prompts[2]).unlink()
    again = collect.collect(model, prompts, tmp_path / "many", runner, "traces", batch_size=3)
    assert again.done == [prompts[2].id] and len(again.skipped) == len(prompts) - 1
    # A prompt longer than the batch's cache fails alone; the others finish.
    long = write_prompts(tmp_path / "long.jsonl", ["Hi", {"id": "big", "prompt": "word " * 9000}, "Bye"])
    failed = collect.collect(model, collect.read_prompts(long), tmp_path / "long", runner, "traces", batch_size=2)
    assert failed.failed == ["big"] and sorted(failed.done) == ["line-1", "line-3"]
    assert "big" in json.loads((tmp_path / "long" / "errors" / "big.json").read_text())["id"]
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        collect.collect(model, prompts, tmp_path / "x", runner, "traces", batch_size=0)
