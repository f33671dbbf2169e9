"""Evaluate the nano model on held-out problems: `python -m ossscope.nano.eval`.

Measures, per reasoning effort, with greedy decoding:
- exact accuracy on 4-digit addition and subtraction (both operands 4 digits, problems never trained on);
- mean analysis length (tokens in the analysis channel);
- tool-call validity on held-out tool episodes: the reply parses, calls the right function on the commentary
  channel, with JSON arguments equal to the expected ones; and whether the final answer after the tool's result
  is right;
- sorting accuracy.

The core (`greedy_generate`, `parse_completion`, `score`) needs neither openai-harmony nor the chat engine: it
runs on pre-tokenized prompts with any `logits_fn(ids [B, T]) -> logits [B, T, V]`, so the training run on the
GPU machine uses it too. The command line renders prompts with harmony and decodes with the loaded model.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

SPECIAL_TEXT = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
}  # fmt: skip
STOP_O200K = (200002, 200012)


# -- generation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], prompts: Sequence[Sequence[int]], stop_ids: Sequence[int],
    max_new_tokens: int, pad_id: int = 0, device: torch.device | str = "cpu", batch_size: int = 256,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (model ids), each up to and including its first stop id.

    Rows are right-padded and the whole prefix is recomputed each step (no cache), so any forward function
    works; padding sits after each row's last real token, so causal attention never sees it.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    stops = torch.tensor(list(stop_ids), device=device)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lengths = torch.tensor([len(prompts[i]) for i in rows], device=device)  # [B]
        total = int(lengths.max()) + max_new_tokens
        ids = torch.full((len(rows), total), pad_id, dtype=torch.long, device=device)  # [B, T]
        for r, i in enumerate(rows):
            ids[r, : len(prompts[i])] = torch.tensor(list(prompts[i]), device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        cur = lengths.clone()  # next position to fill, per row
        for _ in range(max_new_tokens):
            width = int(cur.max())
            logits = logits_fn(ids[:, :width])  # [B, width, V]
            nxt = logits[torch.arange(len(rows), device=device), cur - 1].argmax(-1)  # [B]
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            ids[torch.arange(len(rows), device=device), cur] = nxt
            cur = torch.where(done, cur, cur + 1)
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
        for r, i in enumerate(rows):
            out = ids[r, lengths[r] : cur[r]].tolist()
            outputs[i] = out
    return outputs


# -- parsing ------------------------------------------------------------------------------------------------


def completion_text(o200k_ids: Sequence[int], token_bytes: Callable[[int], bytes]) -> str:
    """Text of a completion with harmony's special tokens spelled out (`<|channel|>`...)."""
    parts: list[bytes] = []
    for i in o200k_ids:
        parts.append(SPECIAL_TEXT[i].encode() if i in SPECIAL_TEXT else token_bytes(i))
    return b"".join(parts).decode("utf-8", errors="replace")


_HEADER_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_HEADER_RECIPIENT = re.compile(r"to=([\w.]+)")


def parse_completion(text: str) -> list[dict[str, Any]]:
    """Tolerant parse of what the model said after `<|start|>assistant`: a list of messages.

    Each message: {"channel", "recipient", "constrain", "content", "stop"}. Accepts the recipient before or
    after the channel (harmony renders `to=` first; real gpt-oss emits it after the channel).
    """
    messages = []
    for chunk in text.split("<|start|>"):
        if not chunk.strip():
            continue
        header, sep, body = chunk.partition("<|message|>")
        if not sep:
            messages.append({"channel": None, "recipient": None, "constrain": None, "content": chunk,
                             "stop": None, "error": "no <|message|>"})
            continue
        stop = None
        for marker in ("<|end|>", "<|return|>", "<|call|>"):
            if marker in body:
                candidate = body.index(marker)
                if stop is None or candidate < stop[0]:
                    stop = (candidate, marker)
        content = body[: stop[0]] if stop else body
        channel = _HEADER_CHANNEL.search(header)
        recipient = _HEADER_RECIPIENT.search(header)
        constrain = re.search(r"<\|constrain\|>\s*(\w+)", header)
        messages.append({
            "channel": channel.group(1) if channel else None,
            "recipient": recipient.group(1) if recipient else None,
            "constrain": constrain.group(1) if constrain else None,
            "content": content,
            "stop": stop[1] if stop else None,
        })
    return messages


