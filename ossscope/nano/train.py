"""Train gpt-oss-nano: the gpt-oss architecture, small, on the synthetic harmony corpus of `data.py`.

Two stages, because the GPU machine has no openai-harmony:
  python -m ossscope.nano.train prepare --out .carry/nano      # CPU: render and tokenize the corpus
  python -m ossscope.nano.train train --data .carry/nano --out DIR   # GPU (or CPU): train, evaluate, write
  python -m ossscope.nano.train --smoke                          # both, tiny, on CPU in seconds (CI)

The trainable model (`NanoTwin`) is the inference model's math with float expert weights: it calls the same
`ossscope.ops` functions (rms_norm, apply_rope, attention with sinks and sliding window, route, swiglu) and
its parameters carry `ossscope.Model`'s names. Experts are trained quantization-aware for the last part of
training (straight-through estimator through `mxfp4.quantize`/`dequantize`), then packed to MXFP4 and
written with `ossscope.loading.write_checkpoint` in the original layout, with `vocab_map.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import GptOssConfig
from ..mxfp4 import dequantize, quantize
from .eval import SPECIAL_TEXT

WEIGHTS_DIR = Path(__file__).parent / "weights"

# The shipped model. Everything but the sizes is gpt-oss's own (sinks, YaRN factor 32 over 4096, swiglu clamp 7,
# alternating sliding/full attention); the window is short so sliding layers matter at these lengths.
NANO_SHAPE = {
    "num_hidden_layers": 6, "num_experts": 16, "experts_per_token": 2, "hidden_size": 256,
    "intermediate_size": 256, "head_dim": 32, "num_attention_heads": 8, "num_key_value_heads": 2,
    "sliding_window": 64,
}  # fmt: skip
SMOKE_SHAPE = {
    "num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "hidden_size": 64, "intermediate_size": 64,
    "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 16,
}  # fmt: skip


def nano_config(vocab_size: int, smoke: bool = False) -> GptOssConfig:
    return GptOssConfig(vocab_size=vocab_size, **(SMOKE_SHAPE if smoke else NANO_SHAPE))


# -- the trainable twin ----------------------------------------------------------------------------------------


class _Norm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class TwinAttention(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.norm = _Norm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, config.q_width + 2 * config.kv_width)
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads))
        self.out = nn.Linear(config.q_width, config.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        qkv = self.qkv(ops.rms_norm(x, self.norm.scale, c.rms_norm_eps))  # [B, T, (H + 2 Hkv) Dh]
        q = qkv[..., : c.q_width].view(B, T, c.num_attention_heads, c.head_dim)
        k = qkv[..., c.q_width : c.q_width + c.kv_width].view(B, T, c.num_key_value_heads, c.head_dim)
        v = qkv[..., c.q_width + c.kv_width :].view(B, T, c.num_key_value_heads, c.head_dim)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        z, _, _ = ops.attention(q, k, v, self.sinks, positions, positions, self.window)  # [B, T, H, Dh]
        return self.out(z.reshape(B, T, c.q_width))


def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    """MXFP4 round trip with a straight-through gradient: forward sees the quantized weight, backward is identity."""
    with torch.no_grad():
        blocks, scales = quantize(weight)
        q = dequantize(blocks, scales, torch.float32).view_as(weight).to(weight.dtype)
    return weight + (q - weight).detach()


class TwinMoE(nn.Module):
    """Router + float experts, computing only the chosen experts, with the same top-k-then-softmax weights as
    `ops.route`, so the output is the inference math.

    Each token's k (token, expert) slots are grouped by expert into one zero-padded batch [E, C, D] (C = the
    busiest expert's slot count) and run as two batched matmuls: one launch per projection, no per-expert loop,
    and about E / k times fewer bytes through the SwiGLU than running every expert on every token (at nano's
    size those elementwise passes, not the matmuls, are what a training step spends its time on).
    """

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.config = config
        E, D, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.norm = _Norm(D)
        self.gate = nn.Linear(D, E)
        self.mlp1_weight = nn.Parameter(torch.randn(E, 2 * I, D) / math.sqrt(D))  # rows: gate/linear interleaved
        self.mlp1_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.mlp2_weight = nn.Parameter(torch.randn(E, D, I) / math.sqrt(I))
        self.mlp2_bias = nn.Parameter(torch.zeros(E, D))
        self.quantized = False  # fake-quantize the experts (quantization-aware training / evaluation)
        self.aux_loss = torch.zeros(())

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quantized:
            return fake_quantize(self.mlp1_weight), fake_quantize(self.mlp2_weight)
        return self.mlp1_weight, self.mlp2_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, T, D = x.shape
        E = c.num_experts
        h = ops.rms_norm(x, self.norm.scale, c.rms_norm_eps).reshape(B * T, D)  # [N, D]
        logits = self.gate(h)  # [N, E]
        indices, weights = ops.route(logits, c.experts_per_token)  # [N, k], [N, k]
        N, k = indices.shape

        # Group the N * k slots by expert: slot s (token s // k) goes to row rank[s] of its expert's batch.
        flat = indices.reshape(-1)  # [N * k]
        order = torch.argsort(flat, stable=True)  # slots sorted by expert
        counts = torch.bincount(flat, minlength=E)  # [E]
        sorted_experts = flat[order]
        rank = torch.arange(N * k, device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
        capacity = int(counts.max())  # one host sync per layer
        w1, w2 = self.expert_weights()
        grouped = h.new_zeros(E, capacity, D)
        grouped[sorted_experts, rank] = h[order // k]  # [E, C, D]; padding rows stay zero and are never read
        h1 = torch.baddbmm(self.mlp1_bias[:, None].to(h.dtype), grouped, w1.to(h.dtype).transpose(1, 2))  # [E, C, 2I]
        act = ops.swiglu(h1, c.swiglu_limit, c.swiglu_alpha)  # [E, C, I]
        out = torch.baddbmm(self.mlp2_bias[:, None].to(act.dtype), act, w2.to(act.dtype).transpose(1, 2))  # [E, C, D]
        expert_out = torch.empty(N * k, D, dtype=out.dtype, device=x.device)
        expert_out[order] = out[sorted_experts, rank]  # back to slot order: [N * k, D]
        y = (expert_out.view(N, k, D) * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)
        if self.training:  # Switch-style load balancing: fraction routed x mean router probability
            probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
            routed = counts.float() / (N * k)  # [E]
            self.aux_loss = E * (routed * probs.mean(0)).sum()
        return y.view(B, T, D).to(x.dtype)


class TwinBlock(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int) -> None:
        super().__init__()
        self.attn = TwinAttention(config, layer)
        self.mlp = TwinMoE(config)

    def forward(self, x, positions, cos, sin):
        x = x + self.attn(x, positions, cos, sin)
        return x + self.mlp(x)


class NanoTwin(nn.Module):
    """The gpt-oss forward with trainable float weights, named like `ossscope.Model`'s parameters."""

    def __init__(self, config: GptOssConfig, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(TwinBlock(config, layer) for layer in range(config.num_hidden_layers))
        self.ln_final = _Norm(config.hidden_size)
        self.unembed = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq, concentration = ops.yarn_inv_freq(config)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.rope_concentration = concentration
        self._init_weights()

    def _init_weights(self) -> None:
        depth_scale = 1 / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("qkv.weight", "gate.weight", "unembed.weight")):
                nn.init.normal_(p, std=0.02)
            elif name.endswith("out.weight"):
                nn.init.normal_(p, std=0.02 * depth_scale)
            elif name.endswith("embed.weight"):
                nn.init.normal_(p, std=1.0)
            elif name.endswith("mlp2_weight"):
                p.data.mul_(depth_scale)
            elif name.endswith(("qkv.bias", "out.bias", "gate.bias")):
                nn.init.zeros_(p)

    def set_quantized(self, on: bool) -> None:
        for block in self.blocks:
            block.mlp.quantized = on

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (positions 0..T-1)."""
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        freqs = positions.float()[:, None] * self.rope_inv_freq[None, :]  # as Model.forward builds its tables
        cos, sin = freqs.cos() * self.rope_concentration, freqs.sin() * self.rope_concentration
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, positions, cos, sin)
        return self.unembed(ops.rms_norm(x, self.ln_final.scale, self.config.rms_norm_eps))

    def aux_loss(self) -> torch.Tensor:
        return sum(block.mlp.aux_loss for block in self.blocks) / len(self.blocks)

    @torch.no_grad()
    def round_to_checkpoint(self) -> None:
        """Round what the checkpoint stores in bf16 (everything but norms and experts) and quantize the experts,
        so this twin computes exactly what the written checkpoint computes."""
        for name, p in self.named_parameters():
            if name.endswith(("norm.scale", "mlp1_weight", "mlp2_weight")):
                continue
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
        for block in self.blocks:
            for w in (block.mlp.mlp1_weight, block.mlp.mlp2_weight):
                blocks, scales = quantize(w)
                w.copy_(dequantize(blocks, scales, torch.float32).view_as(w))
        self.set_quantized(False)  # already on the grid


def to_model(twin: NanoTwin, vocab: dict[str, Any], dtype: torch.dtype = torch.bfloat16):
    """An `ossscope.Model` holding the twin's weights, experts packed to MXFP4."""
    from ..model import Model

    model = Model(twin.config, device="cpu", dtype=dtype, name="nano")
    state = model.state_dict()
    for name, value in twin.state_dict().items():
        value = value.detach().float().cpu()
        if name.endswith(("mlp1_weight", "mlp2_weight")):
            blocks, scales = quantize(value)
            prefix = name[: -len("_weight")]
            state[f"{prefix}_blocks"].copy_(blocks)
            state[f"{prefix}_scales"].copy_(scales)
        elif name in state:
            state[name].copy_(value.to(state[name].dtype))
        else:
            raise KeyError(f"twin parameter {name} has no place in ossscope.Model")
    model.vocab_map = list(vocab["o200k_ids"])
    model.unknown_id = vocab["unknown_id"]
    return model


