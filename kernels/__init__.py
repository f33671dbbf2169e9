"""ossscope.kernels: Triton kernels for gpt-oss, each checked against a torch twin.

| kernel (public wrapper)          | torch twin                                   |
| -------------------------------- | -------------------------------------------- |
| `route`                          | `routing.route_reference` (ops.route + zero) |
| `moe_experts`                    | `ossscope.ops.moe_experts`                   |
| `moe_decode_parts` (+ `input_words`) | `ossscope.ops.moe_experts(per_expert=True)` |
| `moe_decode_routed`              | `route_reference`, then the row above        |
| `moe_decode_slices` (+ `input_slices`) | the two rows above (`moe_tc.slices_reference`) |
| `moe_decode_grouped` (batched decode) | `route_reference`, then `ops.moe_experts(per_expert=True)` |
| `dequantize`                     | `ossscope.mxfp4.dequantize`                  |
| `attention` / `_prefill` / `_decode` | `ossscope.ops.attention`                 |
| `attention_decode_step`          | `qkv_rope` then `attention_decode`           |
| `linear` (decode-sized batches)  | `torch.nn.functional.linear`                 |
| `rms_norm`, `add_rms_norm`       | `ossscope.ops.rms_norm`, `norm.add_rms_norm_reference` |
| `qkv_rope`                       | `ossscope.ops.apply_rope`                    |

The decoder launches them with `pdl=True` (programmatic dependent launch on Hopper: kernels/_common.py).
Importing this package imports Triton; `ossscope` itself never imports it, so CPU-only installs without
Triton keep working. The wrappers validate their inputs and raise ValueError naming the problem.
"""

from . import moe_batch, moe_tc
from .attention import attention, attention_decode, attention_decode_step, attention_prefill, decode_counters
from .linear import linear
from .moe import dequantize, group_by_expert, input_words, moe_decode_parts, moe_decode_routed, moe_experts
from .moe_batch import moe_decode_grouped
from .moe_tc import input_slices, moe_decode_slices
from .norm import add_rms_norm, rms_norm
from .rope import qkv_rope
from .routing import route

__all__ = ["attention", "attention_decode", "attention_decode_step", "attention_prefill", "decode_counters",
           "moe_experts", "moe_decode_parts", "moe_decode_routed", "moe_decode_grouped", "moe_batch",
           "input_words", "input_slices", "moe_decode_slices", "moe_tc",
           "dequantize", "group_by_expert", "linear",
           "route", "rms_norm", "add_rms_norm", "qkv_rope"]
