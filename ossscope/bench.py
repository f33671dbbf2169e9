"""python -m ossscope.bench: speed and memory of the fast path on random weights of the real shapes.

Measures, at batch 1: `model.chat` through the user's path (the engine `ossscope.load` picks on a GPU, router +
sink recorded for every token, after one warm chat): tok/s for 128 and 1,024 new tokens after a `context`-token
prompt, and how soon a second chat's first token comes; the engine alone: decode tok/s from a `context`-token
prompt with capture off, with router + sink records kept for every token, and with every layer's attention
pattern captured too; prefill tok/s at the given lengths; time to first token; peak GPU memory; the bandwidth
(decode) or FLOP rate (prefill) of each kernel against the device's ceilings (copy bandwidth and bf16 matmul
rate, measured at the start of the run); and with `--baseline hf` the same workload on Hugging Face transformers
in bf16 (eager attention) in the same process, as ratios. Prints a table and writes JSON.

Random weights are drawn on the GPU in place (a 120b-shaped model never exists on the host).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import GptOssConfig, resolve_config
from .model import Model

# Ceilings for "of peak": measured at the start of a run (`measure_ceilings`); until then an H100's figures
# (device-to-device copy, bytes read + written per second; an 8192^3 bf16 matmul), which scripts/ also use.
COPY_BANDWIDTH = 3.0e12
BF16_RATE = 798e12
CEILINGS = {"copy_bytes_per_s": COPY_BANDWIDTH, "bf16_flop_per_s": BF16_RATE}


@torch.no_grad()
def measure_ceilings() -> dict[str, float]:
    """This GPU's device-to-device copy bandwidth (bytes read + written per second, 2 GiB copied) and bf16 matmul
    rate (8192^3), both medians over repeated runs; they replace the defaults in CEILINGS."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), reps=10, warmup=2)
    copy = 2 * src.numel() * src.element_size() / t
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, reps=10, warmup=2)
    CEILINGS.update(copy_bytes_per_s=copy, bf16_flop_per_s=2 * 8192**3 / t)
    return dict(CEILINGS)


# -- set-up ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def random_model_on_gpu(config: GptOssConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                        name: str = "random") -> Model:
    """A model with random weights drawn in place on the GPU (same scales as `ossscope.random_model`)."""
    model = Model(config, device="cuda", dtype=dtype, name=name)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    D = config.hidden_size
    for param_name, tensor in model.state_dict().items():
        if param_name.endswith("_blocks"):
            tensor.random_(0, 256, generator=gen)
        elif param_name.endswith("_scales"):
            K = config.hidden_size if "mlp1" in param_name else config.intermediate_size
            base = 127 + round(math.log2(K**-0.5 / 2.5))
            tensor.random_(base - 1, base + 2, generator=gen)
        elif param_name.endswith("norm.scale") or param_name == "ln_final.scale":
            tensor.normal_(1.0, 0.1, generator=gen)
        elif param_name.endswith("sinks"):
            tensor.normal_(0.0, 1.0, generator=gen)
        elif param_name.endswith("bias"):
            tensor.normal_(0.0, 0.02, generator=gen)
        elif tensor.dim() == 2:
            tensor.normal_(0.0, D**-0.5, generator=gen)
    return model


