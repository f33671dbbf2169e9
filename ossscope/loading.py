"""Loading gpt-oss checkpoints (original or Hugging Face layout), random models, and writing checkpoints.

Loading is strict: the config's values must be in range, every tensor the config implies must be present with
the right shape and dtype, and nothing else may be; float weights must be finite and no MXFP4 scale may be NaN
(byte 255); a compact vocabulary's vocab_map.json must map every model id to a distinct o200k_harmony id. A
damaged file or tensor is named in the error. Tensors are memory-mapped from safetensors and moved to the
device one at a time, so host memory never holds the whole model, and MXFP4 expert weights stay packed all
the way.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import GptOssConfig, resolve_config
from .engine import ENGINES, kernels_available, set_engine
from .model import Model
from .mxfp4 import random_packed
from .tokenizer import O200K_VOCAB_SIZE
from .weight_checks import BadWeightsError, WeightChecks

ORIGINAL, HF = "original", "hf"
NANO_DIR = Path(__file__).parent / "nano" / "weights"
HF_REPOS = {"gpt-oss-20b": "openai/gpt-oss-20b", "gpt-oss-120b": "openai/gpt-oss-120b"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file or tensor at fault."""


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes in the model: the model's state name, its shape, and its kind."""

    target: str  # model state-dict name
    shape: tuple[int, ...]
    kind: str  # "float" or "uint8"
    part: tuple[int, int] | None = None  # rows [start, stop) of the target it fills (HF splits qkv in three)


# -- the two layouts -----------------------------------------------------------------------------------------


def _model_tensors(c: GptOssConfig, layer: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The model's state for one layer: short name -> (shape, kind)."""
    E, D, I = c.num_experts, c.hidden_size, c.intermediate_size
    G_D, G_I = D // 32, I // 32  # MXFP4 blocks along each input dimension
    return {
        "attn.norm.scale": ((D,), "float"),
        "attn.qkv.weight": ((c.q_width + 2 * c.kv_width, D), "float"),
        "attn.qkv.bias": ((c.q_width + 2 * c.kv_width,), "float"),
        "attn.sinks": ((c.num_attention_heads,), "float"),
        "attn.out.weight": ((D, c.q_width), "float"),
        "attn.out.bias": ((D,), "float"),
        "mlp.norm.scale": ((D,), "float"),
        "mlp.gate.weight": ((E, D), "float"),
        "mlp.gate.bias": ((E,), "float"),
        "mlp.mlp1_blocks": ((E, 2 * I, G_D, 16), "uint8"),
        "mlp.mlp1_scales": ((E, 2 * I, G_D), "uint8"),
        "mlp.mlp1_bias": ((E, 2 * I), "float"),
        "mlp.mlp2_blocks": ((E, D, G_I, 16), "uint8"),
        "mlp.mlp2_scales": ((E, D, G_I), "uint8"),
        "mlp.mlp2_bias": ((E, D), "float"),
    }


_ORIGINAL_NAMES = {  # model short name -> original checkpoint short name (identical unless listed)
    "mlp.mlp1_blocks": "mlp.mlp1_weight.blocks",
    "mlp.mlp1_scales": "mlp.mlp1_weight.scales",
    "mlp.mlp2_blocks": "mlp.mlp2_weight.blocks",
    "mlp.mlp2_scales": "mlp.mlp2_weight.scales",
}
_HF_NAMES = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}


def checkpoint_slots(config: GptOssConfig, layout: str) -> dict[str, Slot]:
    """Every tensor a checkpoint of this config and layout must hold: checkpoint name -> Slot."""
    c = config
    V, D = c.vocab_size, c.hidden_size
    slots: dict[str, Slot] = {}
    if layout == ORIGINAL:
        slots["embedding.weight"] = Slot("embed.weight", (V, D), "float")
        slots["norm.scale"] = Slot("ln_final.scale", (D,), "float")
        slots["unembedding.weight"] = Slot("unembed.weight", (V, D), "float")
    else:
        slots["model.embed_tokens.weight"] = Slot("embed.weight", (V, D), "float")
        slots["model.norm.weight"] = Slot("ln_final.scale", (D,), "float")
        slots["lm_head.weight"] = Slot("unembed.weight", (V, D), "float")
    for layer in range(c.num_hidden_layers):
        for short, (shape, kind) in _model_tensors(c, layer).items():
            target = f"blocks.{layer}.{short}"
            if layout == ORIGINAL:
                slots[f"block.{layer}.{_ORIGINAL_NAMES.get(short, short)}"] = Slot(target, shape, kind)
            elif short.startswith("attn.qkv."):  # HF keeps q, k and v projections apart
                kind_of = short.rsplit(".", 1)[1]  # weight | bias
                rows = {"q": (0, c.q_width), "k": (c.q_width, c.q_width + c.kv_width),
                        "v": (c.q_width + c.kv_width, c.q_width + 2 * c.kv_width)}
                for proj, (start, stop) in rows.items():
                    part_shape = (stop - start, *shape[1:])
                    slots[f"model.layers.{layer}.self_attn.{proj}_proj.{kind_of}"] = Slot(
                        target, part_shape, kind, (start, stop))
            else:
                slots[f"model.layers.{layer}.{_HF_NAMES[short]}"] = Slot(target, shape, kind)
    return slots


