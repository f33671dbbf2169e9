"""Offline (no GPU) sm_90 compile of the grouped decode kernels: registers, spills, SASS loop statistics.

`python scripts/moe_batch_aot.py BN BK WARPS STAGES [BM SPLIT_X PREFETCH_S]` (notes: docs/notes/moe_batch_decode.md).
Writes TTGIR / PTX / cubin / SASS under $AOT_OUT (default /tmp/aot/out) and prints, per kernel, shared memory,
registers / stack / local memory, and the main loop's instructions per weight code by opcode class.
"""

import collections
import os
import re
import subprocess
import sys

import triton
from ossscope.kernels import moe
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
OUTDIR = os.environ.get("AOT_OUT", "/tmp/aot/out")
E, D, I = 32, 2880, 2880


def loop_stats(sass: str, codes: int) -> str:
    """The first backward branch's loop: instructions per weight code (`codes` per thread per step)."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loops = [(a, int(re.search(r"0x([0-9a-f]+)", r).group(1), 16)) for a, op, r in ins
             if op == "BRA" and int(re.search(r"0x([0-9a-f]+)", r).group(1), 16) < a]
    a, t = loops[0]
    c = collections.Counter(op.split(".")[0] for x, op, r in ins if t <= x <= a)
    alu = sum(c[k] for k in ("LOP3", "PRMT", "SHF", "SEL", "ISETP", "LEA", "PLOP3", "IADD3", "VIADD", "FMNMX"))
    n = sum(c.values())
    return (f"loop {n} instr, {n / codes:.2f}/code, ALU-pipe {alu / codes:.2f}/code; "
            + ", ".join(f"{k} {v}" for k, v in c.most_common(12)))


def build(fn, types: dict, ints: dict, consts: dict, warps: int, stages: int, tag: str) -> None:
    """Compile `fn` for sm_90 as the JIT would specialize it (16-divisible pointers and ints, ints equal to 1 as
    constants), write its stages to OUTDIR, print its resources and loop statistics."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
            if types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    os.makedirs(OUTDIR, exist_ok=True)
    p = f"{OUTDIR}/{tag}"
    for ext in ("ttgir", "ptx"):
        with open(f"{p}.{ext}", "w") as f:
            f.write(k.asm[ext])
    with open(f"{p}.cubin", "wb") as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f"{p}.cubin"], capture_output=True, text=True).stdout
    with open(f"{p}.sass", "w") as f:
        f.write(sass)
    res = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f"{p}.cubin"], capture_output=True,
                         text=True).stdout
    print(tag, "shared", k.metadata.shared, re.findall(r"REG:\d+|STACK:\d+|LOCAL:\d+", res))
    print("  ", loop_stats(sass, consts["BLOCK_N"] * consts["BLOCK_K"] // (32 * warps)))


def main() -> None:
    BN, BK, W, S = (int(a) for a in sys.argv[1:5])
    BM, SX, PS = (int(a) for a in (sys.argv[5:8] if len(sys.argv) > 7 else (16, 0, 0)))
    common = dict(K_ACT=4, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, IEEE=False, DIRECT=True, X=32, ASM=True,
                  SPLIT_X=bool(SX), PREFETCH_S=bool(PS))
    tag = f"bn{BN}_bk{BK}_w{W}_s{S}_bm{BM}_sx{SX}_ps{PS}"
    gu_types = {"x_ptr": "*bf16", "row_slot_ptr": "*i32", "block_expert_ptr": "*i32", "w_ptr": "*u8",
                "s_ptr": "*u8", "b_ptr": "*bf16", "act_ptr": "*bf16", "limit": "fp32", "alpha": "fp32"}
    gu_ints = dict(D=D, I=I, stride_xn=D, stride_we=2 * I * D // 2, stride_wr=D // 2, stride_se=2 * I * D // 32,
                   stride_sr=1, stride_be=2 * I, stride_an=I)
    build(moe._gate_up_grouped_kernel, gu_types, gu_ints, dict(common), W, S, "gu_" + tag)
    dn_types = {"act_ptr": "*bf16", "row_slot_ptr": "*i32", "block_expert_ptr": "*i32", "w_ptr": "*u8",
                "s_ptr": "*u8", "b_ptr": "*bf16", "parts_ptr": "*fp32"}
    dn_ints = dict(D=D, I=I, stride_an=I, stride_we=D * I // 2, stride_wr=I // 2, stride_se=D * I // 32,
                   stride_sr=1, stride_be=D)
    build(moe._down_grouped_kernel, dn_types, dn_ints, {k: v for k, v in common.items() if k != "K_ACT"}, W, S,
          "dn_" + tag)


if __name__ == "__main__":
    main()