def cuda_time(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `reps` runs, timed with CUDA events after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def graph_time(fns: list[Callable[[], Any]], reps: int = 10) -> float:
    """Median seconds per call of the `fns`, captured in one CUDA graph (no launch gaps) and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return cuda_time(graph.replay, reps=reps, warmup=2) / len(fns)


# -- our model ---------------------------------------------------------------------------------------------------


def expert_bytes(config: GptOssConfig) -> int:
    """Bytes of one expert's packed weights, scales and biases (mlp1 + mlp2)."""
    D, I = config.hidden_size, config.intermediate_size
    return 2 * I * (D // 2 + D // 32 + 2) + D * (I // 2 + I // 32 + 2)


def decode_bytes(config: GptOssConfig, context: int) -> dict[str, int]:
    """Bytes a batch-1 decode step must read, by part (weights once, KV cache of `context` tokens)."""
    c = config
    D, L = c.hidden_size, c.num_hidden_layers
    attn = (D * (c.q_width + 2 * c.kv_width) + c.q_width * D) * 2
    kv_per_token = 2 * c.kv_width * 2
    kv = sum(min(context, c.sliding_window) if c.is_sliding(layer) else context for layer in range(L)) * kv_per_token
    return {"experts": L * c.experts_per_token * expert_bytes(c), "attention weights": L * attn, "kv cache": kv,
            "router": L * D * c.num_experts * 2, "unembedding": c.vocab_size * D * 2}


@torch.no_grad()
def bench_kernels(model: Model, context: int, prefill_tokens: int) -> list[dict[str, Any]]:
    """Each kernel alone at the decode shape (bandwidth) and the prefill shape (FLOP rate)."""
    from ossscope import kernels

    c, dev = model.config, model.device
    L, D, k = c.num_hidden_layers, c.hidden_size, c.experts_per_token
    rows = []
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, D, device=dev, generator=gen).to(model.dtype)
    indices = torch.randperm(c.num_experts, device=dev, generator=gen)[:k].view(1, k)
    weights = torch.softmax(torch.randn(1, k, device=dev, generator=gen), -1)

    def moe(layer: int, xx=x, ii=indices, ww=weights):
        mlp = model.blocks[layer].mlp
        return lambda: kernels.moe_experts(xx, ii, ww, mlp.mlp1_blocks, mlp.mlp1_scales, mlp.mlp1_bias,
                                           mlp.mlp2_blocks, mlp.mlp2_scales, mlp.mlp2_bias)

    # One call per layer in the graph, so no weight is read twice and L2 cannot serve it.
    t = graph_time([moe(layer) for layer in range(L)])
    b = k * expert_bytes(c)
    rows.append({"kernel": f"moe_experts decode (1 token x {k} experts)", "us": t * 1e6, "bytes": b,
                 "TB/s": b / t / 1e12, "of_peak": b / t / CEILINGS["copy_bytes_per_s"]})

    caches = [torch.randn(2, 1, context, c.num_key_value_heads, c.head_dim, device=dev, generator=gen)
              .to(model.dtype) for _ in range(L)]
    k_pos = torch.arange(context, device=dev)
    q = torch.randn(1, 1, c.num_attention_heads, c.head_dim, device=dev, generator=gen).to(model.dtype)
    q_pos = torch.tensor([context - 1], device=dev)
    sinks = model.blocks[1].attn.sinks
    counters = kernels.decode_counters(1, c.num_key_value_heads, dev)  # as the decoder keeps them

    def attn(layer: int):
        return lambda: kernels.attention_decode(q, caches[layer][0], caches[layer][1], sinks, q_pos, k_pos, None,
                                                counters=counters)

    t = graph_time([attn(layer) for layer in range(L)])
    b = context * c.kv_width * 2 * 2
    rows.append({"kernel": f"attention_decode ({context} keys, full layer)", "us": t * 1e6, "bytes": b,
                 "TB/s": b / t / 1e12, "of_peak": b / t / CEILINGS["copy_bytes_per_s"]})

    def projections(layer: int, linear):
        a = model.blocks[layer].attn
        return lambda: linear(linear(x, a.qkv.weight, a.qkv.bias)[:, : c.q_width], a.out.weight, a.out.bias)

    b = (D * (c.q_width + 2 * c.kv_width) + c.q_width * D) * 2
    for name, linear in (("kernels.linear", kernels.linear), ("cuBLAS", torch.nn.functional.linear)):
        t = graph_time([projections(layer, linear) for layer in range(L)])
        rows.append({"kernel": f"qkv + out projections ({name})", "us": t * 1e6, "bytes": b, "TB/s": b / t / 1e12,
                     "of_peak": b / t / CEILINGS["copy_bytes_per_s"]})
    t = graph_time([lambda: model.unembed(x)], reps=20)
    b = c.vocab_size * D * 2
    rows.append({"kernel": "unembedding (cuBLAS)", "us": t * 1e6, "bytes": b, "TB/s": b / t / 1e12,
                 "of_peak": b / t / CEILINGS["copy_bytes_per_s"]})

    # Prefill shapes: FLOP rates.
    T = prefill_tokens
    xs = torch.randn(T, D, device=dev, generator=gen).to(model.dtype)
    logits = torch.randn(T, c.num_experts, device=dev, generator=gen)
    ti, tw = kernels.route(logits, k)
    t = cuda_time(moe(0, xs, ti, tw), reps=5, warmup=1)
    flops = T * k * 2 * (D * 2 * c.intermediate_size + c.intermediate_size * D)
    rows.append({"kernel": f"moe_experts prefill ({T} tokens)", "us": t * 1e6, "TFLOP/s": flops / t / 1e12,
                 "of_peak": flops / t / CEILINGS["bf16_flop_per_s"]})
    qs = torch.randn(1, T, c.num_attention_heads, c.head_dim, device=dev, generator=gen).to(model.dtype)
    ks, vs = (torch.randn(1, T, c.num_key_value_heads, c.head_dim, device=dev, generator=gen).to(model.dtype)
              for _ in range(2))
    pos = torch.arange(T, device=dev)
    t = cuda_time(lambda: kernels.attention_prefill(qs, ks, vs, sinks, pos, pos, None), reps=5)
    flops = 4 * T * (T + 1) / 2 * c.num_attention_heads * c.head_dim
    rows.append({"kernel": f"attention_prefill ({T} tokens, causal)", "us": t * 1e6, "TFLOP/s": flops / t / 1e12,
                 "of_peak": flops / t / CEILINGS["bf16_flop_per_s"]})
    return rows


@torch.no_grad()
def bench_ours(model: Model, context: int, steps: int, prefill_lengths: list[int]) -> dict[str, Any]:
    from ossscope import fast

    fast.use_kernels(model)
    prefill = functools.partial(fast.prefill, fused=True)
    c, dev = model.config, model.device
    out: dict[str, Any] = {}
    gen = torch.Generator(device=dev).manual_seed(2)

    def prompt(T: int) -> torch.Tensor:
        return torch.randint(0, c.vocab_size, (1, T), device=dev, generator=gen)

    prefill(model, prompt(300), model.new_cache(1, 300))  # compile the prefill kernels
    ids = prompt(context)

    def first_token():
        cache = model.new_cache(1, context + 1)
        return prefill(model, ids, cache).argmax(-1)

    out["ttft_ms"] = cuda_time(first_token, reps=5) * 1e3

    # Prefill before the decoders' graphs exist, in the state a first prompt meets (docs/PERFORMANCE.md).
    for T in prefill_lengths:
        gc.collect()
        ids_T = prompt(T)
        torch.cuda.reset_peak_memory_stats()

        def run(ids_T=ids_T, T=T):
            return prefill(model, ids_T, model.new_cache(1, T))

        seconds = cuda_time(run, reps=3 if T <= 4096 else 2, warmup=1)
        out[f"prefill_tok_s[{T}]"] = T / seconds
        out[f"peak_GiB[prefill {T}]"] = torch.cuda.max_memory_allocated() / 2**30
    # Decode: one cache, three modes one after another (the context grows by a few hundred tokens).
    warm = 4
    cache = model.new_cache(1, context + 3 * (steps + warm) + 8)
    prefill(model, ids, cache)
    decoders = {}
    for mode in ("off", "router+sink", "pattern"):
        if mode != "router+sink":
            decoders.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            decoders[mode] = fast.GraphDecoder(model, cache, pattern=mode == "pattern")
            torch.cuda.synchronize()
            out.setdefault("capture_seconds", {})[mode] = time.perf_counter() - t0
        decoder = next(iter(decoders.values()))
        token = torch.zeros(1, dtype=torch.long, device=dev)
        records = []
        for i in range(warm + steps):
            if i == warm:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            token = decoder.step(token).argmax(-1)
            if mode != "off":  # what a trace keeps for every token
                records.append((decoder.router_indices.clone(), decoder.router_weights.clone(), decoder.sink.clone()))
            if mode == "pattern":
                records.append(tuple(p.clone() for p in decoder.patterns))
        torch.cuda.synchronize()
        out[f"decode_tok_s[{mode}]"] = steps / (time.perf_counter() - t0)
    decoders.clear()
    out["decode_context"] = context
    # The shortest prefill again, now that graphs have been captured in this process (it has measured slower;
    # docs/PERFORMANCE.md).
    if prefill_lengths:
        T = min(prefill_lengths)
        ids_T = prompt(T)
        gc.collect()
        seconds = cuda_time(lambda: prefill(model, ids_T, model.new_cache(1, T)), reps=3, warmup=1)
        out[f"prefill_tok_s[{T}, after decode]"] = T / seconds

    return out


@torch.no_grad()
def bench_chat(model: Model, context: int, new_tokens: list[int]) -> dict[str, Any]:
    """`model.chat` as a user calls it, on the engine `ossscope.load` picks on a GPU (the kernels): a user message
    that makes the prompt about `context` tokens, the default sampling (temperature 1), router + sink recorded for
    every token (always, in a chat). Each length is chatted once to warm up (that captures its graphs), then timed:
    tok/s over the whole call, the decode rate between the first and last token, and the first token's delay."""
    from .engine import set_engine

    engine = set_engine(model, "kernels")
    out: dict[str, Any] = {}
    sentence = "Why is the sky blue, and why are sunsets red? "
    per_sentence = len(model.tokenizer.encode(sentence))
    long_message = sentence * max(1, (context - 100) // per_sentence)

    def timed(message: str, n: int, seed: int) -> tuple[Any, float, list[float]]:
        times: list[float] = []
        t0 = time.perf_counter()
        trace = model.chat(message, max_new_tokens=n, seed=seed, on_token=lambda e: times.append(time.perf_counter()))
        return trace, time.perf_counter() - t0, [t - t0 for t in times]

    for n in new_tokens:
        timed(long_message, n, seed=0)  # warm: compiles, captures this cache bucket's graph
        trace, seconds, times = timed(long_message, n, seed=1)
        generated = len(trace.tokens)
        out[f"chat_tok_s[{n} new]"] = generated / seconds
        out[f"chat_decode_tok_s[{n} new]"] = (generated - 1) / (times[-1] - times[0]) if generated > 1 else None
        out[f"chat_first_token_ms[{n} new]"] = times[0] * 1e3
        out[f"chat_generated[{n} new]"] = generated
    out["chat_prompt_tokens"] = len(trace.prompt_tokens)
    short = "Why is the sky blue?"
    timed(short, 16, seed=0)
    trace, _, times = timed(short, 16, seed=2)
    out["chat_second_start_ms[short prompt]"] = times[0] * 1e3
    out["chat_short_prompt_tokens"] = len(trace.prompt_tokens)
    out["chat_graphs_captured"] = engine.captures
    out["chat_capture_seconds"] = engine.capture_seconds
    out["chat_graph_steps_share"] = engine.graph_steps / max(1, engine.steps)
    engine.clear_pool()
    return out


def bench_batch(model: Model, batch_sizes: list[int], context: int, steps: int) -> dict[str, Any]:
    """Batched decode through the user's path (`generate` over a list of prompts: the Decoder, per-row
    positions, router + sink recorded for every token of every row), greedy, after a warm run at each size:
    decode tok/s summed over the rows, between the first and the last step. Also one ragged batch (the largest
    size, prompt lengths spread from context/2 to context)."""
    from .engine import set_engine
    from .generation import generate

    set_engine(model, "kernels")
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(3)

    def run(prompts: list[list[int]]) -> float:
        times: list[float] = []
        generate(model, prompts, max_new_tokens=steps, stop_tokens=(),
                 on_token=lambda e: times.append(time.perf_counter()))
        return len(prompts) * (len(times) - 1) / (times[-1] - times[0])

    for B in batch_sizes:
        prompts = torch.randint(0, model.config.vocab_size, (B, context), generator=gen).tolist()
        run(prompts)  # warm: compiles and captures this batch's graph
        out[f"batch_decode_tok_s[B={B}]"] = run(prompts)
    B = max(batch_sizes)
    lengths = torch.linspace(context // 2, context, B).long().tolist()
    ragged = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    run(ragged)
    out[f"batch_decode_tok_s[B={B}, ragged {context // 2}-{context}]"] = run(ragged)
    model.engine.clear_pool()
    return out


def bench_collect(model: Model, prompts: int, new_tokens: int, batch_size: int) -> dict[str, Any]:
    """`collect` as the command line runs it (chat runner, mode stats, `batch_size` rows, default sampling):
    `prompts` short questions of `new_tokens` tokens each; tok/s over the whole collect, files written."""
    import tempfile

    from . import collect

    questions = [collect.Prompt(index=i, line=i + 1, id=f"q{i}", messages=[{"role": "user", "content":
                 f"Question {i}: why is the sky blue?"}]) for i in range(prompts)]
    runner = collect.chat_runner(max_new_tokens=new_tokens)
    with tempfile.TemporaryDirectory() as out:
        collect.collect(model, questions[: 2 * batch_size], out + "/warm", runner, "stats", batch_size=batch_size)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = collect.collect(model, questions, out + "/run", runner, "stats", batch_size=batch_size)
        seconds = time.perf_counter() - t0
        tokens = collect.merge(out + "/run", questions)["tokens"]
    model.engine.clear_pool()
    return {f"collect_tok_s[{prompts} prompts x {new_tokens}, B={batch_size}]": tokens / seconds,
            "collect_seconds": seconds, "collect_failed": len(result.failed)}


# -- the transformers baseline ------------------------------------------------------------------------------------


@torch.no_grad()
def bench_hf(config: GptOssConfig, context: int, steps: int, prefill_lengths: list[int],
             batch_sizes: list[int] = ()) -> dict[str, Any]:
    """HF transformers GptOssForCausalLM, bf16 weights built directly on the GPU, eager attention (greedy decode
    at batch 1 and at each of `batch_sizes`)."""
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM

    data = config.to_hf_json()
    for key in ("quantization_config", "rope_scaling", "rope_theta", "architectures", "model_type",
                "experts_per_token"):
        data.pop(key, None)
    hf_config = HFConfig(**data, attn_implementation="eager")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.device("cuda"):
        try:
            hf = GptOssForCausalLM._from_config(hf_config, dtype=torch.bfloat16)
        except TypeError:  # older transformers
            hf = GptOssForCausalLM._from_config(hf_config, torch_dtype=torch.bfloat16)
    hf.eval()
    out: dict[str, Any] = {"build_seconds": time.perf_counter() - t0,
                           "weights_GiB": torch.cuda.memory_allocated() / 2**30}
    gen = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (1, context), device="cuda", generator=gen)

    def first_token():
        return hf(ids, use_cache=True, logits_to_keep=1)

    out["ttft_ms"] = cuda_time(first_token, reps=3) * 1e3
    result = hf(ids, use_cache=True, logits_to_keep=1)
    past, token = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
    warm = 2
    for i in range(warm + steps):
        if i == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        result = hf(token, past_key_values=past, use_cache=True)
        past, token = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    out["decode_tok_s[off]"] = steps / (time.perf_counter() - t0)
    del past, result
    for T in prefill_lengths:
        ids_T = torch.randint(0, config.vocab_size, (1, T), device="cuda", generator=gen)
        try:
            seconds = cuda_time(lambda ids_T=ids_T: hf(ids_T, use_cache=False, logits_to_keep=1), reps=2)
            out[f"prefill_tok_s[{T}]"] = T / seconds
        except torch.cuda.OutOfMemoryError:
            out[f"prefill_tok_s[{T}]"] = None
            gc.collect()
            torch.cuda.empty_cache()
    for B in batch_sizes:
        ids_B = torch.randint(0, config.vocab_size, (B, context), device="cuda", generator=gen)
        try:
            result = hf(ids_B, use_cache=True, logits_to_keep=1)
            past, token = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
            for i in range(2 + steps):
                if i == 2:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                result = hf(token, past_key_values=past, use_cache=True)
                past, token = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            out[f"batch_decode_tok_s[B={B}]"] = B * steps / (time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            out[f"batch_decode_tok_s[B={B}]"] = None
        del result, past
        gc.collect()
        torch.cuda.empty_cache()
    out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out  # the model goes with this frame


# -- main ---------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def print_table(report: dict[str, Any]) -> None:
    ours, hf = report["ours"], report.get("hf") or {}
    print(f"\n{report['preset']} on {report['device']} (torch {report['torch']}, triton {report['triton']}), batch 1")
    print(f"{'metric':34} {'ossscope':>12} {'HF bf16 eager':>14} {'ratio':>8}")
    for key, value in ours.items():
        if isinstance(value, dict):
            continue
        theirs = hf.get(key)
        ratio = ""
        if isinstance(value, (int, float)) and isinstance(theirs, (int, float)) and theirs:
            ratio = f"{value / theirs:.2f}x"
        print(f"{key:34} {_fmt(value):>12} {_fmt(theirs) if key in hf else '':>14} {ratio:>8}")
    print(f"\n{'kernel':44} {'us':>9} {'TB/s':>6} {'TFLOP/s':>8} {'of peak':>8}")
    for row in report["kernels"]:
        print(f"{row['kernel']:44} {row['us']:>9.1f} {_fmt(row.get('TB/s')) if 'TB/s' in row else '':>6} "
              f"{_fmt(row.get('TFLOP/s')) if 'TFLOP/s' in row else '':>8} {row['of_peak']:>8.0%}")
    floor, ceilings = report["decode_bytes_per_token"], report["ceilings"]
    bandwidth = ceilings["copy_bytes_per_s"]
    print(f"\nceilings measured here: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceilings['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s")
    print(f"bytes per decode token {sum(floor.values()) / 1e9:.2f} GB -> bandwidth floor "
          f"{bandwidth / sum(floor.values()):,.0f} tok/s at {bandwidth / 1e12:.2f} TB/s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m ossscope.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-oss-20b", help="model shape (a preset name)")
    parser.add_argument("--context", type=int, default=1024, help="prompt length before decoding")
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--chat-tokens", type=int, nargs="*", default=[128, 1024], help="new tokens per timed chat")
    parser.add_argument("--prefill", type=int, nargs="*", default=[2048, 8192], help="prefill lengths")
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    parser.add_argument("--batch", type=int, nargs="*", default=[],
                        help="batch sizes for batched decode (generate over a list of prompts; tok/s summed)")
    parser.add_argument("--batch-steps", type=int, default=64, help="decode steps per batched run")
    parser.add_argument("--collect", type=int, nargs=3, metavar=("PROMPTS", "NEW_TOKENS", "BATCH"),
                        help="time collect (stats mode, chat runner) over PROMPTS prompts of NEW_TOKENS tokens")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m ossscope.bench needs a CUDA GPU")
    import triton

    config = resolve_config(args.preset)
    ceilings = measure_ceilings()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = random_model_on_gpu(config, name=args.preset)
    torch.cuda.synchronize()
    report: dict[str, Any] = {
        "preset": args.preset, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "decode_bytes_per_token": decode_bytes(config, args.context),
        "ceilings": ceilings,
    }
    ours = {"load_seconds": time.perf_counter() - t0, "weights_GiB": torch.cuda.memory_allocated() / 2**30}
    if args.chat_tokens:
        ours.update(bench_chat(model, args.context, args.chat_tokens))
    if args.batch:
        ours.update(bench_batch(model, args.batch, args.context, args.batch_steps))
    if args.collect:
        ours.update(bench_collect(model, *args.collect))
    if args.decode_steps or args.prefill:
        ours.update(bench_ours(model, args.context, args.decode_steps, args.prefill))
    ours["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    report["ours"] = ours
    report["kernels"] = [] if args.no_kernels else bench_kernels(model, args.context, min(args.prefill or [2048]))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if args.baseline == "hf":
        report["hf"] = bench_hf(config, args.context, max(8, args.decode_steps // 8), args.prefill, args.batch)
        gc.collect()
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
