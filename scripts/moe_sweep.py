"""Sweep the MoE kernels' tile sizes at gpt-oss shapes on the GPU: check each config against the torch twin,
time it, print a table. One device visit: `python scripts/moe_sweep.py --json $OUT/moe_sweep.json`.

Decode: 1 token x k experts, each of `layers` calls on its own layer's weights inside one CUDA graph (no weight
read twice, so L2 cannot serve it); bandwidth against the bytes of k experts. Prefill: T tokens routed by
random logits; FLOP rate of the two grouped GEMMs (the expert-grouping step included).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ossscope import kernels, mxfp4, ops
from ossscope.bench import BF16_RATE, COPY_BANDWIDTH, cuda_time, graph_time
from ossscope.config import PRESETS

# Decode configs vary one kernel at a time from the default, so each row's change in time is that kernel's.
_I = [(16, 16, 2), (4, 16, 1), (16, 16, 1), (8, 32, 2), (16, 32, 4)]  # (BLOCK_I, GROUPS_I, WARPS_I)
_D = [(8, 16, 1), (32, 16, 2), (8, 32, 1), (16, 32, 2), (32, 32, 4)]  # (BLOCK_D, GROUPS_D, WARPS_D)
DECODE = [{}] + [{"BLOCK_I": b, "GROUPS_I": g, "WARPS_I": w} for b, g, w in _I] + [
    {"BLOCK_D": b, "GROUPS_D": g, "WARPS_D": w} for b, g, w in _D]
PREFILL = [
    {"BLOCK_M": 64, "BLOCK_N1": 64, "BLOCK_N2": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {},  # the current default (kernels.moe.PREFILL_BLOCKS)
    {"BLOCK_M": 256, "BLOCK_N1": 128, "BLOCK_N2": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
]
# (block_m, block_n, num_warps, num_stages); the first is the default and the reference.
ATTENTION = [(128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3)]


def experts(E: int, D: int, I: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random packed experts on the GPU at checkpoint-like scales (weights ~ 1/sqrt(fan-in))."""
    w1 = mxfp4.quantize(torch.randn(E, 2 * I, D, device="cuda", generator=gen) / D**0.5)
    w2 = mxfp4.quantize(torch.randn(E, D, I, device="cuda", generator=gen) / I**0.5)
    b1 = torch.randn(E, 2 * I, device="cuda", generator=gen).bfloat16() * 0.1
    b2 = torch.randn(E, D, device="cuda", generator=gen).bfloat16() * 0.1
    return (*w1, b1, *w2, b2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference(x, indices, weights, packed):
    """fp32 twin on the same packed weights (biases upcast)."""
    return ops.moe_experts(x.float(), indices, weights, *[t.float() if t.is_floating_point() else t for t in packed])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--layers", type=int, default=8, help="weight sets rotated through in decode timing")
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192],
                        help="prefill sizes; none to sweep decode only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    c = PRESETS[args.preset]
    E, D, I, k = c.num_experts, c.hidden_size, c.intermediate_size, c.experts_per_token
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [experts(E, D, I, gen) for _ in range(args.layers)]
    expert_bytes = 2 * I * (D // 2 + D // 32 + 2) + D * (I // 2 + I // 32 + 2)
    results = []

    x = torch.randn(1, D, device="cuda", generator=gen).bfloat16()
    idx = [torch.randperm(E, device="cuda", generator=gen)[:k].view(1, k) for _ in layers]
    wts = torch.softmax(torch.randn(1, k, device="cuda", generator=gen), -1)
    for cfg in DECODE:
        try:
            outs = [torch.full((1, D), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in layers]
            kernels.moe_experts(x, idx[0], wts, *layers[0], out=outs[0], blocks=cfg)
            err = rel(outs[0], reference(x, idx[0], wts, layers[0]))
            fns = [lambda i=i, outs=outs, cfg=cfg: kernels.moe_experts(x, idx[i], wts, *layers[i], out=outs[i],
                                                                        blocks=cfg) for i in range(len(layers))]
            t = min(graph_time(fns, reps=20) for _ in range(2))
            b = k * expert_bytes
            row = {"case": "decode", "cfg": cfg, "us": t * 1e6, "TB/s": b / t / 1e12,
                   "of_peak": b / t / COPY_BANDWIDTH, "rel_err": err}
        except Exception as e:  # a config that does not compile or fit is reported, not fatal
            row = {"case": "decode", "cfg": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        results.append(row)
        print(json.dumps(row), flush=True)

    for T in args.tokens:
        xs = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
        ti, tw = kernels.route(torch.randn(T, E, device="cuda", generator=gen), k)
        ref = reference(xs, ti, tw, layers[0])
        flops = T * k * 2 * (D * 2 * I + I * D)
        grouping = cuda_time(lambda ti=ti: kernels.group_by_expert(ti, E, 128), reps=10, warmup=2)
        for cfg in PREFILL:
            try:
                y = torch.full((T, D), float("nan"), device="cuda", dtype=torch.bfloat16)
                kernels.moe_experts(xs, ti, tw, *layers[0], out=y, blocks=cfg)
                err = rel(y, ref)
                t = min(cuda_time(lambda a=(xs, ti, tw, *layers[li]), y=y, cfg=cfg: kernels.moe_experts(
                    *a, out=y, blocks=cfg), reps=5, warmup=1) for li in range(min(3, len(layers))))
                row = {"case": f"prefill {T}", "cfg": cfg, "us": t * 1e6, "TFLOP/s": flops / t / 1e12,
                       "of_peak": flops / t / BF16_RATE, "rel_err": err, "grouping_us": grouping * 1e6}
            except Exception as e:
                row = {"case": f"prefill {T}", "cfg": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            results.append(row)
            print(json.dumps(row), flush=True)

    # Attention prefill (causal, full layer and a sliding layer), tile sizes.
    H, Hkv, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    sinks = torch.randn(H, device="cuda", generator=gen)
    for T in args.tokens:
        q = torch.randn(1, T, H, Dh, device="cuda", generator=gen).bfloat16()
        kk, vv = (torch.randn(1, T, Hkv, Dh, device="cuda", generator=gen).bfloat16() for _ in range(2))
        pos = torch.arange(T, device="cuda")
        ref = None
        for window in (None, c.sliding_window):
            for bm, bn, nw, ns in ATTENTION:
                try:
                    def run(window=window, bm=bm, bn=bn, nw=nw, ns=ns, q=q, kk=kk, vv=vv, pos=pos):
                        return kernels.attention_prefill(q, kk, vv, sinks, pos, pos, window, block_m=bm, block_n=bn,
                                                         num_warps=nw, num_stages=ns)[0]
                    z = run()
                    if (bm, bn, nw, ns) == ATTENTION[0]:
                        ref = z.float()
                    t = cuda_time(run, reps=10, warmup=2)
                    keys = T / 2 if window is None else min(window, T)  # keys per query, on average
                    flops = 4 * T * keys * H * Dh
                    cfg = {"block_m": bm, "block_n": bn, "warps": nw, "stages": ns}
                    row = {"case": f"attn {T} w{window or 0}", "cfg": cfg, "us": t * 1e6,
                           "TFLOP/s": flops / t / 1e12, "of_peak": flops / t / BF16_RATE, "rel_err": rel(z, ref)}
                except Exception as e:
                    row = {"case": f"attn {T} w{window or 0}", "cfg": (bm, bn, nw, ns),
                           "error": f"{type(e).__name__}: {str(e)[:200]}"}
                results.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n{'case':<13} {'us':>9} {'rate':>12} {'peak':>6} {'err':>8}  config")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<13} {'-':>9} {'-':>12} {'-':>6} {'-':>8}  {r['cfg']} {r['error'][:80]}")
            continue
        rate = f"{r['TB/s']:.2f} TB/s" if "TB/s" in r else f"{r['TFLOP/s']:.0f} TF/s"
        print(f"{r['case']:<13} {r['us']:9.1f} {rate:>12} {r['of_peak']:6.1%} {r['rel_err']:8.1e}  {r['cfg']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    bad = [r for r in results if "error" not in r and not r["rel_err"] < 2e-2]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
