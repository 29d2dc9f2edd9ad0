"""config.json, read the way `transformers` 5.23 reads it, in both dialects.

The original releases carry top-level `global_head_dim` / `num_global_key_value_heads`;
`save_pretrained` in transformers >= 5.15 writes a sparse `per_layer_config` map instead.
Both are resolved here, once, into per-layer attention geometry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

TEXT_MODEL_TYPES = ("gemma4_text", "gemma3_text")
MULTIMODAL_MODEL_TYPES = ("gemma4", "gemma3")

# Per-layer keys the reference resolves per layer (Gemma4TextAttention reads them from
# `per_layer_config[i]`); any other override would be silently ignored by it, so we refuse it.
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass(frozen=True)
class TextConfig:
    """The decoder's config.json fields, with the defaults of `Gemma4TextConfig`.

    Gemma 3 (`gemma3_text`) is the same decoder without PLE, KV sharing, K=V, proportional RoPE,
    v_norm, layer_scalar and final soft-cap, with (1 + w) norms and a query pre-attention scalar;
    `from_dict` reads it with `Gemma3TextConfig`'s defaults and legacy keys."""

    model_type: str = "gemma4_text"
    query_pre_attn_scalar: float | None = None  # Gemma 3: scores scale by its -1/2 power; Gemma 4: 1.0
    attn_logit_softcapping: float | None = None
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    sliding_window: int = 512
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: str | None = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Resolved per-layer overrides (layer index -> {head_dim, num_key_value_heads}).
    per_layer_config: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def is_gemma3(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def norm_offset(self) -> float:
        """Gemma 1-3 norms scale by (1 + w); Gemma 4's by w."""
        return 1.0 if self.is_gemma3 else 0.0

    @property
    def attention_scale(self) -> float:
        """1.0 in Gemma 4, whose q/k norms take the place of 1/sqrt(d)."""
        return 1.0 if self.query_pre_attn_scalar is None else float(self.query_pre_attn_scalar) ** -0.5

    @property
    def has_v_norm(self) -> bool:
        return not self.is_gemma3

    @property
    def has_layer_scalar(self) -> bool:
        return not self.is_gemma3

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TextConfig:
        raw = {"model_type": "gemma4_text", **raw}
        if raw["model_type"] == "gemma3":
            raw["model_type"] = "gemma3_text"
        if raw["model_type"] == "gemma3_text":
            raw = _gemma3_defaults(raw)
        values = _typed_fields(cls, {k: v for k, v in raw.items() if k not in ("layer_types", "rope_parameters", "per_layer_config")}, "")
        base = cls(**values)
        if base.attn_logit_softcapping is not None:
            raise ConfigError("config.json: attn_logit_softcapping (Gemma 2 style) is not supported")
        n = base.num_hidden_layers

        layer_types = raw.get("layer_types")
        if layer_types is None:  # the reference's default: 5 sliding, then 1 full
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
        layer_types = list(layer_types)
        if len(layer_types) != n:
            raise ConfigError(f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers is {n}")
        if unknown := sorted(set(layer_types) - set(LAYER_TYPES)):
            raise ConfigError(f"config.json: unknown layer type {unknown[0]!r}; expected one of {LAYER_TYPES}")
        if not base.is_gemma3:
            layer_types[-1] = FULL  # Gemma4TextConfig forces the last layer global (Gemma 3's does not)

        rope = raw.get("rope_parameters") or _DEFAULT_ROPE
        for layer_type in set(layer_types):
            if layer_type not in rope:
                raise ConfigError(f"config.json: rope_parameters has no entry for {layer_type!r}")

        if base.use_bidirectional_attention == "all":
            raise ConfigError("config.json: use_bidirectional_attention='all' (an encoder setup) is not supported")

        return cls(
            **values,
            layer_types=tuple(layer_types),
            rope_parameters={k: dict(v) for k, v in rope.items()},
            per_layer_config=_resolve_per_layer_config(raw, layer_types, base.attention_k_eq_v),
        )

    def layer_head_dim(self, i: int) -> int:
        return self.per_layer_config.get(i, {}).get("head_dim", self.head_dim)

    def layer_kv_heads(self, i: int) -> int:
        return self.per_layer_config.get(i, {}).get("num_key_value_heads", self.num_key_value_heads)


def _gemma3_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`Gemma3TextConfig`: its defaults, and the legacy rope keys its releases carry."""
    out = {
        "vocab_size": 262_208,
        "num_hidden_layers": 26,
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        **raw,
    }
    out.setdefault("head_dim", 256)
    if "layer_types" not in raw:
        pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
        out["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(out["num_hidden_layers"])]
    if not raw.get("rope_parameters"):
        full = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 1_000_000.0))}
        if raw.get("rope_scaling"):
            full.update(raw["rope_scaling"])
            full["rope_type"] = full.pop("type", full.get("rope_type", "default"))
        out["rope_parameters"] = {
            SLIDING: {"rope_type": "default", "rope_theta": float(raw.get("rope_local_base_freq", 10_000.0))},
            FULL: full,
        }
    out["per_layer_config"] = {}  # one head_dim and KV-head count for every layer
    return out


def _resolve_per_layer_config(raw: dict[str, Any], layer_types: list[str], k_eq_v: bool) -> dict[int, dict[str, int]]:
    n = len(layer_types)
    if "per_layer_config" in raw:
        resolved = {}
        for key, overrides in (raw["per_layer_config"] or {}).items():
            try:
                index = int(key)
            except ValueError:
                raise ConfigError(f"config.json: per_layer_config key {key!r} is not a layer index") from None
            if not 0 <= index < n:
                raise ConfigError(f"config.json: per_layer_config names layer {index}, but the model has {n} layers")
            if unknown := sorted(set(overrides) - set(PER_LAYER_KEYS)):
                raise ConfigError(
                    f"config.json: per_layer_config[{key!r}] overrides {unknown[0]!r}; only {PER_LAYER_KEYS} vary per layer"
                )
            resolved[index] = {k: int(v) for k, v in overrides.items()}
        return resolved
    # Release dialect. As in the reference, num_global_key_value_heads applies only to K=V models.
    overrides: dict[str, int] = {"head_dim": int(raw.get("global_head_dim", 512))}
    global_kv_heads = raw.get("num_global_key_value_heads")
    if k_eq_v and global_kv_heads is not None:
        overrides["num_key_value_heads"] = int(global_kv_heads)
    return {i: dict(overrides) for i, t in enumerate(layer_types) if t == FULL}


@dataclass(frozen=True)
class VisionConfig:
    """`Gemma4VisionConfig`: the image (and video frame) encoder."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_theta: float = 100.0  # axial 2-D RoPE

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        values = _typed_fields(cls, raw, "vision_config.")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"config.json: vision_config rope_type {rope['rope_type']!r} is not supported (only 'axial')")
        return cls(**values, **({"rope_theta": float(rope["rope_theta"])} if "rope_theta" in rope else {}))


@dataclass(frozen=True)
class AudioConfig:
    """`Gemma4AudioConfig`: the conformer audio encoder of the edge models."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AudioConfig:
        values = _typed_fields(cls, raw, "audio_config.")
        if "subsampling_conv_channels" in values:
            values["subsampling_conv_channels"] = tuple(values["subsampling_conv_channels"])
        return cls(**values)


def _typed_fields(cls: type, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of `cls` that `raw` sets, each checked against its declared type: a value of the
    wrong type is one line naming the key, not a TypeError deep in the model."""
    values = {}
    for name, spec in cls.__dataclass_fields__.items():
        if name in raw:
            if not _has_type(raw[name], str(spec.type)):
                raise ConfigError(f"config.json: {where}{name} is {raw[name]!r}, which is not a valid {spec.type}")
            values[name] = raw[name]
    return values


def _has_type(value: Any, annotation: str) -> bool:
    """Whether `value` fits an annotation written as a string (`int`, `float | None`, `tuple[int, int]`, ...)."""
    for part in (p.strip() for p in annotation.split("|")):
        kind = part.split("[")[0]
        if (
            (kind == "None" and value is None)
            or (kind == "bool" and isinstance(value, bool))
            or (kind == "int" and isinstance(value, int) and not isinstance(value, bool))
            or (kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (kind == "str" and isinstance(value, str))
            or (kind in ("list", "tuple") and isinstance(value, (list, tuple)))
            or (kind == "dict" and isinstance(value, dict))
        ):
            return True
    return False


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint's config: the decoder plus whatever encoders it ships."""

    model_type: str
    text: TextConfig
    vision: VisionConfig | None
    audio: AudioConfig | None
    raw: dict[str, Any]

    @property
    def is_multimodal(self) -> bool:
        return self.model_type in MULTIMODAL_MODEL_TYPES

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type in TEXT_MODEL_TYPES:
            return cls(model_type, TextConfig.from_dict(raw), None, None, raw)
        if model_type in MULTIMODAL_MODEL_TYPES:
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError("config.json: model_type 'gemma4' needs a text_config object")
            vision, audio = raw.get("vision_config"), raw.get("audio_config")
            return cls(
                model_type,
                TextConfig.from_dict(text),
                VisionConfig.from_dict(vision) if isinstance(vision, dict) else None,
                AudioConfig.from_dict(audio) if isinstance(audio, dict) else None,
                raw,
            )
        expected = ", ".join(repr(t) for t in TEXT_MODEL_TYPES + MULTIMODAL_MODEL_TYPES)
        raise ConfigError(f"config.json: model_type {model_type!r} is not a Gemma 4 model (expected {expected})")

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        if not path.is_file():
            raise ConfigError(f"no config.json in {path.parent}: point at a Hugging Face checkpoint folder")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw)