@torch.no_grad()
def warm_start(twin: NanoTwin, init: Path | str, vocab: dict[str, Any]) -> int:
    """Start the twin from a written nano checkpoint (`init`: a folder, or "nano" for the shipped one) instead of
    from noise, so a corpus with new episodes teaches them without relearning the rest. Its vocabulary may grow:
    embedding and unembedding rows move by o200k id, and ids the checkpoint never saw keep their fresh
    initialisation. Experts are dequantized from MXFP4 (already on the grid). Returns how many rows were new."""
    from ..loading import load

    old = load(init, device="cpu", dtype=torch.float32, progress=False)
    if old.vocab_map is None:
        raise ValueError(f"{init} has no vocab_map.json: a nano checkpoint is needed to warm-start from")
    shape = {k: getattr(twin.config, k) for k in NANO_SHAPE}
    if {k: getattr(old.config, k) for k in NANO_SHAPE} != shape:
        raise ValueError(f"{init} does not have the twin's shape {shape}")
    old_state, state = old.state_dict(), twin.state_dict()
    for name, value in state.items():
        if name.endswith(("mlp1_weight", "mlp2_weight")):
            prefix = name[: -len("_weight")]
            value.copy_(dequantize(old_state[f"{prefix}_blocks"], old_state[f"{prefix}_scales"],
                                   torch.float32).view_as(value))
        elif name not in ("embed.weight", "unembed.weight"):
            value.copy_(old_state[name])
    old_row = {o200k: i for i, o200k in enumerate(old.vocab_map)}
    if len(old_row) != len(old.vocab_map):
        raise ValueError(f"{init}: vocab_map.json repeats an o200k id")
    pairs = [(j, old_row[o200k]) for j, o200k in enumerate(vocab["o200k_ids"]) if o200k in old_row]
    new_ids, old_ids = (torch.tensor(ids) for ids in zip(*pairs, strict=True))
    for name in ("embed.weight", "unembed.weight"):
        state[name][new_ids.to(state[name].device)] = old_state[name][old_ids].to(state[name].device)
    return len(vocab["o200k_ids"]) - len(pairs)


