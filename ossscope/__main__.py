"""Command line: `python -m ossscope demo | info PATH`.

demo: the main job on the built-in model: chat at two reasoning efforts, show the raw chain of thought beside
the final answer, what the router did, the sink mass, an expert ablation, and an interactive HTML export.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _bar(value: float, width: int = 24) -> str:
    filled = max(0, min(width, round(value * width)))
    return "#" * filled + "." * (width - filled)


def _summarize(trace, label: str) -> None:
    print(f"\n=== {label}: {len(trace.tokens)} tokens generated ===")
    print(f"analysis (raw chain of thought, {len(trace.analysis)} chars):")
    for line in (trace.analysis or "(empty)").splitlines()[:12]:
        print(f"  | {line}")
    if trace.analysis.count("\n") >= 12:
        print("  | ...")
    print(f"final: {trace.final!r}")
    for call in trace.tool_calls:
        error = f" ERROR {call.error}" if call.error else ""
        print(f"tool call: {call.name}({call.arguments}) -> {call.result!r}{error}")
    if trace.parse_errors:
        print(f"parse problems: {trace.parse_errors}")


def _router_report(trace, model) -> tuple[int, int]:
    """Print the busiest expert of each layer and the mean sink mass; return (layer, expert) of the busiest."""
    indices, sink = trace.router_indices, trace.sink  # [T, L, k], [T, L, H]
    E = model.config.num_experts
    print("\nrouter: busiest expert per layer (share of the token's top-k slots) and mean attention-sink mass")
    busiest = (0, 0, 0.0)
    for layer in range(indices.shape[1]):
        counts = indices[:, layer].flatten().bincount(minlength=E).float()
        share = counts / counts.sum().clamp_min(1)
        expert = int(share.argmax())
        kind = "sliding" if model.config.is_sliding(layer) else "full   "
        mass = float(sink[:, layer].mean()) if sink.numel() else 0.0
        print(f"  layer {layer:2d} ({kind}) expert {expert:3d} {_bar(float(share[expert]), 16)} "
              f"{float(share[expert]):5.1%}   sink {_bar(mass, 16)} {mass:5.1%}")
        if share[expert] > busiest[2]:
            busiest = (layer, expert, float(share[expert]))
    return busiest[0], busiest[1]


def demo(args: argparse.Namespace) -> int:
    import ossscope

    started = time.perf_counter()
    model = ossscope.load(args.model, device=args.device)
    print(f"loaded {model.name}: {model.config.num_hidden_layers} layers, {model.config.num_experts} experts "
          f"(top-{model.config.experts_per_token}), vocab {model.config.vocab_size}, on {model.device} "
          f"in {time.perf_counter() - started:.1f}s")
    print(f"prompt: {args.prompt!r}")
    traces = {}
    for effort in ("low", "high"):
        t0 = time.perf_counter()
        trace = model.chat(args.prompt, reasoning=effort, max_new_tokens=args.max_new_tokens, temperature=0)
        traces[effort] = trace
        _summarize(trace, f"reasoning={effort} ({time.perf_counter() - t0:.1f}s)")
    layer, expert = _router_report(traces["high"], model)

    with model.ablate({layer: [expert]}, mode="reroute"):
        ablated = model.chat(args.prompt, reasoning="high", max_new_tokens=args.max_new_tokens, temperature=0)
    print(f"\nablation: expert {expert} of layer {layer} rerouted (never chosen)")
    print(f"  final before: {traces['high'].final!r}")
    print(f"  final after:  {ablated.final!r}")

    out = Path(args.out)
    traces["high"].to_html(out)
    print(f"\nwrote {out} ({out.stat().st_size / 1e6:.1f} MB): open it in any browser, no kernel needed")
    return 0


def info(args: argparse.Namespace) -> int:
    import ossscope

    model = ossscope.load(args.path, device="cpu" if args.device is None else args.device)
    c = model.config
    packed = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("_blocks", "_scales")))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    print(model)
    print(f"layers {c.num_hidden_layers} ({(c.num_hidden_layers + 1) // 2} sliding, window {c.sliding_window}), "
          f"experts {c.num_experts} top-{c.experts_per_token}, heads {c.num_attention_heads}/{c.num_key_value_heads}")
    print(f"memory: packed MXFP4 experts {packed / 2**30:.2f} GiB, other weights {dense / 2**30:.2f} GiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ossscope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="chat with the built-in model and export an interactive trace")
    p_demo.add_argument("--model", default="nano", help="checkpoint folder or name (default: nano)")
    p_demo.add_argument("--prompt", default="What is 79 + 26?",
                        help="the default is one nano gets right only when it reasons at high effort")
    p_demo.add_argument("--max-new-tokens", type=int, default=400)
    p_demo.add_argument("--device", default=None)
    p_demo.add_argument("--out", default="ossscope-demo.html")
    p_demo.set_defaults(run=demo)
    p_info = sub.add_parser("info", help="describe a checkpoint")
    p_info.add_argument("path")
    p_info.add_argument("--device", default=None)
    p_info.set_defaults(run=info)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as exc:  # user errors: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
