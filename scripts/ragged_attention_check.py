"""The decode step's attention with positions per sequence (a ragged batch) on a GPU: checks, then timings.

One device visit: `python scripts/ragged_attention_check.py` (well under a minute on an H200).

Checks (bf16, gpt-oss-20b attention shape): `kernels.attention_decode_step` with slot/position [B], cos/sin
[B, Dh/2] and k_pos [B, S] gives exactly what each row gives alone at batch 1 with shared [1] / [S] tensors
(same splits, so the same chunks and sums): cache contents, k_pos, z and sink mass, for full layers (slots in
order, with and without keys_in_order) and a sliding layer's ring buffer whose slots wrapped; all rows at one
position gives exactly the shared-position result; and the batch agrees with the torch twin (fp32).

Timings (us per call, CUDA-graph replays of 4 layers' caches in turn so L2 cannot hold one): B = 1, 64, 128;
caches of 1024 and 4096 slots; shared positions vs per-row positions with all rows at 1000 tokens, each with
and without keys_in_order; and a ragged batch (rows at lengths spread evenly over 100..1000) per row.
Exits non-zero if a check fails.
"""

from __future__ import annotations

import sys
import time

import torch

from ossscope import kernels, ops
from ossscope.bench import graph_time

H, HKV, DH = 64, 8, 64  # gpt-oss-20b: 64 query heads, 8 kv heads, head dim 64
DTYPE = torch.bfloat16
DEV = "cuda"
WIDTH = (H + 2 * HKV) * DH


def rope_tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B] -> cos, sin [B, Dh/2] fp32 (the model's theta; the values only need to be plausible)."""
    inv_freq = 150000.0 ** (-torch.arange(0, DH, 2, device=DEV, dtype=torch.float32) / DH)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def cache(B: int, S: int, lengths: torch.Tensor, gen: torch.Generator):
    """k, v [B, S, Hkv, Dh] random, k_pos [B, S]: row b holds positions 0..lengths[b]-1 in slots 0.., rest -1."""
    k = torch.randn(B, S, HKV, DH, device=DEV, generator=gen).to(DTYPE)
    v = torch.randn(B, S, HKV, DH, device=DEV, generator=gen).to(DTYPE)
    slots = torch.arange(S, device=DEV)
    k_pos = torch.where(slots[None, :] < lengths[:, None], slots[None, :], -1)
    return k, v, k_pos


# -- checks ------------------------------------------------------------------------------------------------

failures: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}")
    if not ok:
        failures.append(name)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check_rows_alone(name: str, B: int, S: int, lengths: torch.Tensor, slot: torch.Tensor, window: int | None,
                     keys_in_order: bool, k_pos: torch.Tensor | None = None, splits: int = 4) -> None:
    """The batch with slot/position/cos/sin per row against each row alone at batch 1 (shared tensors)."""
    gen = torch.Generator(device=DEV).manual_seed(1)
    k, v, kp = cache(B, S, lengths, gen)
    if k_pos is not None:
        kp = k_pos.clone()
    qkv = torch.randn(B, WIDTH, device=DEV, generator=gen).to(DTYPE)
    sinks = torch.randn(H, device=DEV, generator=gen)
    position = lengths.clone()
    cos, sin = rope_tables(position)
    alone = []
    for b in range(B):
        k1, v1, p1 = k[b:b + 1].clone(), v[b:b + 1].clone(), kp[b].clone()
        z1, s1, _ = kernels.attention_decode_step(
            qkv[b:b + 1], cos[b:b + 1], sin[b:b + 1], k1, v1, p1, slot[b:b + 1], position[b:b + 1], sinks, window, H,
            splits=splits, keys_in_order=keys_in_order)
        alone.append((k1, v1, p1, z1, s1))
    z, sm, _ = kernels.attention_decode_step(qkv, cos, sin, k, v, kp, slot, position, sinks, window, H,
                                             splits=splits, keys_in_order=keys_in_order)
    diffs = [max(max_diff(z[b], z1[0]), max_diff(sm[b], s1[0])) for b, (_, _, _, z1, s1) in enumerate(alone)]
    same_cache = all(torch.equal(k[b], k1[0]) and torch.equal(v[b], v1[0]) and torch.equal(kp[b], p1)
                     for b, (k1, v1, p1, _, _) in enumerate(alone))
    report(f"{name}: per row == each row alone", same_cache and max(diffs) == 0.0,
           f"cache/k_pos equal {same_cache}, max |z or sink diff| {max(diffs):.3g}")
    # and against the torch twin, in fp32
    gen = torch.Generator(device=DEV).manual_seed(1)
    k0, v0, kp0 = cache(B, S, lengths, gen)
    if k_pos is not None:
        kp0 = k_pos.clone()
    q, k_new, v_new = qkv.view(B, 1, H + 2 * HKV, DH).split([H, HKV, HKV], dim=2)
    q = ops.apply_rope(q.float(), cos[:, None], sin[:, None]).to(DTYPE)
    k_new = ops.apply_rope(k_new.float(), cos[:, None], sin[:, None]).to(DTYPE)
    rows = torch.arange(B, device=DEV)
    k0[rows, slot], v0[rows, slot], kp0[rows, slot] = k_new[:, 0], v_new[:, 0], position
    ref_z, ref_sink, _ = ops.attention(q.float(), k0.float(), v0.float(), sinks, position[:, None], kp0, window)
    err = float((z.float() - ref_z).norm() / ref_z.norm())
    report(f"{name}: per row vs torch twin", err < 2e-2 and max_diff(sm, ref_sink) < 1e-2,
           f"rel z error {err:.2e}")