# -- finding the files ------------------------------------------------------------------------------------


@dataclass
class CheckpointFiles:
    root: Path
    layout: str
    config: GptOssConfig
    files: list[Path]  # safetensors files
    vocab_map: list[int] | None
    unknown_id: int | None = None


def locate(path_or_name: str | os.PathLike) -> CheckpointFiles:
    """Find the checkpoint at a path (folder, config.json or .safetensors file) or a known name."""
    path = Path(path_or_name).expanduser()
    name = str(path_or_name)
    if not path.exists():
        if name == "nano":
            path = NANO_DIR
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"the built-in nano model is missing from this install ({path})")
        elif name in HF_REPOS:
            path = _find_in_hf_cache(HF_REPOS[name]) or _missing_preset(name)
        else:
            raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if path.is_file():
        path = path.parent
    candidates = [path, path / "original"]
    hf_config = path / "config.json"
    if hf_config.is_file() and not list(path.glob("*.safetensors")) and (path / "original" / "config.json").is_file():
        candidates = [path / "original"]  # an HF repo root downloaded without its HF-layout weights
    for root in candidates:
        config_path = root / "config.json"
        if not config_path.is_file():
            continue
        data = _read_json(config_path)
        if not isinstance(data, dict):
            raise CheckpointError(f"{config_path} must hold a JSON object")
        layout = HF if (data.get("model_type") == "gpt_oss" or "num_local_experts" in data) else ORIGINAL
        try:
            config = GptOssConfig.from_json(data, source=str(config_path))
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        files = _safetensors_files(root)
        return CheckpointFiles(root, layout, config, files, *_read_vocab_map(root, config))
    raise CheckpointError(f"no config.json in {path}" + (" or its original/ folder" if path.is_dir() else ""))


