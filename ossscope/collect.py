"""`python -m ossscope.collect`: trace many prompts, data-parallel over GPUs, resumable, merged at the end.

    torchrun --nproc-per-node 8 -m ossscope.collect --model gpt-oss-20b --prompts prompts.jsonl --out runs/a
    python -m ossscope.collect --model nano --prompts prompts.jsonl --out runs/b --mode stats --no-generate

Each rank loads the whole model on its own GPU and takes every W-th prompt (prompt i goes to rank i % W). For
each prompt it writes, atomically (a temporary file renamed into place):
    traces/ID.safetensors   the Trace of `model.chat(...)` (mode "traces" only)
    stats/ID.safetensors    the prompt's router/sink statistics: this file is the prompt's done-marker
    errors/ID.json          the traceback, when the prompt failed (the others go on; a rerun retries it)
Run the same command again after a crash and finished prompts are skipped (an empty or truncated marker or
trace is not finished: it is computed again). run.json keeps the settings and the prompts file's SHA-256; a
rerun with other settings or another prompts file into the same folder is refused. Several collects may share
a folder (two jobs, or a second one started by mistake): each claims a prompt (claims/ID.claim) before it
computes it, so none is computed twice at once. When every rank is done, rank 0
merges the statistics, in prompt order, into summary.json: expert counts per layer [L][E], mean sink mass per
layer and head [L][H] (over the tokens counted), and an index of the prompts.

Statistics count the generated tokens (each row of the Trace), or with --no-generate the prompt's own tokens
in one forward pass (`run_with_cache`, no sampling: fast, and the right thing for router statistics over a
corpus). prompts.jsonl holds one prompt per line: a JSON string (the user's message) or an object with
"prompt" (text) or "messages" (a conversation) or, with --no-generate only, "tokens" (model token ids), and
optionally "id" (letters, digits, . _ -; default "line-N"), "reasoning", "developer", "max_new_tokens",
"temperature", "seed". Other keys are ignored. Each prompt samples with seed --seed + its index unless it
gives its own, so results do not depend on how many ranks ran them.

In Python, `collect(model, prompts, out, runner)` takes any per-prompt function `runner(model, prompt)` that
returns a Trace or PromptStats; `--runner module:function` names one on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import re
import socket
import struct
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .trace import Trace

MODES = ("traces", "stats")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_OPTION_TYPES = {"reasoning": str, "developer": str, "max_new_tokens": int, "temperature": (int, float),
                 "seed": int}
SETTINGS_FILE, SUMMARY_FILE = "run.json", "summary.json"


class PromptFileError(ValueError):
    """A prompts file that cannot be used as it is; the message names the file and line."""


# -- prompts -------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One line of the prompts file."""

    index: int  # position among the prompts (0-based); decides the rank and the default seed
    line: int  # line number in the file (1-based)
    id: str
    messages: str | list[Any] | None = None  # the user's text, or a conversation
    tokens: list[int] | None = None  # model token ids, for --no-generate
    options: dict[str, Any] = field(default_factory=dict)  # per-prompt chat options


