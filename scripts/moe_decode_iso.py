"""The decoder's MoE decode and mid norm alone, on random weights of the gpt-oss-20b shape, CUDA-graph timed.

One device visit: `python scripts/moe_decode_iso.py`. Times the routed MoE decode (gate/up + down, routing
inside the kernels) on the fp8 tensor cores (kernels/moe_tc.py) and on the CUDA cores (kernels/moe.py), with
programmatic dependent launch off and on, then the residual norm writing its output as slices or as words,
with and without the router, and `input_slices` alone. Six layers' weights rotate so L2 cannot serve them.
"""

import torch
from ossscope.kernels import moe_tc

from ossscope import kernels
from ossscope.bench import graph_time


def main() -> None:
    torch.manual_seed(0)
    dev, L, E, D, I, k = "cuda", 6, 32, 2880, 2880, 4
    layers = [(torch.randint(0, 256, (E, 2 * I, D // 32, 16), dtype=torch.uint8, device=dev),
               torch.randint(118, 121, (E, 2 * I, D // 32), dtype=torch.uint8, device=dev),
               torch.randn(E, 2 * I, device=dev).bfloat16(),
               torch.randint(0, 256, (E, D, I // 32, 16), dtype=torch.uint8, device=dev),
               torch.randint(118, 121, (E, D, I // 32), dtype=torch.uint8, device=dev),
               torch.randn(E, D, device=dev).bfloat16()) for _ in range(L)]
    x = torch.randn(1, D, device=dev).bfloat16()
    logits = torch.randn(1, E, device=dev)
    slices, act, words = kernels.input_slices(x), moe_tc.new_slices(k, I, dev), kernels.input_words(x)
    routing = dict(indices_out=torch.empty(1, k, dtype=torch.long, device=dev),
                   weights_out=torch.empty(1, k, device=dev))
    for pdl in (False, True):
        tc = graph_time([lambda w=w, pdl=pdl: kernels.moe_decode_slices(
            slices, None, *w, router_logits=logits, k=k, act_slices=act, pdl=pdl, **routing) for w in layers], reps=20)
        cc = graph_time([lambda w=w, pdl=pdl: kernels.moe_decode_routed(words, logits, k, *w, pdl=pdl, **routing)
                         for w in layers], reps=20)
        print(f"PDL {pdl}: routed MoE decode on tensor cores {tc * 1e6:.1f} us, on CUDA cores {cc * 1e6:.1f} us")
    router = (torch.randn(E, D, device=dev).bfloat16(), torch.randn(E, device=dev).bfloat16())
    scale, out_logits, residual = torch.ones(D, device=dev), torch.empty(1, E, device=dev), torch.empty_like(x)
    xs = [torch.randn(1, D, device=dev).bfloat16() for _ in range(L)]
    for with_router in (True, False):
        extra = dict(router=router, logits_out=out_logits) if with_router else {}
        times = [graph_time([lambda r=r, out=out, extra=extra: kernels.add_rms_norm(
            r, x, scale, 1e-5, residual_out=residual, **out, **extra) for r in xs], reps=20)
                 for out in (dict(slices_out=slices), dict(words_out=words))]
        print(f"norm {'with' if with_router else 'without'} the router: writing slices {times[0] * 1e6:.1f} us, "
              f"words {times[1] * 1e6:.1f} us")
    t = graph_time([lambda r=r: kernels.input_slices(r, out=slices) for r in xs], reps=20)
    print(f"input_slices alone: {t * 1e6:.1f} us")


if __name__ == "__main__":
    main()