def _channel_text(messages: list[dict[str, Any]], channel: str) -> str | None:
    texts = [m["content"] for m in messages if m["channel"] == channel]
    return "\n".join(texts) if texts else None


def _parse_int(text: str | None) -> int | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(-?\d+)\.?\s*", text)
    return int(match.group(1)) if match else None


def _same_arguments(got: Any, want: dict[str, Any]) -> bool:
    if not isinstance(got, dict) or set(got) != set(want):
        return False
    for key, value in want.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not isinstance(got[key], (int, float)) or not math.isclose(got[key], value, rel_tol=1e-9):
                return False
        elif got[key] != value:
            return False
    return True


def score_item(item: dict[str, Any], messages: list[dict[str, Any]], final_messages: list[dict[str, Any]] | None
               ) -> dict[str, Any]:
    """Score one episode. `messages`: the first model call's reply; `final_messages`: the reply after the
    tool's answer (tool episodes only). Returns the item's metrics."""
    kind = item["kind"]
    analysis = _channel_text(messages, "analysis")
    result: dict[str, Any] = {"kind": kind, "effort": item["effort"], "analysis_chars": len(analysis or "")}
    if kind in ("add", "sub"):
        result["correct"] = _parse_int(_channel_text(messages, "final")) == item["answer"]
    elif kind == "sort":
        final = _channel_text(messages, "final") or ""
        try:
            got = [int(x) for x in final.replace(" ", "").rstrip(".").split(",")]
        except ValueError:
            got = None
        result["correct"] = got == item["answer"]
    elif kind == "tool":
        want = item["answer"]
        calls = [m for m in messages if m["recipient"] and m["recipient"].startswith("functions.")]
        valid = right_function = right_arguments = parses = False
        if len(calls) == 1 and calls[0]["stop"] == "<|call|>":
            call = calls[0]
            right_function = call["recipient"] == f"functions.{want['name']}"
            try:
                arguments = json.loads(call["content"])
                parses = True
            except json.JSONDecodeError:
                arguments = None
            right_arguments = _same_arguments(arguments, want["arguments"])
            valid = parses and right_function and right_arguments and call["channel"] == "commentary"
        result.update(valid_call=valid, parses=parses, right_function=right_function, right_arguments=right_arguments)
        if final_messages is not None:
            result["correct"] = (_channel_text(final_messages, "final") or "").strip() == want["final"]
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per (kind, effort): accuracy, valid-call rate, mean analysis length (tokens when present)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["kind"], r["effort"])].append(r)
    summary: dict[str, Any] = {}
    for (kind, effort), rows in sorted(groups.items()):
        entry: dict[str, Any] = {"n": len(rows)}
        for key in ("correct", "valid_call", "parses", "right_function", "right_arguments"):
            values = [r[key] for r in rows if key in r]
            if values:
                entry[key] = sum(values) / len(values)
        for key in ("analysis_tokens", "analysis_chars"):
            values = [r[key] for r in rows if key in r]
            if values:
                entry[f"mean_{key}"] = sum(values) / len(values)
        summary[f"{kind}/{effort}"] = entry
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A plain table of `summarize`'s output."""
    lines = [f"{'case':<14}{'n':>5}{'correct':>9}{'valid call':>12}{'analysis tok':>14}"]
    for case, e in summary.items():
        correct = f"{e['correct']:.3f}" if "correct" in e else "-"
        valid = f"{e['valid_call']:.3f}" if "valid_call" in e else "-"
        length = f"{e.get('mean_analysis_tokens', float('nan')):.1f}"
        lines.append(f"{case:<14}{e['n']:>5}{correct:>9}{valid:>12}{length:>14}")
    return "\n".join(lines)


