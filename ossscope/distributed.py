"""Expert parallelism over torch.distributed: a gpt-oss model whose experts are split across ranks.

Launch with torchrun (one process per GPU; NCCL on GPUs, gloo on CPU). Every rank holds the attention, the
router, the embeddings and the unembedding (replicated), and only its own slice of the experts: rank r of W
holds experts [r * E / W, (r + 1) * E / W). Every rank runs the same forward on the same tokens, so the
residual stream, the router's choices and every hook see identical, full tensors on all ranks, exactly as on
one GPU; rank 0 can keep or write them.

The MoE's expert step (`MoE.experts_fn`, the signature of `ops.moe_experts`) is replaced by `ExpertParallel`:

    1. each rank takes its share of the N tokens (rows [r * ceil(N/W), (r + 1) * ceil(N/W)))
    2. all-to-all: every (token, chosen expert) pair goes to the rank that owns the expert
    3. each owner runs its local experts on what it received (ops.moe_experts, one expert per row)
    4. all-to-all back: each pair's expert output returns to the rank that sent it
    5. the pairs are weighted and summed per token, and all-gather makes the full [N, D] output (or the
       per-expert outputs [N, k, D] when `hook_expert_out` is in use) identical on every rank.

Pairs reach each expert in token order, so every expert multiplies the same rows as on one GPU and the
results match the single-process model bit for bit on CPU.

    torchrun --nproc-per-node 8 my_script.py      # NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

    from ossscope import distributed
    rank, world = distributed.init_distributed()
    model = distributed.load_expert_parallel("gpt-oss-120b")
    logits, cache = model.run_with_cache(input_ids)      # identical on every rank

Every rank must make the same calls in the same order (the MoE layers communicate). Hook functions run on
every rank and must give the same result on each (no per-rank randomness); sample with the same seed on all
ranks, or greedily, so generation stays in lockstep.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from . import ops
from .loading import (
    CheckpointError,
    _check_names,
    _format_problems,
    _index_tensors,
    _parse_dtype,
    checkpoint_slots,
    copy_checked,
    locate,
)
from .model import Model, MoE
from .weight_checks import BadWeightsError, WeightChecks

EXPERT_BUFFERS = ("mlp1_blocks", "mlp1_scales", "mlp1_bias", "mlp2_blocks", "mlp2_scales", "mlp2_bias")
# Buffers the model computes itself rather than loads; the loader fills these by hand after `to_empty`.
_DERIVED_BUFFERS = ("rope_inv_freq", "reroute_mask", "zero_mask")
# Keep NVLink multicast off on the lent multi-GPU machines (see the launch recipe in the module docstring).
GPU_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


# -- the process group --------------------------------------------------------------------------------------


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) -> (rank, world).

    backend: "nccl" when CUDA is available (each process takes GPU LOCAL_RANK), else "gloo". Without
    torchrun's variables, this is a single process: returns (0, 1) and starts no group.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        for key, value in GPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def default_device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK) under torchrun on a GPU machine, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """The experts [start, stop) that `rank` of `world_size` holds."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if num_experts % world_size:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {world_size} ranks; "
                         f"use a world size that divides {num_experts}")
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def token_range(num_tokens: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [start, stop) of N tokens that `rank` dispatches: ceil(N / W) each, the last ones short."""
    chunk = -(-num_tokens // world_size)
    start = min(num_tokens, rank * chunk)
    return start, min(num_tokens, start + chunk)


def _group_info(group) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs a process group: call "
                           "ossscope.distributed.init_distributed() in every process torchrun started")
    return dist.get_rank(group), dist.get_world_size(group)


# -- the expert step -----------------------------------------------------------------------------------------


class ExpertParallel:
    """A drop-in `MoE.experts_fn` for a model that holds only experts [start, stop) on this rank.

    Called with the replicated x [N, D] and routing [N, k] and this rank's packed weights [E_local, ...];
    returns the same as `ops.moe_experts` would with all the experts: y [N, D] (and expert_out [N, k, D]
    with per_expert), identical on every rank. `inner` computes the local experts (`ops.moe_experts` or a
    kernel twin of it that supports per_expert=True).
    """

    def __init__(self, start: int, stop: int, group=None, inner=ops.moe_experts) -> None:
        self.start, self.stop = start, stop
        self.group = group
        self.inner = inner

    def __repr__(self) -> str:
        return f"ExpertParallel(experts [{self.start}, {self.stop}))"

    def __call__(
        self, x: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor,
        mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor, mlp1_bias: torch.Tensor,
        mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor, mlp2_bias: torch.Tensor,
        limit: float = 7.0, alpha: float = 1.702, per_expert: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        rank, world = _group_info(self.group)
        N, D = x.shape
        k = topk_indices.shape[1]
        per_rank = self.stop - self.start
        if mlp1_blocks.shape[0] != per_rank:
            raise ValueError(f"this rank should hold {per_rank} experts, but its weights hold "
                             f"{mlp1_blocks.shape[0]}")

        # 1. this rank's share of the tokens; its (token, choice) pairs grouped by the rank owning the expert
        lo, hi = token_range(N, rank, world)
        pairs = topk_indices[lo:hi].reshape(-1)  # [n * k] global expert ids, token-major
        owner = torch.div(pairs, per_rank, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)  # stable: token order is kept within each owner
        send_counts = torch.bincount(owner, minlength=world)  # [W]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()

        # 2. send each pair's token and expert id to the owner
        send_x = x[lo:hi][torch.div(order, k, rounding_mode="floor")]  # [n * k, D]
        recv_x = x.new_empty(sum(recv_splits), D)
        dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=self.group)
        recv_experts = torch.empty(sum(recv_splits), dtype=pairs.dtype, device=x.device)
        send_experts = pairs[order].contiguous()
        dist.all_to_all_single(recv_experts, send_experts, recv_splits, send_splits, group=self.group)

        # 3. run the local experts, one (expert, weight 1) per received row. Rows arrive source rank by source
        # rank, each in token order, so every expert sees its tokens in the same order as on one GPU.
        local = (recv_experts - self.start).unsqueeze(1)  # [M, 1]
        ones = torch.ones(local.shape, dtype=topk_weights.dtype, device=x.device)
        packed = (mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias)
        _, out = self.inner(recv_x, local, ones, *packed, limit, alpha, per_expert=True)  # out [M, 1, D]

        # 4. send every output back to the rank that asked for it, and undo the grouping
        back = x.new_empty(len(order), D)
        dist.all_to_all_single(back, out[:, 0].contiguous(), send_splits, recv_splits, group=self.group)
        mine = torch.empty_like(back)
        mine[order] = back
        expert_out = mine.view(hi - lo, k, D)  # [n, k, D]

        # 5. the full result on every rank
        if per_expert:
            expert_out = _all_gather_rows(expert_out, N, self.group)  # [N, k, D]
            y = (expert_out * topk_weights.to(x.dtype).unsqueeze(-1)).sum(dim=1)
            return y, expert_out
        y_local = (expert_out * topk_weights[lo:hi].to(x.dtype).unsqueeze(-1)).sum(dim=1)  # [n, D]
        return _all_gather_rows(y_local, N, self.group)


def _all_gather_rows(local: torch.Tensor, total: int, group) -> torch.Tensor:
    """Concatenate every rank's rows (shares from `token_range`) into [total, ...] on all ranks."""
    _, world = _group_info(group)
    chunk = -(-total // world)
    padded = local.new_zeros(chunk, *local.shape[1:])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:total]


# -- building an expert-parallel model ---------------------------------------------------------------------


def _install(model: Model, start: int, stop: int, group) -> Model:
    for block in model.blocks:
        block.mlp.experts_fn = ExpertParallel(start, stop, group, inner=_inner_of(block.mlp))
    model.expert_range = (start, stop)  # the experts this rank holds; expert buffers are [stop - start, ...]
    return model


def _inner_of(moe: MoE):
    """The local expert computation: what the MoE had (a kernel path, say), unless it is already sharded."""
    fn = moe.experts_fn
    return fn.inner if isinstance(fn, ExpertParallel) else fn


def shard_experts(model: Model, group=None) -> Model:
    """Turn a model holding all the experts into this rank's expert-parallel model, in place.

    Keeps only this rank's experts (the others' memory is freed) and installs `ExpertParallel`. Every rank
    must hold the same weights (the same checkpoint, or `random_model` with the same seed).
    """
    if getattr(model, "expert_range", None) is not None:
        raise ValueError(f"this model is already expert-parallel (it holds experts {model.expert_range})")
    rank, world = _group_info(group)
    start, stop = expert_range(model.config.num_experts, rank, world)
    for block in model.blocks:
        for name in EXPERT_BUFFERS:
            setattr(block.mlp, name, getattr(block.mlp, name)[start:stop].clone())
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return _install(model, start, stop, group)


def load_expert_parallel(
    path_or_name: str | os.PathLike, device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None, group=None,
) -> Model:
    """Load a checkpoint (either layout, as `ossscope.load`) with only this rank's experts, ready to run.

    Expert tensors are read as slices of the memory-mapped files, so neither the host nor the GPU ever holds
    the other ranks' experts: gpt-oss-120b's ~61 GB of packed experts become ~61 / W GB per GPU.
    device: default this process's GPU (LOCAL_RANK), else cpu. dtype: default bf16 on GPU, fp32 on CPU.
    """
    rank, world = _group_info(group)
    found = locate(path_or_name)
    config = found.config
    start, stop = expert_range(config.num_experts, rank, world)
    device = torch.device(device) if device is not None else default_device()
    dtype = _parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = found.root.parent.name if found.root.name == "original" else found.root.name
    if str(path_or_name) == "nano":
        name = "nano"

    # Build on the meta device (no memory), shrink the expert buffers to this rank's slice, then allocate.
    model = Model(config, device="meta", dtype=dtype, name=name)
    for block in model.blocks:
        for buffer in EXPERT_BUFFERS:
            full = getattr(block.mlp, buffer)
            local = torch.empty((stop - start, *full.shape[1:]), dtype=full.dtype, device="meta")
            setattr(block.mlp, buffer, local)
    model.to_empty(device=device)
    _fill_derived_buffers(model)

    state = dict(model.state_dict())
    slots = checkpoint_slots(config, found.layout)
    unfilled = set(state) - {slot.target for slot in slots.values()}
    if unfilled:  # the model grew a tensor this loader does not know how to fill
        raise RuntimeError(f"the checkpoint layout has no slot for {sorted(unfilled)}; "
                           "update ossscope.distributed")
    where = _index_tensors(found.files)
    problems = _check_names(slots, where, found)
    if problems:
        raise CheckpointError(_format_problems(found, problems))
    checks = WeightChecks()
    open_files = {}
    try:
        for ckpt_name, slot in slots.items():
            file = where[ckpt_name]
            if file not in open_files:
                open_files[file] = safe_open(str(file), framework="pt", device="cpu")
            tensor, slot = _read(open_files[file], ckpt_name, slot, file, start, stop)
            copy_checked(state, ckpt_name, tensor, slot, file, device, checks)
        checks.raise_if_bad()
    except BadWeightsError as exc:
        raise CheckpointError(f"cannot load the checkpoint in {found.root}: {exc}") from None
    finally:
        open_files.clear()
    model.vocab_map, model.unknown_id = found.vocab_map, found.unknown_id
    return _install(model, start, stop, group)


def _fill_derived_buffers(model: Model) -> None:
    """Recompute the buffers that `to_empty` left uninitialized (they are not in any checkpoint)."""
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name in persistent:
            continue
        if name == "rope_inv_freq":
            buffer.copy_(ops.yarn_inv_freq(model.config)[0])
        elif name.rsplit(".", 1)[-1] in ("reroute_mask", "zero_mask"):
            buffer.zero_()
        else:
            raise RuntimeError(f"the model has a buffer {name!r} that ossscope.distributed does not know how "
                               f"to initialize (known: {_DERIVED_BUFFERS}); update load_expert_parallel")


def _read(handle, ckpt_name: str, slot, file: Path, start: int, stop: int):
    """One checkpoint tensor, of expert tensors only rows [start, stop). Returns (tensor, its slot)."""
    if slot.target.rsplit(".", 1)[-1] not in EXPERT_BUFFERS:
        try:
            return handle.get_tensor(ckpt_name), slot
        except Exception as exc:  # a truncated data section shows up here
            raise CheckpointError(f"{file.name}: cannot read tensor {ckpt_name}: {exc}") from None
    try:
        view = handle.get_slice(ckpt_name)
        shape = tuple(view.get_shape())
        if shape != slot.shape:  # check the whole tensor's shape, not just the slice we take
            raise CheckpointError(f"{file.name}: tensor {ckpt_name} has shape {shape}, expected {slot.shape} "
                                  "from config.json (the config contradicts the tensors, or the file is from "
                                  "another model)")
        tensor = view[start:stop]
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{file.name}: cannot read tensor {ckpt_name}: {exc}") from None
    return tensor, dataclasses.replace(slot, shape=(stop - start, *slot.shape[1:]))