def run_checks() -> None:
    print("checks (bf16, 64 heads / 8 kv heads / Dh 64):")
    B, S = 8, 1024
    lengths = torch.linspace(100, 1000, B, device=DEV).long()
    for keys_in_order in (False, True):
        check_rows_alone(f"full layer, ragged 100..1000, keys_in_order={keys_in_order}", B, S, lengths, lengths,
                         None, keys_in_order)
    # A sliding layer's ring of 128 slots whose rows wrapped a different number of times: slot = position % 128.
    R = 128
    position = torch.tensor([50, 127, 128, 300, 1000, 129, 5000, 777], device=DEV)
    slots = torch.arange(R, device=DEV)
    # the slot s of row b holds the latest position < position[b] that is s mod R (-1 if none)
    latest = (position[:, None] - 1) - (position[:, None] - 1 - slots[None, :]) % R
    ring_pos = torch.where(latest >= 0, latest, -1)
    check_rows_alone("sliding layer, ring of 128 wrapped per row, window 128", B, R, position, position % R, 128,
                     False, k_pos=ring_pos, splits=2)
    # Every row at 1000: per-row tensors give exactly the shared-position result.
    gen = torch.Generator(device=DEV).manual_seed(2)
    lengths = torch.full((B,), 1000, device=DEV)
    k, v, kp = cache(B, S, lengths, gen)
    qkv = torch.randn(B, WIDTH, device=DEV, generator=gen).to(DTYPE)
    sinks = torch.randn(H, device=DEV, generator=gen)
    cos, sin = rope_tables(lengths)
    results = []
    for per_row in (False, True):
        kk, vv, pp = k.clone(), v.clone(), kp.clone() if per_row else kp[0].clone()
        args = (cos, sin, lengths, lengths) if per_row else (cos[:1], sin[:1], lengths[:1], lengths[:1])
        c, s, sl, po = args
        z, sm, _ = kernels.attention_decode_step(qkv, c, s, kk, vv, pp, sl, po, sinks, None, H, keys_in_order=True)
        results.append((kk, vv, pp, z, sm))
    (k0, v0, p0, z0, s0), (k1, v1, p1, z1, s1) = results
    same = torch.equal(k0, k1) and torch.equal(v0, v1) and torch.equal(p0.expand(B, -1), p1)
    report("all rows at 1000: per row == shared", same and torch.equal(z0, z1) and torch.equal(s0, s1),
           f"max |z diff| {max_diff(z0, z1):.3g}")


# -- timings -----------------------------------------------------------------------------------------------


def time_case(B: int, S: int, lengths: torch.Tensor, per_row: bool, keys_in_order: bool, layers: int = 4) -> float:
    """us per attention_decode_step call, the rows at `lengths` (slot = position = length: a full layer)."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    caches = [cache(B, S, lengths, gen) for _ in range(layers)]
    qkv = torch.randn(B, WIDTH, device=DEV, generator=gen).to(DTYPE)
    sinks = torch.randn(H, device=DEV, generator=gen)
    cos, sin = rope_tables(lengths)
    if per_row:
        steps = [(k, v, kp, cos, sin, lengths, lengths) for k, v, kp in caches]
    else:  # every row at lengths[0]
        steps = [(k, v, kp[0].contiguous(), cos[:1], sin[:1], lengths[:1], lengths[:1]) for k, v, kp in caches]
    counters = kernels.decode_counters(B, HKV, DEV)
    z = torch.empty(B, 1, H, DH, device=DEV, dtype=DTYPE)
    sm = torch.empty(B, H, device=DEV)
    fns = [lambda s=s: kernels.attention_decode_step(
        qkv, s[3], s[4], s[0], s[1], s[2], s[5], s[6], sinks, None, H, out=z, sink_out=sm, counters=counters,
        pdl=False, keys_in_order=keys_in_order) for s in steps]
    seconds = graph_time(fns * 5, reps=10)  # 20 calls a replay
    del caches, steps, fns
    torch.cuda.empty_cache()
    return seconds * 1e6


def run_timings() -> None:
    print("\nattention_decode_step, us per call (bf16, 20b shape, 4 layers' caches in turn):")
    cols = ["shared@1000", "shared@1000 in-order", "per-row@1000", "per-row@1000 in-order",
            "ragged 100..1000", "ragged in-order"]
    print(f"{'B':>4} {'slots':>6} " + " ".join(f"{c:>22}" for c in cols))
    for S in (1024, 4096):
        for B in (1, 64, 128):
            full = torch.full((B,), 1000, device=DEV)
            ragged = torch.linspace(100, 1000, B, device=DEV).long() if B > 1 else torch.tensor([100], device=DEV)
            us = [time_case(B, S, full, False, False), time_case(B, S, full, False, True),
                  time_case(B, S, full, True, False), time_case(B, S, full, True, True),
                  time_case(B, S, ragged, True, False), time_case(B, S, ragged, True, True)]
            print(f"{B:>4} {S:>6} " + " ".join(f"{u:>22.1f}" for u in us))
    print("(ragged at B=1: one row at 100 tokens)")


def main() -> None:
    assert torch.cuda.is_available(), "this script checks the compiled kernels on a CUDA GPU"
    t0 = time.time()
    run_checks()
    run_timings()
    print(f"\n{len(failures)} check(s) failed: {failures}" if failures else "\nall checks passed",
          f"({time.time() - t0:.0f} s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
