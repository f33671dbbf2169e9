"""GptOssConfig: the shape of a gpt-oss model, read from either checkpoint layout's config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GptOssConfig:
    """Hyper-parameters of a gpt-oss model. Defaults are gpt-oss-20b's."""

    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0  # YaRN beta_slow
    rope_ntk_beta: float = 32.0  # YaRN beta_fast
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    max_context: int = 131072

    def __post_init__(self) -> None:
        problems = _range_problems(self)
        if problems:  # the relations below would divide by zero or compare garbage on out-of-range values
            raise ValueError("invalid gpt-oss config: " + "; ".join(problems))
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                problems.append(f"{name} ({getattr(self, name)}) must be a multiple of 32 for MXFP4 blocks")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not 1 <= self.experts_per_token <= self.num_experts:
            problems.append(
                f"experts_per_token ({self.experts_per_token}) must be in 1..num_experts ({self.num_experts})"
            )
        if problems:
            raise ValueError("invalid gpt-oss config: " + "; ".join(problems))

    # Layer kinds: even layers attend within a sliding window, odd layers see the whole context.
    def is_sliding(self, layer: int) -> bool:
        return layer % 2 == 0

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def replace(self, **changes: Any) -> GptOssConfig:
        return dataclasses.replace(self, **changes)

    # -- the two config.json dialects --------------------------------------------------------------------
    def to_original_json(self) -> dict[str, Any]:
        """config.json of the original layout (openai/gpt-oss `original/`)."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha,
            "rope_ntk_beta": self.rope_ntk_beta,
        }

    def to_hf_json(self) -> dict[str, Any]:
        """config.json of the Hugging Face layout (model_type gpt_oss, MXFP4 quantization config)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "layer_types": [
                "sliding_attention" if self.is_sliding(i) else "full_attention" for i in range(self.num_hidden_layers)
            ],
            "max_position_embeddings": self.max_context,
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit,
            "attention_bias": True,
            "tie_word_embeddings": False,
            "rope_theta": self.rope_theta,
            "rope_scaling": self._hf_rope(),
            "rope_parameters": {"rope_theta": self.rope_theta, **self._hf_rope()},
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            },
        }

    def _hf_rope(self) -> dict[str, Any]:
        return {
            "rope_type": "yarn",
            "factor": self.rope_scaling_factor,
            "beta_fast": self.rope_ntk_beta,
            "beta_slow": self.rope_ntk_alpha,
            "truncate": False,
            "original_max_position_embeddings": self.initial_context_length,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "config.json") -> GptOssConfig:
        """Read either dialect. Unknown keys are ignored; a contradiction or a bad value raises ValueError."""
        if data.get("model_type") == "gpt_oss" or "num_local_experts" in data:
            return cls._from_hf(data, source)
        if "num_experts" in data:
            return cls._from_original(data, source)
        raise ValueError(
            f"{source} is not a gpt-oss config: expected 'num_experts' (original layout) or "
            f"'model_type': 'gpt_oss' (Hugging Face layout)"
        )

    @classmethod
    def _from_original(cls, d: dict[str, Any], source: str) -> GptOssConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls._build({k: v for k, v in d.items() if k in fields}, source)

    @classmethod
    def _from_hf(cls, d: dict[str, Any], source: str) -> GptOssConfig:
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_parameters / rope_scaling must be an object, got {rope!r}")
        values: dict[str, Any] = {
            "num_hidden_layers": d.get("num_hidden_layers"),
            "num_experts": d.get("num_local_experts", d.get("num_experts")),
            "experts_per_token": d.get("num_experts_per_tok", d.get("experts_per_token")),
            "vocab_size": d.get("vocab_size"),
            "hidden_size": d.get("hidden_size"),
            "intermediate_size": d.get("intermediate_size"),
            "head_dim": d.get("head_dim"),
            "num_attention_heads": d.get("num_attention_heads"),
            "num_key_value_heads": d.get("num_key_value_heads"),
            "sliding_window": d.get("sliding_window"),
            "initial_context_length": rope.get("original_max_position_embeddings"),
            "rope_theta": d.get("rope_theta", rope.get("rope_theta")),
            "rope_scaling_factor": rope.get("factor"),
            "rope_ntk_alpha": rope.get("beta_slow"),
            "rope_ntk_beta": rope.get("beta_fast"),
            "swiglu_limit": d.get("swiglu_limit"),
            "rms_norm_eps": d.get("rms_norm_eps"),
            "max_context": d.get("max_position_embeddings"),
        }
        config = cls._build({k: v for k, v in values.items() if v is not None}, source)
        layer_types = d.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list):
                raise ValueError(f"{source}: layer_types must be a list, got {layer_types!r}")
            expected = ["sliding_attention" if config.is_sliding(i) else "full_attention"
                        for i in range(config.num_hidden_layers)]
            if list(layer_types) != expected:
                raise ValueError(
                    f"{source}: layer_types {layer_types} differ from gpt-oss's alternation "
                    "(sliding on even layers, full on odd layers), which ossscope implements"
                )
        if rope and rope.get("rope_type", "yarn") != "yarn":
            raise ValueError(f"{source}: rope type {rope.get('rope_type')!r} is not gpt-oss's 'yarn'")
        return config

    @classmethod
    def _build(cls, values: dict[str, Any], source: str) -> GptOssConfig:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            want = float if types[key] in (float, "float") else int
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: {key} must be a number, got {value!r}")
            # json reads NaN, Infinity and 400-digit integers: none may reach int()/float(), which would raise
            # an error that does not name the field.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{source}: {key} must be a finite number, got {value!r}")
            if want is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
            if want is float and isinstance(value, int) and abs(value) > 1e300:
                raise ValueError(f"{source}: {key} is out of range, got {_short(value)}")
            clean[key] = want(value)
        try:
            return cls(**clean)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> GptOssConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_json(data, source=str(path))


