"""The decode MoE at batch sizes: per-slot kernels against the grouped decode (kernels/moe_batch.py) on the GPU.

One device visit (about a minute on an H200): `python scripts/moe_batch_sweep.py [--json $OUT/moe_batch.json]`.
gpt-oss-20b shape (E 32, top-4, D = I = 2880), random bf16 inputs and MXFP4 weights at checkpoint-like scales,
router logits random (so about uniform routing, every expert used from N = 16 on). For each N tokens:
- each path's parts checked against the torch twin (`route_reference`, `ops.moe_experts(per_expert=True)`),
  routing against `moe_decode_routed`'s;
- time per layer: `graph` = calls on LAYERS different layers' weights in one CUDA graph, replayed (no launch
  gaps, and no weight read twice, so L2 cannot serve them); `eager` = one call, CUDA events (launches included);
- GB = the bytes of the distinct experts the routing uses (what one read of each needs), TB/s = GB / graph time.
Grouped paths: "dequant" (moe._dequant_tile, ~10 ops per weight code; its default tiles only), "direct"
(moe._direct_matmul, ~2.5; the default for bf16) at its default and with its variants (SPLIT_X, PREFETCH_S, a
narrower down tile; docs/notes/moe_batch_decode.md), "fp8" (opt-in: fp8 tensor cores on input slices, BLOCK_M 8
and 16; a WRONG there also covers its e4m3 assembly, which only the GPU runs), and `route` = the routing/grouping
kernel alone (one program: the fixed cost every grouped step pays). First, the direct decoder's bf16 assembly is
checked bit-exact against `mxfp4.dequantize` (if it is not, every direct row is WRONG too: set
OSSSCOPE_MOE_GROUPED=dequant). Then the smallest N * k at which the grouped decode wins, as
`ossscope.fast.GROUPED_DECODE_SLOTS` wants it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
from ossscope.kernels import moe_batch, moe_tc
from ossscope.kernels.routing import route_reference

from ossscope import fast, kernels, mxfp4, ops
from ossscope.bench import cuda_time, graph_time

E, D, I, K, LAYERS = 32, 2880, 2880, 4, 6
DEVICE, DTYPE = "cuda", torch.bfloat16
TOKENS = [8, 16, 32, 64, 128]
# Grouped configs: (decode, blocks); blocks (BLOCK_N1 = BLOCK_N2 unless given, BLOCK_K, num_warps, num_stages, the
# direct flags SPLIT_X / PREFETCH_S, and BLOCK_M where given, else moe_batch's choice from the slots per expert);
# {} is moe_batch's default for that decode. Few: each new config compiles two kernels (a few seconds), and the
# visit should stay under 90 s.


def _cfg(n: int, bk: int, w: int, s: int, **extra) -> dict:
    return {"BLOCK_N1": n, "BLOCK_N2": n, "BLOCK_K": bk, "num_warps": w, "num_stages": s, **extra}


GROUPED = [("dequant", {}),  # dequant's default (BN64 BK128 w4 s3), the reference for the direct variants
           ("direct", {}),  # the default: BN128 BK64 w4 s3
           ("direct", {"PREFETCH_S": True}),  # scales read a step ahead (SASS: no memory wait per step)
           ("direct", {"SPLIT_X": True}),  # x / act split even-odd once (fewer permutes, more moves in SASS)
           ("direct", {"SPLIT_X": True, "PREFETCH_S": True}),
           ("direct", {"BLOCK_N2": 64}),  # down in narrower tiles: 45 column tiles, about 2 waves instead of 1.15
           ("direct", {"BLOCK_N2": 64, "PREFETCH_S": True}),
           # decode="fp8" (opt-in; moe_batch notes): its default BLOCK_M (8 up to N = 32, then 16) and the other
           # of 8 / 16 at each N (a config that equals one already timed at this N is skipped)
           ("fp8", {}), ("fp8", {"BLOCK_M": 8}), ("fp8", {"BLOCK_M": 16})]
# `--grid`: the direct decode's tiles around its default (PREFETCH_S on), at N = 64 and 128 only, and the
# routing kernel's tokens per loop step and warps (one program: its loops' latency is the fixed cost).
GRID = [("direct", {})] + [("direct", _cfg(n, bk, w, s)) for n, bk, w, s in (
    (128, 64, 4, 2), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 4, 3), (128, 128, 8, 3),
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (256, 64, 8, 3), (256, 64, 4, 3), (128, 32, 4, 4))]
GRID_TOKENS = [64, 128]
ROUTE_GRID = [(32, 4), (64, 4), (128, 4), (64, 8), (128, 8), (128, 16), (32, 1), (64, 2)]  # (BLOCK_T, num_warps)
EXPERT_BYTES = 2 * I * (D // 2 + D // 32 + 2) + D * (I // 2 + I // 32 + 2)  # packed weights, scales, bf16 biases


def layer_weights(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One layer's packed experts: random codes, scale codes 118..120 (about 2**-8, as checkpoints have)."""
    def packed(rows: int, K_: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (E, rows, K_ // 32, 16), dtype=torch.uint8, device=DEVICE, generator=gen),
                torch.randint(118, 121, (E, rows, K_ // 32), dtype=torch.uint8, device=DEVICE, generator=gen))
    w1, s1 = packed(2 * I, D)
    w2, s2 = packed(D, I)
    b1 = (torch.randn(E, 2 * I, device=DEVICE, generator=gen) * 0.1).to(DTYPE)
    b2 = (torch.randn(E, D, device=DEVICE, generator=gen) * 0.1).to(DTYPE)
    return w1, s1, b1, w2, s2, b2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def candidate_paths(N: int, h: torch.Tensor, logits: torch.Tensor, routing: dict, grid: bool = False
                    ) -> list[tuple[str, str, object]]:
    """(path, config name, fn(layer weights) -> parts) for every path and config timed at N tokens (`grid`: the
    direct tiles and routing-kernel variants of GRID and ROUTE_GRID instead)."""
    words = kernels.input_words(h)
    paths: list[tuple[str, str, object]] = [
        ("per-slot", "moe_decode_routed (CUDA cores)",
         lambda w: kernels.moe_decode_routed(words, logits, K, *w, **routing)[0])]
    if moe_tc.available(h):  # bf16 on fp8 tensor cores (compute capability 8.9+)
        slices, act = kernels.input_slices(h), moe_tc.new_slices(N * K, I, DEVICE)
        paths.append(("per-slot", "moe_decode_slices (fp8 TC)", lambda w: kernels.moe_decode_slices(
            slices, None, *w, router_logits=logits, k=K, act_slices=act, **routing)[0]))
    parts = torch.empty(N * K, D, device=DEVICE)
    seen = []
    for decode, cfg in GRID if grid else GROUPED:
        full = moe_batch.grouped_blocks(N * K, E, cfg, decode)
        if (decode, full) in seen:
            continue
        seen.append((decode, full))
        name = "BM{BLOCK_M} BN{BLOCK_N1}".format(**full)
        name += (f"/{full['BLOCK_N2']}" if full["BLOCK_N2"] != full["BLOCK_N1"] else "")
        name += (" BK{BLOCK_K}".format(**full) if "BLOCK_K" in full else "")
        name += " w{num_warps} s{num_stages}".format(**full)
        name += "".join(f" {f}" for f in ("SPLIT_X", "PREFETCH_S") if full.get(f))
        name += (" plain" if cfg.get("ASM") is False else "") + (" (default)" if not cfg else "")
        paths.append((decode, name, lambda w, cfg=cfg, decode=decode: kernels.moe_decode_grouped(
            h, logits, K, *w, out=parts, blocks=cfg, decode=decode, **routing)[0]))
    # The routing and grouping kernel alone (what moe_decode_grouped launches first), at the default BLOCK_M.
    BM = moe_batch.grouped_blocks(N * K, E, decode="direct")["BLOCK_M"]
    n_blocks = moe_batch.max_row_blocks(N * K, E, BM)
    row_slot = torch.empty(n_blocks * BM, device=DEVICE, dtype=torch.int32)
    block_expert = torch.empty(n_blocks, device=DEVICE, dtype=torch.int32)

    def route_only(w, block_t=moe_batch.ROUTE_TOKENS, warps=4):
        moe_batch._route_group_kernel[(1,)](
            logits, logits, logits, routing["indices_out"], routing["weights_out"], row_slot, block_expert, N, E,
            row_slot.shape[0], n_blocks, K_ACT=K, K_P2=triton.next_power_of_2(K),
            BLOCK_E=triton.next_power_of_2(E), BLOCK_T=block_t, BLOCK_M=BM, BLOCK_R=1024,
            HAS_REROUTE=False, HAS_ZERO=False, num_warps=warps)
        return None

    paths.append(("route", f"_route_group_kernel alone (BM{BM})", route_only))
    if grid:
        for block_t, warps in ROUTE_GRID[1:]:
            paths.append(("route", f"_route_group_kernel BLOCK_T {block_t} w{warps}",
                          lambda w, b=block_t, n=warps: route_only(w, b, n)))
    return paths


def check_direct_decoder(w1: torch.Tensor, s1: torch.Tensor) -> bool:
    """The direct decoder's assembly (bf16) and plain form, bit-exact against mxfp4.dequantize on one expert."""
    blocks, scales = w1[0], s1[0]  # [2I, D/32, 16], [2I, D/32]
    want = mxfp4.dequantize(blocks, scales, torch.float32)
    ok = True
    for asm in (True, False):
        got = moe_batch.direct_dequantize(blocks, scales, torch.bfloat16, asm=asm)
        bad = int((got != want).sum())
        ok &= bad == 0
        print(f"direct decoder ({'assembly' if asm else 'plain Triton'}), bf16: "
              f"{'exact' if bad == 0 else f'{bad} of {want.numel()} values WRONG'}")
    return ok


def measure(fn, layers: list) -> tuple[float, float]:
    """Seconds per call: in a CUDA graph over every layer (replayed), and one eager call (CUDA events)."""
    graph = graph_time([lambda w=w: fn(w) for w in layers], reps=10)
    return graph, cuda_time(lambda: fn(layers[0]), reps=10, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--grid", action="store_true",
                        help="the direct tiles and routing-kernel variants around the defaults, at N = 64 and 128")
    args = parser.parse_args()
    began = time.time()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    layers = [layer_weights(gen) for _ in range(LAYERS)]
    decoder_ok = check_direct_decoder(layers[0][0], layers[0][1])
    rows: list[dict] = []
    print(f"{'N':>4} {'path':<10} {'config':<44} {'graph us':>9} {'eager us':>9} {'GB':>6} {'TB/s':>6} {'rel err':>8}")
    for N in GRID_TOKENS if args.grid else TOKENS:
        h = torch.randn(N, D, device=DEVICE, generator=gen).to(DTYPE)
        logits = torch.randn(N, E, device=DEVICE, generator=gen)
        ref_i, ref_w = route_reference(logits, K)
        w0 = layers[0]
        ref_packed = [t.float() if t.is_floating_point() else t for t in w0]
        _, ref_out = ops.moe_experts(h.float(), ref_i, ref_w, *ref_packed, per_expert=True)
        ref_out = ref_out.reshape(N * K, D)
        gb = len(torch.unique(ref_i)) * EXPERT_BYTES / 1e9
        idx, wts = torch.empty(N, K, dtype=torch.long, device=DEVICE), torch.empty(N, K, device=DEVICE)
        routing = dict(indices_out=idx, weights_out=wts)
        paths = candidate_paths(N, h, logits, routing, args.grid)
        for path, name, fn in paths:
            try:
                got = fn(w0)
                got = got.clone() if got is not None else None
                graph, eager = measure(fn, layers)
            except Exception as e:  # a config that fails to compile (shared memory, registers): report, go on
                print(f"{N:>4} {path:<10} {name:<44} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            if got is None:  # the routing kernel alone: only its routing to check
                err, ok = 0.0, torch.equal(idx, ref_i)
            else:
                got = got.view(N * K, -1, D).sum(1)  # per-slot parts may be split-K: add the splits
                err = rel(got, ref_out)
                ok = err < 2e-2 and torch.equal(idx, ref_i)
            row = dict(N=N, path=path, config=name, graph_us=graph * 1e6, eager_us=eager * 1e6, GB=gb,
                       TBps=gb / 1e3 / graph, rel_err=err, ok=ok)
            rows.append(row)
            print(f"{N:>4} {path:<10} {name:<44} {graph * 1e6:>9.1f} {eager * 1e6:>9.1f} {gb:>6.3f} "
                  f"{row['TBps']:>6.2f} {err:>8.1e}{'' if ok else '  WRONG'}")
    # Threshold: the largest N * k at which a per-slot path still beats every grouped config (GraphDecoder takes
    # the grouped decode above it), and the best config of each path per N.
    print()
    threshold = 0
    for N in GRID_TOKENS if args.grid else TOKENS:
        good = [r for r in rows if r["N"] == N and r["ok"]]

        def best(path: str, good=good) -> dict | None:
            return min((r for r in good if r["path"] == path), key=lambda r: r["graph_us"], default=None)

        slot, grp = best("per-slot"), min(filter(None, [best("dequant"), best("direct")]),
                                          key=lambda r: r["graph_us"], default=None)
        # (fp8 is opt-in, so it is reported but left out of the threshold, which sets the default path's use)
        line = ", ".join(f"{p} {r['graph_us']:6.1f} us ({r['config']})" for p in ("per-slot", "dequant", "direct",
                                                                                  "fp8", "route") if (r := best(p)))
        if slot and grp:
            if slot["graph_us"] <= grp["graph_us"]:
                threshold = N * K
            line += (f"; 24 layers of MoE alone: "
                     f"{N / (24 * min(slot['graph_us'], grp['graph_us']) * 1e-6):,.0f} tok/s")
        print(f"N {N:>3}: best {line}")
    print(f"recommended ossscope.fast.GROUPED_DECODE_SLOTS = {threshold} (grouped above {threshold} slots; now "
          f"{fast.GROUPED_DECODE_SLOTS})")
    if not decoder_ok:
        print("the direct decoder is WRONG on this GPU: run with OSSSCOPE_MOE_GROUPED=dequant (moe_batch notes)")
    print(f"sweep took {time.time() - began:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "recommended_grouped_decode_slots": threshold, "direct_decoder_exact": decoder_ok},
                      f, indent=1)


if __name__ == "__main__":
    main()
