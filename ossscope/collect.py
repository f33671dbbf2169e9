"""`python -m ossscope.collect`: trace many prompts, data-parallel over GPUs, resumable, merged at the end.

    torchrun --nproc-per-node 8 -m ossscope.collect --model gpt-oss-20b --prompts prompts.jsonl --out runs/a
    python -m ossscope.collect --model nano --prompts prompts.jsonl --out runs/b --mode stats --no-generate

Each rank loads the whole model on its own GPU and takes every W-th prompt (prompt i goes to rank i % W). For
each prompt it writes, atomically (a temporary file renamed into place):
    traces/ID.safetensors   the Trace of `model.chat(...)` (mode "traces" only)
    stats/ID.safetensors    the prompt's router/sink statistics: this file is the prompt's done-marker
    errors/ID.json          the traceback, when the prompt failed (the others go on; a rerun retries it)
Run the same command again after a crash and finished prompts are skipped. When every rank is done, rank 0
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
import importlib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
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


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """write(a temporary path), then rename it to `path`: a crash leaves no file or a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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


def check_settings(out: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record the run's settings in OUT/run.json, or check they match the ones a resumed run recorded."""
    path = Path(out) / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = {key: (old.get(key), value) for key, value in settings.items() if old.get(key) != value}
        if changed:
            detail = ", ".join(f"{key}: {was!r} -> {now!r}" for key, (was, now) in changed.items())
            raise ValueError(f"{out} holds a run with other settings ({detail}); resume with the same "
                             "settings or use another --out")
    else:
        _write_json(path, settings)


@dataclass
class CollectResult:
    done: list[str] = field(default_factory=list)  # prompt ids finished by this call
    skipped: list[str] = field(default_factory=list)  # already finished by an earlier run
    failed: list[str] = field(default_factory=list)


def collect(
    model: Any, prompts: Sequence[Prompt], out: str | os.PathLike, runner: Runner, mode: str = "traces",
    rank: int = 0, world_size: int = 1, fail_fast: bool = False, log: Callable[[str], None] | None = None,
) -> CollectResult:
    """Run `runner(model, prompt)` on this rank's prompts (index % world_size == rank), skipping finished ones

    mode "traces": the runner returns a Trace, saved to OUT/traces/ID.safetensors; "stats": a Trace or
    PromptStats, of which only the statistics are kept. Either way OUT/stats/ID.safetensors marks it done.
    A prompt that raises is recorded in OUT/errors/ID.json and the run goes on (unless fail_fast).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    out = Path(out)
    cfg = model.config
    result = CollectResult()
    mine = [p for p in prompts if p.index % world_size == rank]
    for position, prompt in enumerate(mine, start=1):
        if stats_path(out, prompt).is_file():
            result.skipped.append(prompt.id)
            continue
        started = time.perf_counter()
        try:
            output = runner(model, prompt)
            if mode == "traces" and not isinstance(output, Trace):
                raise TypeError(f"mode 'traces' needs the runner to return a Trace, got "
                                f"{type(output).__name__}")
            if isinstance(output, Trace):
                stats = PromptStats.from_trace(output, cfg.num_experts)
                if mode == "traces":
                    _atomic(trace_path(out, prompt), output.save)
            elif isinstance(output, PromptStats):
                stats = output
            else:
                raise TypeError(f"the runner must return a Trace or PromptStats, got {type(output).__name__}")
        except Exception as exc:
            if fail_fast:
                raise
            _write_json(error_path(out, prompt), {"id": prompt.id, "line": prompt.line, "error": repr(exc),
                                                  "traceback": traceback.format_exc()})
            result.failed.append(prompt.id)
            if log:
                log(f"prompt {prompt.id} (line {prompt.line}) failed: {exc!r}")
            continue
        info = {"id": prompt.id, "line": prompt.line, "trace": mode == "traces"}
        # the done-marker, written last
        _atomic(stats_path(out, prompt), lambda tmp, stats=stats, info=info: stats.save(tmp, info))
        if error_path(out, prompt).exists():
            error_path(out, prompt).unlink()  # an earlier attempt failed; this one did not
        result.done.append(prompt.id)
        if log:
            elapsed = time.perf_counter() - started
            log(f"{position}/{len(mine)} {prompt.id}: {stats.tokens} tokens in {elapsed:.2f}s")
    return result


def merge(out: str | os.PathLike, prompts: Sequence[Prompt], settings: dict[str, Any] | None = None) -> dict:
    """Add up every finished prompt's statistics, in prompt order, into OUT/summary.json (also returned).

    Prompts not finished are listed under "failed" (with the error) or "missing"; leftover temporary files of
    crashed runs are removed.
    """
    out = Path(out)
    total: PromptStats | None = None
    index, failed, missing = [], [], []
    for prompt in prompts:
        path = stats_path(out, prompt)
        if not path.is_file():
            error = error_path(out, prompt)
            if error.is_file():
                reason = json.loads(error.read_text())["error"]
                failed.append({"id": prompt.id, "line": prompt.line, "error": reason})
            else:
                missing.append(prompt.id)
            continue
        stats, _ = PromptStats.load(path)
        total = stats if total is None else total + stats
        has_trace = trace_path(out, prompt).is_file()
        index.append({"id": prompt.id, "line": prompt.line, "tokens": stats.tokens,
                      "trace": str(trace_path(out, prompt).relative_to(out)) if has_trace else None})
    for leftover in out.glob("*/.*.tmp"):
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
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing prompt")
    parser.add_argument("--merge-only", action="store_true", help="only write summary.json from what is done")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_generate and args.mode != "stats":
        raise SystemExit("--no-generate keeps no Trace: use it with --mode stats")
    prompts = read_prompts(args.prompts, allow_tokens=args.no_generate or bool(args.runner))
    settings = {"model": str(args.model), "mode": args.mode, "no_generate": args.no_generate,
                "reasoning": args.reasoning, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "seed": args.seed, "capture": sorted(args.capture),
                "runner": args.runner}
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
    result = collect(model, prompts, out, runner, args.mode, rank, world, args.fail_fast, log)
    log(f"finished: {len(result.done)} done, {len(result.skipped)} already done, {len(result.failed)} failed")
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