# Plausible ranges, checked before any tensor is allocated: generous around the released models (20b: 24 layers,
# 32 experts, d_model 2880, vocab 201,088, context 131,072), but small enough that a typo or a hostile
# config.json (a zero, 1e300, NaN) is named here instead of failing in the allocator or giving NaN logits.
INT_RANGES: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 1024),
    "num_experts": (1, 65536),  # router indices are stored in two bytes past 256 experts
    "experts_per_token": (1, 65536),
    "vocab_size": (1, 1 << 24),
    "hidden_size": (32, 1 << 17),
    "intermediate_size": (32, 1 << 17),
    "head_dim": (2, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "sliding_window": (1, 1 << 24),
    "initial_context_length": (1, 1 << 24),
    "max_context": (1, 1 << 24),
}
# Floats must be finite and strictly above the lower bound: rope_theta is the log base of YaRN's band (1 would
# divide by zero), the YaRN betas go through a log, and a zero norm epsilon divides by zero on a zero vector.
FLOAT_LOWER_BOUNDS: dict[str, float] = {
    "rope_theta": 1.0,
    "rope_scaling_factor": 0.0,
    "rope_ntk_alpha": 0.0,
    "rope_ntk_beta": 0.0,
    "swiglu_limit": 0.0,
    "swiglu_alpha": 0.0,
    "rms_norm_eps": 0.0,
}


def _range_problems(config: GptOssConfig) -> list[str]:
    """Each field outside its range (or of the wrong type), as "name must ..., got value" texts."""
    problems = []
    for name, (low, high) in INT_RANGES.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name} must be an integer, got {value!r}")
        elif not low <= value <= high:
            problems.append(f"{name} must be in {low}..{high}, got {_short(value)}")
    for name, low in FLOAT_LOWER_BOUNDS.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name} must be a number, got {value!r}")
        elif not (math.isfinite(value) and value > low):
            problems.append(f"{name} must be a finite number above {low:g}, got {value!r}")
    return problems


def _short(value: Any) -> str:
    """repr of a config value, cut short (a hostile config.json may hold a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


PRESETS: dict[str, GptOssConfig] = {
    "gpt-oss-20b": GptOssConfig(),
    "gpt-oss-120b": GptOssConfig(num_hidden_layers=36, num_experts=128),
    # A tiny config for tests and examples: two layers of each kind, windows short enough to matter.
    "tiny": GptOssConfig(
        num_hidden_layers=4, num_experts=8, experts_per_token=2, vocab_size=512, hidden_size=64,
        intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        initial_context_length=64, max_context=4096,
    ),
}


def resolve_config(config_or_name: GptOssConfig | str) -> GptOssConfig:
    """A config from a preset name or a config object."""
    if isinstance(config_or_name, GptOssConfig):
        return config_or_name
    if config_or_name in PRESETS:
        return PRESETS[config_or_name]
    raise ValueError(f"unknown preset {config_or_name!r}; presets are {sorted(PRESETS)}")