# -- data --------------------------------------------------------------------------------------------------------


def prepare(out: Path, episodes: int, seed: int, eval_sizes: tuple[int, int, int] = (100, 40, 30),
            agentic: bool = True) -> dict:
    """Render the corpus and the held-out sets; save model-id tensors and the vocabulary under `out`.
    agentic=False leaves out the browser/python episodes (the corpus of the first of the two training stages)."""
    from ..tokenizer import harmony_encoding
    from . import data

    enc = harmony_encoding()
    t0 = time.time()
    train = [data.render_episode(enc, e) for e in data.corpus(episodes, seed, agentic=agentic)]
    n_arith, n_tool, n_sort = eval_sizes
    held = data.eval_arithmetic(n_arith) + data.eval_tools(n_tool) + data.eval_sort(n_sort)
    items = []
    for ep in held:
        item = {"kind": ep.kind, "effort": ep.effort, "answer": ep.answer,
                "prompt": data.render_prompt(enc, ep, 0), "user": ep.user, "tools": ep.tools}
        if ep.kind == "tool":
            item["prompt2"] = data.render_prompt(enc, ep, 1)
        items.append(item)
    vocab = data.build_vocab([t for t, _ in train] + [it["prompt"] for it in items]
                             + [it["prompt2"] for it in items if "prompt2" in it])
    to_model = {o: m for m, o in enumerate(vocab["o200k_ids"])}
    unknown = vocab["unknown_id"]

    def ids(tokens: list[int]) -> list[int]:
        return [to_model.get(t, unknown) for t in tokens]

    lengths = torch.tensor([len(t) for t, _ in train])
    flat = torch.tensor([i for t, _ in train for i in ids(t)], dtype=torch.int32)
    mask = torch.tensor([m for _, ms in train for m in ms], dtype=torch.bool)
    for item in items:
        item["prompt"] = ids(item["prompt"])
        if "prompt2" in item:
            item["prompt2"] = ids(item["prompt2"])
    raw = o200k_token_bytes()
    token_bytes = [raw.get(o, SPECIAL_TEXT.get(o, "").encode()).hex() for o in vocab["o200k_ids"]]
    out.mkdir(parents=True, exist_ok=True)
    save_corpus(out / "corpus.npz", flat, mask, lengths)
    (out / "vocab_map.json").write_text(json.dumps(vocab))
    (out / "eval.json").write_text(json.dumps({"items": items, "token_bytes": token_bytes}))
    info = {"episodes": episodes, "seed": seed, "tokens": int(lengths.sum()), "loss_tokens": int(mask.sum()),
            "max_len": int(lengths.max()), "vocab_size": len(vocab["o200k_ids"]), "eval_items": len(items),
            "seconds": round(time.time() - t0, 1)}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return info