def evaluate_tokens(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], items: list[dict[str, Any]],
    to_o200k: Callable[[list[int]], list[int]], token_bytes: Callable[[int], bytes], stop_ids: Sequence[int],
    device: torch.device | str = "cpu", max_new_tokens: int = 240, batch_size: int = 256,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy evaluation on pre-tokenized items (no harmony needed).

    Each item: {"kind", "effort", "answer", "prompt": [model ids], "prompt2": [model ids] (tool episodes: the
    prompt after the expected call and the tool's answer)}. Returns (summary, per-item results with texts).
    """
    firsts = greedy_generate(logits_fn, [it["prompt"] for it in items], stop_ids, max_new_tokens, device=device,
                             batch_size=batch_size)
    tool_rows = [i for i, it in enumerate(items) if "prompt2" in it]
    seconds = greedy_generate(logits_fn, [items[i]["prompt2"] for i in tool_rows], stop_ids, 64, device=device,
                              batch_size=batch_size)
    second_of = dict(zip(tool_rows, seconds, strict=True))
    results = []
    for i, item in enumerate(items):
        o200k = to_o200k(firsts[i])
        text = completion_text(o200k, token_bytes)
        messages = parse_completion(text)
        final_messages = None
        if i in second_of:
            final_messages = parse_completion(completion_text(to_o200k(second_of[i]), token_bytes))
        r = score_item(item, messages, final_messages)
        r["analysis_tokens"] = analysis_tokens(o200k)
        r["text"] = text
        results.append(r)
    return summarize(results), results


def analysis_tokens(o200k_ids: Sequence[int]) -> int:
    """Number of tokens inside analysis messages of a completion (between `analysis<|message|>` and the end)."""
    count, inside, after_channel, is_analysis = 0, False, False, False
    analysis_id = 35644  # o200k "analysis"
    for t in o200k_ids:
        if inside:
            if t in (200007, 200002, 200012):
                inside = False
            elif is_analysis:
                count += 1
            continue
        if t == 200005:
            after_channel = True
            is_analysis = False
        elif after_channel and t == analysis_id:
            is_analysis = True
            after_channel = False
        elif t == 200008:
            inside = True
    return count


# -- the loaded model ---------------------------------------------------------------------------------------------


@torch.no_grad()
def cached_greedy(model: Any, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], max_new_tokens: int,
                  batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations with the model's KV cache; prompts of equal length decode together (a cache holds
    one position per batch), so held-out problems with one question template batch well."""
    outputs: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    stops = torch.tensor(list(stop_ids), device=model.device)
    for length, rows_all in sorted(by_length.items()):
        for start in range(0, len(rows_all), batch_size):
            rows = rows_all[start : start + batch_size]
            cache = model.new_cache(batch_size=len(rows), max_len=length + max_new_tokens)
            ids = torch.tensor([list(prompts[i]) for i in rows], device=model.device)  # [B, T]
            logits = model(ids, cache=cache)[:, -1]  # [B, V]
            done = torch.zeros(len(rows), dtype=torch.bool, device=model.device)
            generated = []
            for _ in range(max_new_tokens):
                nxt = logits.argmax(-1)  # [B]
                generated.append(torch.where(done, -1, nxt))
                done |= torch.isin(nxt, stops)
                if bool(done.all()):
                    break
                logits = model(nxt[:, None], cache=cache)[:, -1]
            table = torch.stack(generated, 1).tolist()  # [B, steps], -1 after a row's stop
            for r, i in enumerate(rows):
                outputs[i] = [t for t in table[r] if t >= 0]
    return outputs


def evaluate_model(model: Any, n_arithmetic: int = 50, n_tools: int = 20, n_sort: int = 10,
                   max_new_tokens: int = 260) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy evaluation of a loaded model (`ossscope.load("nano")`) on the held-out sets, with its KV cache."""
    from ..tokenizer import Tokenizer, harmony_encoding
    from . import data

    enc = harmony_encoding()
    tok = Tokenizer.for_model(model)
    episodes = data.eval_arithmetic(n_arithmetic) + data.eval_tools(n_tools) + data.eval_sort(n_sort)
    firsts = cached_greedy(model, [tok.to_model(data.render_prompt(enc, e, 0)) for e in episodes],
                           tok.stop_ids, max_new_tokens)
    tool_rows = [i for i, e in enumerate(episodes) if e.kind == "tool"]
    seconds = cached_greedy(model, [tok.to_model(data.render_prompt(enc, episodes[i], 1)) for i in tool_rows],
                            tok.stop_ids, 64)
    second_of = dict(zip(tool_rows, seconds, strict=True))

    def text_of(ids: list[int]) -> str:
        return enc.decode(tok.to_o200k(ids))

    results = []
    for i, episode in enumerate(episodes):
        item = {"kind": episode.kind, "effort": episode.effort, "answer": episode.answer}
        final = parse_completion(text_of(second_of[i])) if i in second_of else None
        r = score_item(item, parse_completion(text_of(firsts[i])), final)
        r["analysis_tokens"] = analysis_tokens(tok.to_o200k(firsts[i]))
        r["text"] = text_of(firsts[i])
        results.append(r)
    return summarize(results), results


def evaluate_chat(model: Any, n_arithmetic: int = 10, n_tools: int = 10, max_new_tokens: int = 400
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The same checks through `model.chat(..., temperature=0)`: the harmony tool loop runs the real tools."""
    from . import data

    episodes = data.eval_arithmetic(n_arithmetic) + data.eval_tools(n_tools)
    results = []
    for episode in episodes:
        tools = [data.TOOL_FUNCTIONS[t] for t in episode.tools] or None
        trace = model.chat(episode.user, reasoning=episode.effort, tools=tools, temperature=0.0,
                           max_new_tokens=max_new_tokens, max_tool_calls=2)
        r: dict[str, Any] = {"kind": episode.kind, "effort": episode.effort,
                             "analysis_tokens": sum(c == "analysis" for c in trace.channels),
                             "analysis_chars": len(trace.analysis), "text": trace.final}
        if episode.kind in ("add", "sub"):
            r["correct"] = _parse_int(trace.final) == episode.answer
        else:
            want = episode.answer
            call = trace.tool_calls[0] if len(trace.tool_calls) == 1 else None
            r["valid_call"] = bool(call and call.name == want["name"] and call.error is None
                                   and _same_arguments(call.parsed_arguments, want["arguments"]))
            if r["valid_call"]:
                result = json.loads(call.result)
                expected = (f"It is {result['temperature_c']}°C and {result['condition']} in {result['city']}."
                            if want["name"] == "get_weather" else want["final"])
                r["correct"] = trace.final.strip() == expected
            else:
                r["correct"] = False
        results.append(r)
    return summarize(results), results


def evaluate_agentic(model: Any, n_per_effort: int = 10, max_new_tokens: int = 300
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Held-out browser and python episodes through `model.chat(..., temperature=0)` with the real tools
    (a fresh Browser over the shipped towns per episode, one Python kernel): valid-call and right-answer rates
    per (kind, effort), as `agentic.score_chat` defines them. The kernel declares harmony's 120 s, as the
    training corpus renders it (the prompt is the corpus's token for token), but cuts a call at 10 s. Where no
    Jupyter kernel can start, the python episodes are skipped with a note (not scored as failures)."""
    from ..tools import Browser, Python
    from . import agentic

    try:
        kernel = Python(timeout=10, declared_timeout=120.0)
    except (ImportError, ValueError) as exc:  # no Jupyter kernel here (the GPU image has none)
        print(f"ossscope: python episodes skipped: {exc}", file=sys.stderr)
        kernel = None
    results = []
    with kernel or contextlib.nullcontext():
        for episode in agentic.eval_agentic(n_per_effort):
            if episode.kind == "python" and kernel is None:
                continue
            tools = [Browser(agentic.TOWNS_DIR)] if episode.kind == "browser" else [kernel]
            trace = model.chat(episode.user, reasoning=episode.effort, tools=tools, temperature=0.0,
                               max_new_tokens=max_new_tokens, max_tool_calls=4)
            r = agentic.score_chat(episode, trace)
            r["analysis_tokens"] = sum(c == "analysis" for c in trace.channels)
            results.append(r)
    return summarize(results), results


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Evaluate gpt-oss-nano (or any compact-vocabulary checkpoint) "
                                                 "on held-out problems, greedy.")
    parser.add_argument("--model", default="nano", help="checkpoint path or 'nano' (default)")
    parser.add_argument("--engine", choices=("greedy", "chat"), default="greedy",
                        help="greedy: batched KV-cache decoding of rendered prompts (fast); chat: model.chat")
    parser.add_argument("--n", type=int, default=50, help="problems per (operation, effort)")
    parser.add_argument("--n-tools", type=int, default=20, help="tool episodes per effort")
    parser.add_argument("--agentic", type=int, default=0, metavar="N",
                        help="also N held-out browser and N python episodes per effort, through chat with the tools")
    parser.add_argument("--json", default=None, help="write the summary and per-item results here")
    args = parser.parse_args(argv)

    from ..loading import load

    model = load(args.model, device="cpu", dtype=torch.float32, progress=False)
    t0 = time.time()
    if args.engine == "greedy":
        summary, results = evaluate_model(model, args.n, args.n_tools)
    else:
        summary, results = evaluate_chat(model, args.n, args.n_tools)
    if args.agentic:
        more, extra = evaluate_agentic(model, args.agentic)
        summary, results = {**summary, **more}, results + extra
    print(format_summary(summary))
    print(f"({args.engine}, {time.time() - t0:.0f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