def _find_in_hf_cache(repo: str) -> Path | None:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def _missing_preset(name: str):
    raise FileNotFoundError(
        f"{name} is not downloaded (looked in the Hugging Face cache). Download it with "
        f"`hf download {HF_REPOS[name]}` and pass its folder, or use ossscope.random_model({name!r}) for a "
        "model of that shape with random weights"
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. "[[[[...": a hostile file, not a config
        raise CheckpointError(f"{path} is nested too deeply to be a config") from None


def _safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        if not isinstance(data, dict):
            raise CheckpointError(f"{index} must hold a JSON object, got {type(data).__name__}")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        files = sorted({_shard_path(root, index, name, shard) for name, shard in weight_map.items()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors file in {root} (ossscope loads safetensors only, never pickle)")
    return files


def _shard_path(root: Path, index: Path, tensor: str, shard: object) -> Path:
    """The shard file an index names for `tensor`: a relative path that stays in the checkpoint folder (an
    index is data from the internet: "../x" or "/etc/x" must not make us open files elsewhere)."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: weight_map[{tensor!r}] must be a shard file name, got {shard!r}")
    path = Path(shard)
    # Checked on the text, not resolved: in the Hugging Face cache every shard is a symlink into ../../blobs.
    if path.is_absolute() or ".." in path.parts:
        raise CheckpointError(
            f"{index}: weight_map[{tensor!r}] = {shard!r} leaves the checkpoint folder: shards must be files "
            "in the folder of the index")
    return root / path


def _read_vocab_map(root: Path, config: GptOssConfig) -> tuple[list[int] | None, int | None]:
    """A compact vocabulary's map (model id -> o200k id) and its unknown id, if the checkpoint has one.

    Checked here, before any weight is read: a bad id would otherwise surface only at the first chat (or, out
    of range, as an index error deep in decoding), without the file's name."""
    path = root / "vocab_map.json"
    if not path.is_file():
        return None, None
    data = _read_json(path)
    ids = data.get("o200k_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list):
        raise CheckpointError(f"{path} must hold {{\"o200k_ids\": [int, ...], \"unknown_id\": int}}")
    if len(ids) != config.vocab_size:
        raise CheckpointError(f"{path} maps {len(ids)} ids but config.json says vocab_size={config.vocab_size}")
    first_at: dict[int, int] = {}  # o200k id -> the model id that first maps to it
    for model_id, o200k_id in enumerate(ids):
        where = f"{path}: o200k_ids[{model_id}] = {_short(o200k_id)}"
        if not _is_int(o200k_id):
            raise CheckpointError(f"{where} is not an integer")
        if not 0 <= o200k_id < O200K_VOCAB_SIZE:
            raise CheckpointError(f"{where} is outside the o200k_harmony vocabulary (0..{O200K_VOCAB_SIZE - 1})")
        if o200k_id in first_at:  # two model ids for one token: decoding could not tell which one was meant
            raise CheckpointError(f"{where} repeats o200k_ids[{first_at[o200k_id]}]")
        first_at[o200k_id] = model_id
    unknown = data.get("unknown_id")
    if unknown is None and len(ids) < O200K_VOCAB_SIZE:  # else the first out-of-vocabulary token fails, unnamed
        raise CheckpointError(f"{path} has no unknown_id: a compact vocabulary needs the model id that stands for "
                              "the o200k tokens it lacks")
    if unknown is not None and not (_is_int(unknown) and 0 <= unknown < len(ids)):
        raise CheckpointError(f"{path}: unknown_id {_short(unknown)} is not a model id in 0..{len(ids) - 1}")
    return ids, unknown


def _is_int(value: object) -> bool:
    # JSON true/false load as bool, a subclass of int: an id of `true` is a damaged file, not token 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    """repr of a value from a file, cut short: a hostile entry may be a megabyte of text or nesting."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


# -- loading --------------------------------------------------------------------------------------------------


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False)


def load(
    path_or_name: str | os.PathLike = "nano", device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None, progress: bool = True, engine: str = "auto",
) -> Model:
    """Load a gpt-oss checkpoint.

    path_or_name: a folder in either layout (original: config.json with num_experts and block.N.* tensors;
    Hugging Face: config.json with model_type gpt_oss, model.layers.N.* tensors, possibly sharded), a repo
    root holding original/, "nano" (the built-in model), or "gpt-oss-20b" / "gpt-oss-120b" (found in the
    Hugging Face cache). device: default cuda if available, else cpu. dtype: default bf16 on GPU, fp32 on CPU.
    engine: what runs generation and chat (`ossscope.engine`): "auto" (the Triton kernels with CUDA graphs on a
    CUDA device with Triton installed, else the torch reference), "kernels" or "torch"; `model.engine` holds it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_engine_choice(engine, device)
    found = locate(path_or_name)
    dtype = _parse_dtype(dtype)
    name = "nano" if str(path_or_name) == "nano" else Path(found.root).name
    if name == "original":
        name = found.root.parent.name
    slots = checkpoint_slots(found.config, found.layout)
    where = _index_tensors(found.files)
    problems = _check_names(slots, where, found)
    if problems:  # found from the config and the headers alone: report before allocating the model
        raise CheckpointError(_format_problems(found, problems))
    _check_fits(found, slots, device, dtype)
    model = Model(found.config, device=device, dtype=dtype, name=name)
    state = dict(model.state_dict())
    checks = WeightChecks()
    open_files = {}
    try:
        for ckpt_name, slot in _progress(slots.items(), len(slots), f"loading {name}", progress):
            file = where[ckpt_name]
            if file not in open_files:
                open_files[file] = safe_open(str(file), framework="pt", device="cpu")
            try:
                tensor = open_files[file].get_tensor(ckpt_name)
            except Exception as exc:  # a truncated data section shows up here
                raise CheckpointError(f"{file.name}: cannot read tensor {ckpt_name}: {exc}") from None
            copy_checked(state, ckpt_name, tensor, slot, file, device, checks)
        checks.raise_if_bad()
    except BadWeightsError as exc:
        raise CheckpointError(f"cannot load the checkpoint in {found.root}: {exc}") from None
    finally:
        open_files.clear()
    model.vocab_map, model.unknown_id = found.vocab_map, found.unknown_id
    set_engine(model, engine)
    return model


def check_engine_choice(engine: str, device: torch.device) -> None:
    """Refuse an unknown engine name, or "kernels" where they cannot run, before any weight is read."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    ok, why = kernels_available(device)
    if engine == "kernels" and not ok:
        raise ValueError(f"engine='kernels' is not available: {why}")


def model_bytes(slots: dict[str, Slot], dtype: torch.dtype) -> int:
    """Bytes the model's tensors take on the device: packed experts 1 byte an element, norms fp32, the rest dtype."""
    total = 0
    for slot in slots.values():
        if slot.kind == "uint8":
            size = 1
        elif slot.target.endswith(".scale"):  # RMSNorm scales stay fp32
            size = 4
        else:
            size = dtype.itemsize
        total += math.prod(slot.shape) * size
    return total


def _device_memory(device: torch.device) -> int | None:
    """Total memory of the device in bytes (physical RAM for the CPU), or None where it cannot be told."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError, AssertionError):  # no sysconf, no such GPU
        return None
    return None


def _check_fits(
    found: CheckpointFiles, slots: dict[str, Slot], device: torch.device, dtype: torch.dtype | None
) -> None:
    """Refuse a config whose model is larger than the device's whole memory: allocating it would fail, or, with
    memory overcommit, get the process killed while the weights are written."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    need, have = model_bytes(slots, dtype), _device_memory(device)
    if have is None or need <= have:
        return
    largest = max(slots.items(), key=lambda item: math.prod(item[1].shape))
    c = found.config
    raise CheckpointError(
        f"{found.root / 'config.json'} describes a model of {need / 2**30:,.1f} GiB in "
        f"{str(dtype).removeprefix('torch.')}, more than the {have / 2**30:,.1f} GiB of memory {device} has "
        f"(largest tensor {largest[0]} {largest[1].shape}; num_hidden_layers={c.num_hidden_layers}, "
        f"num_experts={c.num_experts}, vocab_size={c.vocab_size}, hidden_size={c.hidden_size}, "
        f"intermediate_size={c.intermediate_size})")


def copy_checked(state: dict[str, torch.Tensor], ckpt_name: str, tensor: torch.Tensor, slot: Slot, file: Path,
                 device: torch.device, checks: WeightChecks) -> None:
    """Check a checkpoint tensor against its slot, copy it into the model's tensor (or its part of it, for fused
    ones) on `device`, and queue the value checks of what landed there."""
    _check_tensor(ckpt_name, tensor, slot, file)
    target = state[slot.target]
    value = tensor.to(device=device, dtype=target.dtype)
    if slot.part is not None:
        target = target[slot.part[0] : slot.part[1]]
    target.copy_(value)
    checks.add(ckpt_name, file, target, value_kind(slot))


def value_kind(slot: Slot) -> str:
    """What WeightChecks verifies in a slot's values: "float", "scales" (MXFP4 E8M0) or "blocks" (E2M1)."""
    if slot.kind == "float":
        return "float"
    return "scales" if slot.target.endswith("_scales") else "blocks"


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "float64": torch.float64}
    key = str(dtype).removeprefix("torch.")
    if key not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[key]


def _index_tensors(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file holding it, reading only the headers."""
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = list(f.keys())
        except Exception as exc:  # safetensors' own errors: bad header, truncated file, not safetensors
            size = file.stat().st_size if file.exists() else 0
            raise CheckpointError(
                f"{file.name} is not a readable safetensors file ({size} bytes; truncated or damaged?): {exc}"
            ) from None
        for name in names:
            if name in where:
                raise CheckpointError(f"tensor {name} appears in both {where[name].name} and {file.name}")
            where[name] = file
    return where


def _check_names(slots: dict[str, Slot], where: dict[str, Path], found: CheckpointFiles) -> list[str]:
    missing = [n for n in slots if n not in where]
    unexpected = [n for n in where if n not in slots]
    problems = []
    if missing:
        problems.append(f"missing tensor{'s' if len(missing) > 1 else ''}: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor{'s' if len(unexpected) > 1 else ''}: {_some(unexpected)}")
        layer_hint = _layer_count_hint(unexpected, missing, found.config)
        if layer_hint:
            problems.append(layer_hint)
    return problems


def _layer_count_hint(unexpected: list[str], missing: list[str], config: GptOssConfig) -> str | None:
    import re

    layers = {int(m.group(1)) for n in unexpected for m in [re.search(r"(?:block|layers)\.(\d+)\.", n)] if m}
    if layers and max(layers) >= config.num_hidden_layers:
        return (f"config.json says num_hidden_layers={config.num_hidden_layers} but the checkpoint has tensors "
                f"for layer {max(layers)}: the config contradicts the tensors")
    return None


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _format_problems(found: CheckpointFiles, problems: list[str]) -> str:
    return f"cannot load the {found.layout}-layout checkpoint in {found.root}: " + "; ".join(problems)


def _check_tensor(name: str, tensor: torch.Tensor, slot: Slot, file: Path) -> None:
    if tuple(tensor.shape) != slot.shape:
        raise CheckpointError(
            f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, expected {slot.shape} from config.json "
            "(the config contradicts the tensors, or the file is from another model)"
        )
    if slot.kind == "uint8" and tensor.dtype != torch.uint8:
        raise CheckpointError(
            f"{file.name}: tensor {name} has dtype {tensor.dtype}, expected torch.uint8 (packed MXFP4)")
    if slot.kind == "float" and not tensor.dtype.is_floating_point:
        raise CheckpointError(f"{file.name}: tensor {name} has dtype {tensor.dtype}, expected a floating-point dtype")


# -- random weights and writing --------------------------------------------------------------------------------


def random_model(
    config_or_name: GptOssConfig | str = "tiny", seed: int = 0, device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None, name: str | None = None, engine: str = "auto",
) -> Model:
    """A model with random weights of any preset or config, experts in real packed MXFP4; `engine` as in `load`.

    Weights are drawn on the target device, so a gpt-oss-120b-shaped model never needs a host copy.
    Scales are chosen so activations stay well-conditioned through many layers (for benchmarks and tests).
    """
    config = resolve_config(config_or_name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_engine_choice(engine, device)
    default_name = config_or_name if isinstance(config_or_name, str) else "random"
    model = Model(config, device=device, dtype=_parse_dtype(dtype), name=name or default_name)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def normal(shape, std):
        return (torch.randn(shape, generator=generator) * std).to(device)

    D = config.hidden_size
    with torch.no_grad():
        for param_name, tensor in model.state_dict().items():
            if param_name.endswith("_blocks") or param_name.endswith("_scales"):
                continue
            if param_name.endswith("norm.scale") or param_name == "ln_final.scale":
                tensor.copy_(1.0 + normal(tensor.shape, 0.1))
            elif param_name.endswith("sinks"):
                tensor.copy_(normal(tensor.shape, 1.0))
            elif param_name.endswith("bias"):
                tensor.copy_(normal(tensor.shape, 0.02))
            elif tensor.dim() == 2:
                tensor.copy_(normal(tensor.shape, 1.0 / D**0.5))
        for block in model.blocks:
            moe = block.mlp
            E, I = config.num_experts, config.intermediate_size
            for prefix, rows, K in (("mlp1", 2 * I, D), ("mlp2", D, I)):
                blocks, scales = random_packed((E, rows), K, generator=generator, device=device, std=1.0 / K**0.5)
                getattr(moe, f"{prefix}_blocks").copy_(blocks)
                getattr(moe, f"{prefix}_scales").copy_(scales)
    set_engine(model, engine)
    return model


def write_checkpoint(
    model: Model, path: str | os.PathLike, layout: str = ORIGINAL, max_shard_bytes: int | None = None
) -> Path:
    """Write `model` as a checkpoint folder in either layout (MXFP4 experts stay packed).

    layout "original": config.json + model.safetensors with block.N.* names.
    layout "hf": config.json (model_type gpt_oss) + model.safetensors, or shards of at most
    `max_shard_bytes` with model.safetensors.index.json.
    A compact vocabulary (model.vocab_map) is written as vocab_map.json.
    """
    if layout not in (ORIGINAL, HF):
        raise ValueError(f"unknown layout {layout!r}; use {ORIGINAL!r} or {HF!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for ckpt_name, slot in checkpoint_slots(model.config, layout).items():
        value = state[slot.target]
        if slot.part is not None:
            value = value[slot.part[0] : slot.part[1]]
        if slot.kind == "float" and not ckpt_name.endswith(("norm.scale", "layernorm.weight", "norm.weight")):
            value = value.to(torch.bfloat16 if model.dtype == torch.bfloat16 else value.dtype)
        tensors[ckpt_name] = value.detach().to("cpu").contiguous()
    config_json = model.config.to_original_json() if layout == ORIGINAL else model.config.to_hf_json()
    (path / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    if model.vocab_map is not None:
        vocab = {"o200k_ids": list(model.vocab_map), "unknown_id": model.unknown_id}
        (path / "vocab_map.json").write_text(json.dumps(vocab))
    if layout == HF and max_shard_bytes:
        _write_shards(tensors, path, max_shard_bytes)
    else:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _write_shards(tensors: dict[str, torch.Tensor], path: Path, max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