def save_corpus(path: Path, tokens: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> None:
    """Write the tokenized corpus compressed (uint16 ids, bit-packed mask): 500k episodes take about 28 MB
    instead of about 480 MB, so the corpus travels to the GPU machine within its transfer limit."""
    import numpy as np

    if int(tokens.max()) >= 2**16:
        raise ValueError("the compact vocabulary must stay below 65,536 ids to be stored as uint16")
    np.savez_compressed(path, tokens=tokens.numpy().astype(np.uint16), mask=np.packbits(mask.numpy()),
                        lengths=lengths.numpy().astype(np.int64))


def load_corpus(path: Path) -> dict[str, torch.Tensor]:
    """The corpus `save_corpus` wrote: tokens int32 [N], mask bool [N], lengths int64 [episodes]."""
    import numpy as np

    with np.load(path) as data:
        tokens = torch.from_numpy(data["tokens"].astype(np.int32))
        mask = torch.from_numpy(np.unpackbits(data["mask"])[: len(tokens)].astype(bool))
        lengths = torch.from_numpy(data["lengths"])
    return {"tokens": tokens, "mask": mask, "lengths": lengths}


def o200k_token_bytes() -> dict[int, bytes]:
    """The bytes of every ordinary o200k token (the offline vocabulary file; special ids are not in it)."""
    import base64

    from ..tokenizer import O200K_BASE_FILE, ensure_tiktoken_base

    folder = ensure_tiktoken_base()
    if folder is None:
        raise RuntimeError("the o200k vocabulary file is not available offline")
    table = {}
    for line in (folder / O200K_BASE_FILE).read_text().splitlines():
        token, rank = line.split()
        table[int(rank)] = base64.b64decode(token)
    return table


class Batches:
    """Length-bucketed batches of padded episodes (fewer pad tokens than random batches), reshuffled per epoch.

    A batch holds about `batch_tokens` padded tokens: many short episodes or a few long ones. At nano's size a
    training step costs about the same for any batch up to ~32k tokens (the GPU waits on Python launching
    kernels), so filling each step with tokens is what makes training fast.
    """

    def __init__(self, corpus: dict[str, torch.Tensor], batch_tokens: int, pad_id: int, device, seed: int) -> None:
        lengths = corpus["lengths"]
        starts = torch.cumsum(lengths, 0) - lengths
        self.max_len = int(lengths.max())
        n = len(lengths)
        # Pad every episode to max_len once, on the device; a batch is then one index_select and a slice.
        idx = starts[:, None] + torch.arange(self.max_len)[None, :]  # [n, max_len]
        valid = torch.arange(self.max_len)[None, :] < lengths[:, None]
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        self.tokens = torch.where(valid, corpus["tokens"].long()[idx], pad_id).to(device)
        self.mask = (corpus["mask"][idx] & valid).to(device)
        self.lengths = lengths
        order = torch.argsort(lengths, stable=True).tolist()
        self.groups: list[torch.Tensor] = []
        start = 0
        while start < n:  # sorted ascending, so the last episode of a group is its longest
            stop = start + 1
            while stop < n and (stop + 1 - start) * int(lengths[order[stop]]) <= batch_tokens:
                stop += 1
            self.groups.append(torch.tensor(order[start:stop]))
            start = stop
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device

    def __iter__(self):
        while True:
            for g in torch.randperm(len(self.groups), generator=self.generator).tolist():
                rows = self.groups[g]
                width = int(self.lengths[rows].max())
                rows = rows.to(self.device)
                yield self.tokens[rows, :width], self.mask[rows, :width]


AUX_LOSS_WEIGHT = 0.01  # the load-balancing term's weight against the language-model loss


def assistant_loss(twin: NanoTwin, inputs: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the assistant's tokens only: inputs [B, T-1] (tokens[:, :-1], possibly with
    noise), tokens [B, T], mask [B, T] (True where the token is a target)."""
    logits = twin(inputs)  # [B, T-1, V]
    target_mask = mask[:, 1:]
    return F.cross_entropy(logits.float()[target_mask], tokens[:, 1:][target_mask])


# -- training ------------------------------------------------------------------------------------------------------


def train(
    data_dir: Path, out: Path, smoke: bool = False, seed: int = 0, steps: int | None = None,
    minutes: float = 6.0, batch_tokens: int = 32_768, lr: float = 3e-3, qat_fraction: float = 0.3,
    device: str | None = None, init: Path | str | None = None, warmup: int | None = None,
) -> dict[str, Any]:
    """Train, evaluate greedy accuracy before and after MXFP4, write the checkpoint to `out/weights`.
    init: a nano checkpoint to start from (`warm_start`; usually with a lower lr), else random weights."""
    from . import eval as nano_eval

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    random.seed(seed)
    vocab = json.loads((data_dir / "vocab_map.json").read_text())
    corpus = load_corpus(data_dir / "corpus.npz")
    evalset = json.loads((data_dir / "eval.json").read_text())
    config = nano_config(len(vocab["o200k_ids"]), smoke)
    twin = NanoTwin(config, seed)
    if init is not None:
        fresh = warm_start(twin, init, vocab)
        print(f"warm start from {init}: {fresh} of {config.vocab_size} vocabulary rows are new", flush=True)
    twin = twin.to(device)
    unknown = vocab["unknown_id"]
    batches = Batches(corpus, batch_tokens, unknown, device, seed)
    decay = [p for n, p in twin.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in twin.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    print(f"nano: {sum(p.numel() for p in twin.parameters()) / 1e6:.1f}M parameters, config {config}", flush=True)

    total = steps or 10**9  # fixed after timing the first steps, unless given
    warmup = warmup if warmup is not None else 20 if smoke else 200
    history: list[dict[str, float]] = []
    t0 = time.time()
    step, qat_on = 0, False
    it = iter(batches)
    loss_sum, loss_count = torch.zeros((), device=device), 0
    while step < total:
        if steps is None and step == 10:  # the first steps pay for warm-up; time the next ones
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_calibrate = time.time()
        if steps is None and step == 60:  # calibrate the step count to the time budget
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_calibrate) / 50
            total = max(100, int((minutes * 60 - (time.time() - t0)) / per_step) + step)
            print(f"calibrated: {per_step * 1e3:.0f} ms/step -> {total} steps", flush=True)
        progress = step / max(total, 1)
        if not qat_on and total < 10**9 and progress >= 1 - qat_fraction:
            twin.set_quantized(True)
            qat_on = True
            print(f"step {step}: quantization-aware training on", flush=True)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        tokens, mask = next(it)
        inputs = tokens[:, :-1]
        if not smoke:  # robustness: an unknown token now and then in the prompt (never in the targets)
            noise = (torch.rand(inputs.shape, device=device) < 0.01) & ~mask[:, :-1] & (inputs < unknown - 20)
            inputs = torch.where(noise, torch.full_like(inputs, unknown), inputs)
        with autocast:
            loss = assistant_loss(twin, inputs, tokens, mask)
        total_loss = loss + AUX_LOSS_WEIGHT * twin.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        optimizer.step()
        step += 1
        # Batches differ in length (and so in task mix), so one batch's loss is noisy: log the interval's mean,
        # summed on the device so the loop never waits for the GPU between logs.
        loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
        if step % (10 if smoke else 50) == 0 or step == total:
            history.append({"step": step, "loss": (loss_sum / loss_count).item(), "aux": twin.aux_loss().item(),
                            "lr": lr * scale, "seconds": round(time.time() - t0, 1)})
            loss_sum, loss_count = torch.zeros((), device=device), 0
            print(f"step {step}/{total} loss {history[-1]['loss']:.4f} aux {history[-1]['aux']:.3f} "
                  f"{history[-1]['seconds']:.0f}s", flush=True)
    train_seconds = time.time() - t0

    twin.eval()
    token_bytes = [bytes.fromhex(h) for h in evalset["token_bytes"]]
    o200k_ids = vocab["o200k_ids"]

    def to_o200k(ids: list[int]) -> list[int]:
        return [o200k_ids[i] if 0 <= i < len(o200k_ids) else o200k_ids[unknown] for i in ids]

    o200k_to_model = {o: m for m, o in enumerate(o200k_ids)}
    stop_ids = [o200k_to_model[s] for s in nano_eval.STOP_O200K]

    def run_eval(label: str) -> dict[str, Any]:
        t = time.time()
        with torch.no_grad():
            summary, results = nano_eval.evaluate_tokens(
                twin, evalset["items"], to_o200k, lambda o: token_bytes[o200k_to_model[o]], stop_ids,
                device=device, max_new_tokens=48 if smoke else 240, batch_size=384 if device.type == "cuda" else 64)
        print(f"eval {label} ({time.time() - t:.0f}s):", flush=True)
        print(nano_eval.format_summary(summary), flush=True)
        return {"summary": summary, "samples": [r["text"] for r in results[:: max(1, len(results) // 12)]]}

    # Evaluation on the GPU uses TF32 matmuls (3x faster than full fp32, greedy choices are robust to it); the
    # numbers the README quotes come from `python -m ossscope.nano.eval` on the loaded checkpoint, in fp32.
    torch.backends.cuda.matmul.allow_tf32 = True
    metrics: dict[str, Any] = {"config": config.to_original_json(), "steps": step, "train_seconds": train_seconds,
                               "batch_tokens": batch_tokens, "lr": lr, "seed": seed,
                               "init": None if init is None else str(init), "history": history}
    plot_loss(history, out / "loss.png")
    twin.set_quantized(False)
    float_state = {k: v.clone() for k, v in twin.state_dict().items()}

    # Write the checkpoint first, so an evaluation problem cannot cost the trained weights.
    twin.round_to_checkpoint()
    weights = out / "weights"
    from ..loading import load, write_checkpoint

    write_checkpoint(to_model(twin, vocab), weights)
    # The checkpoint, loaded back through the public loader in fp32, must compute what the twin computes.
    loaded = load(weights, device="cpu", dtype=torch.float32, progress=False)
    probe = torch.tensor([evalset["items"][-1]["prompt"]])
    cpu_twin = NanoTwin(config, seed).float()  # a fresh copy: the trained one holds autograd state (aux_loss)
    cpu_twin.load_state_dict({k: v.float().cpu() for k, v in twin.state_dict().items()})
    cpu_twin.eval()
    with torch.no_grad():
        diff = (cpu_twin(probe) - loaded(probe)).abs().max()
    metrics["checkpoint_max_abs_diff"] = float(diff)
    print(f"checkpoint vs twin: max |logit diff| {float(diff):.2e}", flush=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    for label, key in (("MXFP4 experts, bf16 weights (the checkpoint)", "quantized"),
                       ("float experts (before quantization)", "float")):
        if key == "float":
            twin.load_state_dict(float_state)
        try:
            metrics[key] = run_eval(label)
        except Exception as exc:  # keep the run's other results; say what broke
            metrics[key] = {"error": repr(exc)}
            print(f"eval {key} failed: {exc!r}", flush=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def plot_loss(history: list[dict[str, float]], path: Path) -> None:
    """Save the loss curve as a PNG when matplotlib is there (the JSON in metrics.json always is)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean loss on assistant tokens")
    ax.set_title("gpt-oss-nano training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", choices=("prepare", "train"), help="omit with --smoke")
    parser.add_argument("--smoke", action="store_true", help="tiny corpus and model on CPU, in seconds")
    parser.add_argument("--data", type=Path, default=Path(".carry/nano"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--episodes", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-agentic", action="store_true",
                        help="prepare without the browser/python episodes (the first training stage's corpus)")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (default: fit --minutes)")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--batch-tokens", type=int, default=32_768, help="padded tokens per training batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--init", default=None, help='a nano checkpoint to start from ("nano": the shipped one)')
    parser.add_argument("--warmup", type=int, default=None, help="learning-rate warm-up steps (default 200)")
    args = parser.parse_args(argv)
    if args.smoke:
        import tempfile

        out = args.out or Path(tempfile.mkdtemp(prefix="nano-smoke-"))
        print(prepare(out / "data", 300, args.seed, eval_sizes=(2, 2, 1)))
        metrics = train(out / "data", out, smoke=True, seed=args.seed, steps=args.steps or 40, batch_tokens=2048,
                        device=args.device or "cpu")
        print(f"smoke run wrote {out} (checkpoint vs twin {metrics['checkpoint_max_abs_diff']:.1e})")
    elif args.stage == "prepare":
        print(prepare(args.out or args.data, args.episodes, args.seed, agentic=not args.no_agentic))
    elif args.stage == "train":
        train(args.data, args.out or Path("runs/nano"), seed=args.seed, steps=args.steps, minutes=args.minutes,
              batch_tokens=args.batch_tokens, lr=args.lr, device=args.device, init=args.init, warmup=args.warmup)
    else:
        parser.error("give a stage (prepare, train) or --smoke")


if __name__ == "__main__":
    sys.exit(main())