def read_prompts(path: str | os.PathLike, allow_tokens: bool = True) -> list[Prompt]:
    """Parse a JSONL prompts file. Raises PromptFileError naming the line of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
            prompt = _prompt_of(record, len(prompts), number, where, allow_tokens)
            if prompt.id in seen:
                raise PromptFileError(f"{where}: id {prompt.id!r} was already used on line {seen[prompt.id]}")
            seen[prompt.id] = number
            prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts


def _prompt_of(record: Any, index: int, line: int, where: str, allow_tokens: bool) -> Prompt:
    if isinstance(record, str):
        return Prompt(index, line, f"line-{line}", messages=record)
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    prompt_id = record.get("id", f"line-{line}")
    if not isinstance(prompt_id, str) or not _ID.fullmatch(prompt_id):
        raise PromptFileError(f"{where}: id {prompt_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
                              "(it names the output files)")
    given = [key for key in ("prompt", "messages", "tokens") if key in record]
    if len(given) != 1:
        raise PromptFileError(f"{where}: give exactly one of 'prompt' (text), 'messages' (a list) or "
                              f"'tokens' (model ids), got {given or 'none'}")
    prompt = Prompt(index, line, prompt_id)
    value = record[given[0]]
    if given[0] == "prompt":
        if not isinstance(value, str):
            raise PromptFileError(f"{where}: 'prompt' must be text, got {type(value).__name__}")
        prompt.messages = value
    elif given[0] == "messages":
        if not (isinstance(value, list) and value
                and all(isinstance(m, dict) and "role" in m for m in value)):
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} "
                                  "objects")
        prompt.messages = value
    else:
        if not allow_tokens:
            raise PromptFileError(f"{where}: 'tokens' prompts are only for --no-generate (chat needs text)")
        if not isinstance(value, list) or not value or not all(isinstance(t, int) and t >= 0 for t in value):
            raise PromptFileError(f"{where}: 'tokens' must be a non-empty list of non-negative token ids")
        prompt.tokens = value
    for key, kind in _OPTION_TYPES.items():
        if key in record:
            if not isinstance(record[key], kind) or isinstance(record[key], bool):
                raise PromptFileError(f"{where}: {key!r} has the wrong type ({type(record[key]).__name__})")
            prompt.options[key] = record[key]
    return prompt


# -- statistics ----------------------------------------------------------------------------------------------


@dataclass
class PromptStats:
    """Router and sink statistics over some tokens; they add up exactly (counts and float64 sums)."""

    expert_counts: torch.Tensor  # [L, E] int64: tokens each layer sent to each expert
    sink_sum: torch.Tensor  # [L, H] float64: attention-sink mass summed over the tokens
    tokens: int

    @classmethod
    def zeros(cls, layers: int, experts: int, heads: int) -> PromptStats:
        counts = torch.zeros(layers, experts, dtype=torch.int64)
        return cls(counts, torch.zeros(layers, heads, dtype=torch.float64), 0)

    @classmethod
    def from_records(cls, router_indices: torch.Tensor, sink: torch.Tensor, num_experts: int) -> PromptStats:
        """router_indices [T, L, k] and sink [T, L, H] (a Trace's record rows) -> statistics of T tokens."""
        T, L, _ = router_indices.shape
        per_layer = router_indices.detach().to("cpu", torch.int64).permute(1, 0, 2).reshape(L, -1)  # [L, T*k]
        counts = torch.zeros(L, num_experts, dtype=torch.int64)
        counts.scatter_add_(1, per_layer, torch.ones_like(per_layer))
        return cls(counts, sink.detach().to("cpu", torch.float64).sum(dim=0), T)

    @classmethod
    def from_trace(cls, trace: Trace, num_experts: int) -> PromptStats:
        return cls.from_records(trace.router_indices, trace.sink, num_experts)

    @property
    def sink_mean(self) -> torch.Tensor:
        """[L, H] mean sink mass per token (zeros when no tokens were counted)."""
        return self.sink_sum / max(self.tokens, 1)

    def __add__(self, other: PromptStats) -> PromptStats:
        return PromptStats(self.expert_counts + other.expert_counts, self.sink_sum + other.sink_sum,
                           self.tokens + other.tokens)

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
        meta = {"tokens": str(self.tokens), "info": json.dumps(metadata or {})}
        save_file({"expert_counts": self.expert_counts.contiguous(), "sink_sum": self.sink_sum.contiguous()},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[PromptStats, dict[str, Any]]:
        """(statistics, the metadata saved with them)."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stats = cls(f.get_tensor("expert_counts"), f.get_tensor("sink_sum"), int(meta["tokens"]))
        return stats, json.loads(meta.get("info", "{}"))


def forward_stats(model: Any, input_ids: torch.Tensor) -> PromptStats:
    """Statistics of one forward pass over input_ids [1, T] (no generation): every token counts."""
    cfg = model.config
    L = cfg.num_hidden_layers
    names = [f"blocks.{layer}.mlp.hook_topk_indices" for layer in range(L)]
    names += [f"blocks.{layer}.attn.hook_sink" for layer in range(L)]
    _, cache = model.run_with_cache(input_ids, names=names)
    router = torch.stack([cache[f"blocks.{i}.mlp.hook_topk_indices"][0] for i in range(L)], dim=1)  # [T,L,k]
    sink = torch.stack([cache[f"blocks.{i}.attn.hook_sink"][0].T for i in range(L)], dim=1)  # [T, L, H]
    return PromptStats.from_records(router, sink, cfg.num_experts)


# -- per-prompt functions -----------------------------------------------------------------------------------

Runner = Callable[[Any, Prompt], "Trace | PromptStats"]


def chat_runner(
    reasoning: str = "medium", max_new_tokens: int = 1024, temperature: float = 1.0, seed: int = 0,
    capture: Sequence[str] = (),
) -> Runner:
    """A runner that chats: `model.chat(prompt)` with these defaults (each prompt may override them)."""

    def run(model: Any, prompt: Prompt) -> Trace:
        if prompt.messages is None:
            raise ValueError(f"prompt {prompt.id} has only tokens; chatting needs text or messages")
        options = {"reasoning": reasoning, "max_new_tokens": max_new_tokens, "temperature": temperature,
                   "seed": seed + prompt.index, "developer": None, **prompt.options}
        return model.chat(prompt.messages, capture=list(capture), **options)

    def batchable(prompt: Prompt) -> bool:
        """A batch shares its sampling: prompts with a temperature of their own run alone."""
        own = prompt.options.get("temperature", temperature)
        return prompt.messages is not None and float(own) == float(temperature)

    def many(model: Any, prompts: Iterator[Prompt], batch_size: int, on_trace: Callable[[Prompt, Trace], None],
             on_error: Callable[[Prompt, BaseException], None]) -> None:
        """Chat `prompts` (taken lazily, as rows free up) `batch_size` at a time (`chat.chat_stream`). One
        generator, seeded with `seed`, samples the whole batch: greedy results equal the one-at-a-time run's,
        sampled ones do not (each prompt's seed + index is not used)."""
        from .chat import chat_stream

        def jobs() -> Iterator[tuple[Prompt, Any, dict[str, Any]]]:
            for prompt in prompts:
                options = {"reasoning": reasoning, "max_new_tokens": max_new_tokens, "developer": None,
                           **{k: v for k, v in prompt.options.items() if k not in ("seed", "temperature")}}
                yield prompt, prompt.messages, options

        limit = model.config.max_context
        chat_stream(model, jobs(), batch_size, on_trace, on_error, max_len=min(limit, max_new_tokens + 8192),
                    temperature=temperature, seed=seed, capture=list(capture))

    run.batchable = batchable  # type: ignore[attr-defined]
    run.many = many  # type: ignore[attr-defined]
    return run


def forward_runner(reasoning: str = "medium") -> Runner:
    """A runner for --no-generate: one forward pass over the prompt's tokens (rendered in harmony if text)."""

    def run(model: Any, prompt: Prompt) -> PromptStats:
        if prompt.tokens is not None:
            ids = prompt.tokens
        else:
            from .harmony import render_prompt

            options = {"reasoning": reasoning, "developer": None, **prompt.options}
            rendered = render_prompt(prompt.messages, options["reasoning"], options["developer"])
            ids = model.tokenizer.to_model(rendered)
        return forward_stats(model, torch.tensor([ids], dtype=torch.long))

    return run


def load_runner(spec: str) -> Runner:
    """`module:function` -> that function (for --runner)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"--runner must look like module:function, got {spec!r}")
    function = getattr(importlib.import_module(module_name), name, None)
    if not callable(function):
        raise ValueError(f"--runner {spec}: {module_name} has no function {name!r}")
    return function


# -- the run -------------------------------------------------------------------------------------------------


_HOST = socket.gethostname()
_HOST_TAG = re.sub(r"[^A-Za-z0-9-]", "-", _HOST)  # the host in temporary file names (no dots to split on)


def _temp_name(path: Path) -> Path:
    """`.NAME.HOST.PID.tmp` beside path: the host and process say whose temporary file it is."""
    return path.with_name(f".{path.name}.{_HOST_TAG}.{os.getpid()}.tmp")


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """write(a temporary path), then rename it to `path`: a crash leaves no file or a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def stats_path(out: Path, prompt: Prompt) -> Path:
    return out / "stats" / f"{prompt.id}.safetensors"


def trace_path(out: Path, prompt: Prompt) -> Path:
    return out / "traces" / f"{prompt.id}.safetensors"


def error_path(out: Path, prompt: Prompt) -> Path:
    return out / "errors" / f"{prompt.id}.json"


def safetensors_complete(path: Path) -> bool:
    """Whether `path` is a whole safetensors file: its header parses and the file is as long as the header
    says (a zero-byte or truncated file, from a full disk or a copy cut short, is not)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return False
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        return size == 8 + length + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False


def finished(out: Path, prompt: Prompt, mode: str) -> bool:
    """Whether the prompt is done: a whole done-marker, and in mode "traces" a whole trace beside it."""
    if not safetensors_complete(stats_path(out, prompt)):
        return False
    return mode != "traces" or safetensors_complete(trace_path(out, prompt))


def prompts_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a prompts file's bytes (kept in run.json: one folder, one prompts file)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_settings(out: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record the run's settings in OUT/run.json, or check they match the ones a resumed run recorded.

    A setting an older run.json lacks is added to it rather than refused.
    """
    path = Path(out) / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = {key: (old[key], value) for key, value in settings.items() if key in old and old[key] != value}
        if "prompts_sha256" in changed:
            raise ValueError(f"{out} holds a run of another prompts file (SHA-256 {changed['prompts_sha256'][0]}, "
                             f"this one's is {changed['prompts_sha256'][1]}); use another --out")
        if changed:
            detail = ", ".join(f"{key}: {was!r} -> {now!r}" for key, (was, now) in changed.items())
            raise ValueError(f"{out} holds a run with other settings ({detail}); resume with the same "
                             "settings or use another --out")
        if any(key not in old for key in settings):
            _write_json(path, {**old, **settings})
    else:
        _write_json(path, settings)


def _process_alive(host: str, pid: int) -> bool:
    """Whether a process may still be running: on another host we cannot tell, so yes."""
    if host not in (_HOST, _HOST_TAG):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Claims:
    """OUT/claims/ID.claim files, so that collects sharing a folder (processes, hosts, threads) never compute
    the same prompt at once. A claim names its holder (host, pid, token); one whose process has died on this
    host is taken over. Decisions are made under an exclusive lock on OUT/claims/.lock (flock)."""

    def __init__(self, out: Path):
        self.folder = out / "claims"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.owner = {"host": _HOST, "pid": os.getpid(), "token": uuid.uuid4().hex}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _holder(self, path: Path) -> dict[str, Any] | None:
        try:
            holder = json.loads(path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def take(self, prompt: Prompt) -> str | None:
        """Claim the prompt for this collect; returns None, or "HOST:PID" of the live collect holding it."""
        path = self.folder / f"{prompt.id}.claim"
        with self._locked():
            holder = self._holder(path)
            if holder is not None and holder.get("token") != self.owner["token"]:
                host, pid = str(holder.get("host")), int(holder.get("pid", -1))
                if _process_alive(host, pid):
                    return f"{host}:{pid}"
            _write_json(path, self.owner)
        return None

    def release(self, prompt: Prompt) -> None:
        path = self.folder / f"{prompt.id}.claim"
        with self._locked():
            holder = self._holder(path)
            if holder is not None and holder.get("token") == self.owner["token"]:
                path.unlink()


@dataclass
class CollectResult:
    done: list[str] = field(default_factory=list)  # prompt ids finished by this call
    skipped: list[str] = field(default_factory=list)  # already finished by an earlier run
    failed: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # being run, or failed during this call, by another collect


def collect(
    model: Any, prompts: Sequence[Prompt], out: str | os.PathLike, runner: Runner, mode: str = "traces",
    rank: int = 0, world_size: int = 1, fail_fast: bool = False, log: Callable[[str], None] | None = None,
    batch_size: int = 1,
) -> CollectResult:
    """Run `runner(model, prompt)` on this rank's prompts (index % world_size == rank), skipping finished ones

    mode "traces": the runner returns a Trace, saved to OUT/traces/ID.safetensors; "stats": a Trace or
    PromptStats, of which only the statistics are kept. Either way OUT/stats/ID.safetensors marks it done; an
    empty or truncated marker or trace does not, and the prompt is computed again. A prompt that raises
    (anything but KeyboardInterrupt/SystemExit) is recorded in OUT/errors/ID.json and the run goes on
    (unless fail_fast). Collects sharing OUT claim each prompt first (`Claims`), so none is computed twice
    at once; a prompt another collect holds, or failed while this one ran, lands in `result.elsewhere`.
    With `batch_size` > 1 and a runner that can batch (`chat_runner`'s), up to that many prompts run at once
    through one batched decoder (continuous batching: a finished prompt's row takes the next), each written,
    claimed and released on its own as above; the files are the same as one at a time.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    out = Path(out)
    result = CollectResult()
    claims = Claims(out)
    started = time.time()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    mine = [p for p in prompts if p.index % world_size == rank]
    many = getattr(runner, "many", None) if batch_size > 1 else None
    batchable = getattr(runner, "batchable", lambda prompt: True)
    alone = [p for p in mine if many is None or not batchable(p)]
    if many is not None:
        _collect_batched(model, [p for p in mine if batchable(p)], len(mine), out, runner, mode, fail_fast,
                         result, log, claims, started, batch_size)
    for prompt in alone:
        if _claim(out, prompt, mode, claims, started, result, log):
            try:
                _run_one(model, prompt, out, runner, mode, fail_fast, result, log,
                         f"{mine.index(prompt) + 1}/{len(mine)}")
            finally:
                claims.release(prompt)
    return result


def _claim(out: Path, prompt: Prompt, mode: str, claims: Claims, started: float, result: CollectResult,
           log: Callable[[str], None] | None) -> bool:
    """Whether this collect should run `prompt` now; if so it holds the prompt's claim (release it after)."""
    if finished(out, prompt, mode):
        result.skipped.append(prompt.id)
        return False
    if stats_path(out, prompt).exists() and log:
        log(f"prompt {prompt.id}: its done-marker or trace is damaged (empty or cut short); recomputing")
    holder = claims.take(prompt)
    if holder is not None:
        result.elsewhere.append(prompt.id)
        if log:
            log(f"prompt {prompt.id} is being run by another collect ({holder}); left to it")
        return False
    if finished(out, prompt, mode):  # finished by another collect before we claimed it
        result.skipped.append(prompt.id)
    elif _failed_since(out, prompt, started):  # another collect on this folder tried it just now
        result.elsewhere.append(prompt.id)
    else:
        return True
    claims.release(prompt)
    return False


def _collect_batched(model: Any, prompts: list[Prompt], total: int, out: Path, runner: Runner, mode: str,
                     fail_fast: bool, result: CollectResult, log: Callable[[str], None] | None, claims: Claims,
                     started: float, batch_size: int) -> None:
    """`collect` through `runner.many`: prompts are claimed as rows free up, written as each finishes."""
    begun: dict[str, float] = {}
    done = [0]
    taken: set[str] = set()

    def claimed() -> Iterator[Prompt]:
        for prompt in prompts:
            taken.add(prompt.id)
            if _claim(out, prompt, mode, claims, started, result, log):
                begun[prompt.id] = time.perf_counter()
                yield prompt

    def finish(prompt: Prompt, output: Any = None, error: BaseException | None = None) -> None:
        try:
            done[0] += 1
            _save_one(model, prompt, out, mode, fail_fast, result, log, f"{done[0]}/{total}",
                      begun.pop(prompt.id, time.perf_counter()),
                      lambda: _raise(error) if error is not None else output)
        finally:
            claims.release(prompt)

    try:
        runner.many(model, claimed(), batch_size, lambda p, trace: finish(p, trace), lambda p, e: finish(p, error=e))
    except Exception as exc:  # the batch itself failed (its prompts have their errors/ID.json): go on alone
        if fail_fast:
            raise
        if log:
            log(f"the batch failed ({exc!r}); the prompts not yet started run one at a time")
        for prompt in prompts:
            if prompt.id not in taken and _claim(out, prompt, mode, claims, started, result, log):
                try:
                    done[0] += 1
                    _run_one(model, prompt, out, runner, mode, fail_fast, result, log, f"{done[0]}/{total}")
                finally:
                    claims.release(prompt)
    finally:
        for prompt_id in list(begun):  # interrupted: the claims of prompts still running go back
            claims.release(next(p for p in prompts if p.id == prompt_id))


def _raise(error: BaseException) -> Any:
    raise error


def _failed_since(out: Path, prompt: Prompt, since: float) -> bool:
    try:
        return float(json.loads(error_path(out, prompt).read_text()).get("time", 0)) >= since
    except (OSError, ValueError, AttributeError):
        return False


def _run_one(model: Any, prompt: Prompt, out: Path, runner: Runner, mode: str, fail_fast: bool,
             result: CollectResult, log: Callable[[str], None] | None, where: str) -> None:
    """Run one claimed prompt and write its files (the done-marker last), or its errors/ID.json."""
    _save_one(model, prompt, out, mode, fail_fast, result, log, where, time.perf_counter(),
              lambda: runner(model, prompt))


def _save_one(model: Any, prompt: Prompt, out: Path, mode: str, fail_fast: bool, result: CollectResult,
              log: Callable[[str], None] | None, where: str, started: float, compute: Callable[[], Any]) -> None:
    """`compute()` the prompt's output (or re-raise its error) and write its files, or its errors/ID.json."""
    try:
        output = compute()
        if mode == "traces" and not isinstance(output, Trace):
            raise TypeError(f"mode 'traces' needs the runner to return a Trace, got "
                            f"{type(output).__name__}")
        if isinstance(output, Trace):
            stats = PromptStats.from_trace(output, model.config.num_experts)
            if mode == "traces":
                _atomic(trace_path(out, prompt), output.save)
        elif isinstance(output, PromptStats):
            stats = output
        else:
            raise TypeError(f"the runner must return a Trace or PromptStats, got {type(output).__name__}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a pyo3 panic is a BaseException and must not end the run
        if fail_fast:
            raise
        _write_json(error_path(out, prompt), {"id": prompt.id, "line": prompt.line, "error": repr(exc),
                                              "traceback": traceback.format_exc(), "time": time.time()})
        result.failed.append(prompt.id)
        if log:
            log(f"prompt {prompt.id} (line {prompt.line}) failed: {exc!r}")
        return
    info = {"id": prompt.id, "line": prompt.line, "trace": mode == "traces"}
    # the done-marker, written last
    _atomic(stats_path(out, prompt), lambda tmp, stats=stats, info=info: stats.save(tmp, info))
    if error_path(out, prompt).exists():
        error_path(out, prompt).unlink()  # an earlier attempt failed; this one did not
    result.done.append(prompt.id)
    if log:
        log(f"{where} {prompt.id}: {stats.tokens} tokens in {time.perf_counter() - started:.2f}s")


def _temp_file_is_stale(path: Path) -> bool:
    """Whether a `.NAME.HOST.PID.tmp` file is ours or a dead process's of this host (never a live writer's)."""
    host_pid = path.name.removesuffix(".tmp").rsplit(".", 2)
    if len(host_pid) != 3 or not host_pid[2].isdigit():
        return False  # not a name _atomic makes: not ours to delete
    host, pid = host_pid[1], int(host_pid[2])
    return (host == _HOST_TAG and pid == os.getpid()) or not _process_alive(host, pid)


def merge(out: str | os.PathLike, prompts: Sequence[Prompt], settings: dict[str, Any] | None = None) -> dict:
    """Add up every finished prompt's statistics, in prompt order, into OUT/summary.json (also returned).

    Prompts not finished are listed under "failed" (with the error) or "missing" (an empty or truncated
    done-marker counts as missing). Temporary files this process left are removed, and those of processes
    of this host that are gone; another live collect's are not touched.
    """
    out = Path(out)
    total: PromptStats | None = None
    index, failed, missing = [], [], []
    for prompt in prompts:
        path = stats_path(out, prompt)
        if not safetensors_complete(path):
            error = error_path(out, prompt)
            if error.is_file():
                reason = json.loads(error.read_text())["error"]
                failed.append({"id": prompt.id, "line": prompt.line, "error": reason})
            else:
                missing.append(prompt.id)
            continue
        stats, _ = PromptStats.load(path)
        total = stats if total is None else total + stats
        has_trace = safetensors_complete(trace_path(out, prompt))
        index.append({"id": prompt.id, "line": prompt.line, "tokens": stats.tokens,
                      "trace": str(trace_path(out, prompt).relative_to(out)) if has_trace else None})
    for leftover in out.glob("*/.*.tmp"):
        if _temp_file_is_stale(leftover):
            leftover.unlink(missing_ok=True)
    summary = {
        "settings": settings or {},
        "prompts": len(prompts),
        "done": len(index),
        "failed": failed,
        "missing": missing,
        "tokens": total.tokens if total else 0,
        "expert_counts": total.expert_counts.tolist() if total else [],  # [L][E]
        "sink_mean": total.sink_mean.tolist() if total else [],  # [L][H]
        "per_prompt": index,
    }
    _write_json(out / SUMMARY_FILE, summary)
    return summary


# -- command line --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ossscope.collect",
        description="Trace many prompts (data-parallel under torchrun), resumably, into OUT/summary.json.",
    )
    parser.add_argument("--model", required=True,
                        help="checkpoint folder, 'nano', 'gpt-oss-20b' or 'gpt-oss-120b'")
    parser.add_argument("--prompts", required=True, help="JSONL file, one prompt per line")
    parser.add_argument("--out", required=True, help="output folder (reused to resume)")
    parser.add_argument("--mode", choices=MODES, default="traces",
                        help="traces: save every Trace too; stats: keep only router/sink statistics")
    parser.add_argument("--no-generate", action="store_true",
                        help="stats over the prompt tokens in one forward pass, no chat (needs --mode stats)")
    parser.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    parser.add_argument("--capture", action="append", default=[], help="extra hook name to keep per token")
    parser.add_argument("--runner", help="module:function(model, prompt) -> Trace | PromptStats (not chat)")
    parser.add_argument("--device", help="default: this rank's GPU, else cpu")
    parser.add_argument("--dtype", help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--engine", choices=("auto", "kernels", "torch"), default="auto",
                        help="default auto: the Triton kernels with CUDA graphs on a GPU, else torch")
    parser.add_argument("--batch-size", type=int,
                        help="prompts chatting at once through one batched decoder (default: from GPU memory, "
                             "up to 64; 1 on a CPU); greedy results equal one-at-a-time; sampling shares one "
                             "generator seeded with --seed")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing prompt")
    parser.add_argument("--merge-only", action="store_true", help="only write summary.json from what is done")
    return parser


def default_batch_size(model: Any, max_len: int, most: int = 64) -> int:
    """Rows for collect's batched chats: on a GPU, as many as half the free memory holds caches for (at most
    `most`); on a CPU, 1."""
    if model.device.type != "cuda":
        return 1
    cfg = model.config
    max_len = min(max_len, cfg.max_context)
    slots = sum(min(cfg.sliding_window, max_len) if cfg.is_sliding(layer) else max_len
                for layer in range(cfg.num_hidden_layers))
    row_bytes = slots * cfg.num_key_value_heads * cfg.head_dim * 2 * model.dtype.itemsize  # keys and values
    free, _ = torch.cuda.mem_get_info(model.device)
    return max(1, min(most, int(free * 0.5) // row_bytes))


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What run.json records (and a resumed run must repeat), the prompts file's SHA-256 included."""
    return {"model": str(args.model), "mode": args.mode, "no_generate": args.no_generate,
            "reasoning": args.reasoning, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "seed": args.seed, "capture": sorted(args.capture),
            "runner": args.runner, "prompts_sha256": prompts_sha256(args.prompts)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_generate and args.mode != "stats":
        raise SystemExit("--no-generate keeps no Trace: use it with --mode stats")
    prompts = read_prompts(args.prompts, allow_tokens=args.no_generate or bool(args.runner))
    settings = run_settings(args)
    out = Path(args.out)
    if args.merge_only:
        summary = merge(out, prompts, settings)
        return _report(summary, out)

    from . import distributed

    # A CPU (gloo) group is all we need: ranks share nothing but the final barrier, which may wait for hours.
    rank, world = distributed.init_distributed(backend="gloo", timeout_s=7 * 24 * 3600.0)

    def log(message: str) -> None:
        print(f"[rank {rank}/{world}] {message}", file=sys.stderr, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    if args.runner:
        runner = load_runner(args.runner)
    elif args.no_generate:
        runner = forward_runner(args.reasoning)
    else:
        runner = chat_runner(args.reasoning, args.max_new_tokens, args.temperature, args.seed, args.capture)

    import ossscope

    device = args.device or distributed.default_device()
    model = ossscope.load(args.model, device=device, dtype=args.dtype, progress=rank == 0, engine=args.engine)
    mine = len([p for p in prompts if p.index % world == rank])
    log(f"{model.name} on {model.device} ({model.engine.describe()}): {mine} of {len(prompts)} prompts are this rank's")
    batch_size = args.batch_size or default_batch_size(model, args.max_new_tokens + 8192)
    if args.no_generate or args.runner:
        batch_size = 1  # only chats batch
    elif batch_size > 1:
        log(f"batches of up to {batch_size} prompts")
    result = collect(model, prompts, out, runner, args.mode, rank, world, args.fail_fast, log, batch_size)
    log(f"finished: {len(result.done)} done, {len(result.skipped)} already done, {len(result.failed)} failed, "
        f"{len(result.elsewhere)} left to another collect")
    if world > 1:
        torch.distributed.barrier()
    status = 0
    if rank == 0:
        status = _report(merge(out, prompts, settings), out)
    if world > 1:
        torch.distributed.destroy_process_group()
    return status


def _report(summary: dict, out: Path) -> int:
    print(f"{summary['done']}/{summary['prompts']} prompts done, {summary['tokens']} tokens counted; "
          f"{len(summary['failed'])} failed, {len(summary['missing'])} missing -> {out / SUMMARY_FILE}")
    for failure in summary["failed"][:10]:
        print(f"  failed: {failure['id']} (line {failure['line']}): {failure['error']}")
    return 0 if summary["done"] == summary["prompts"] else 1


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: a --runner returns
    # ossscope.collect.PromptStats, which is not an instance of __main__.PromptStats.
    from ossscope.collect import main as _main

    sys.exit(_main())
