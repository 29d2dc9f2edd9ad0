"""Which tensors a Hugging Face Gemma 4 checkpoint holds, by name and shape, derived from its
config. The decoder's part comes from our own model built on the meta device (its module names
are the checkpoint names); the vision and audio encoders, which this engine does not run, are
described here so that their tensors are recognised, counted and generated exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from ..config import AudioConfig, ModelConfig, TextConfig, VisionConfig
from ..model import CausalLM
from ..model.layers import Experts
from ..parallel.sharding import WHOLE, Shard

TEXT_ONLY_PREFIX = "model."
MULTIMODAL_PREFIX = "model.language_model."

COMPONENTS = ("embeddings", "ple_table", "ple", "attention", "mlp", "experts", "norms", "vision", "audio")


@dataclass(frozen=True)
class TensorSpec:
    name: str  # as in the checkpoint
    shape: tuple[int, ...]
    component: str

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def decoder_prefix(config: ModelConfig) -> str:
    return MULTIMODAL_PREFIX if config.is_multimodal else TEXT_ONLY_PREFIX


def text_component(name: str) -> str:
    """Component of a decoder tensor, from its module path (relative to the decoder)."""
    parts = name.split(".")
    if parts[0] == "layers":
        module = parts[2]
        if module in ("self_attn", "mlp"):
            return {"self_attn": "attention", "mlp": "mlp"}[module]
        if module in ("router", "experts"):
            return "experts"
        if module.startswith("per_layer") or module == "post_per_layer_input_norm":
            return "ple"
        return "norms"  # the layer norms and layer_scalar
    if parts[0] == "embed_tokens_per_layer":
        return "ple_table"
    if parts[0] in ("per_layer_model_projection", "per_layer_projection_norm"):
        return "ple"
    if parts[0] in ("embed_tokens", "lm_head"):
        return "embeddings"
    return "norms"


M = TypeVar("M", bound=nn.Module)

# Initializers a model's modules run as they are built (nn.Linear, nn.Embedding).
_INITIALIZERS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


def empty(build: Callable[[], M]) -> M:
    """Modules over meta tensors (shapes, no data), initializers skipped: loading replaces every
    weight, and their first run on the meta device costs ~1 s of PyTorch's lazy setup, half of a
    cold start."""
    saved = {name: getattr(nn.init, name) for name in _INITIALIZERS}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return build()
    finally:
        for name, initializer in saved.items():
            setattr(nn.init, name, initializer)


def empty_model(text: TextConfig, shard: Shard = WHOLE) -> CausalLM:
    """The decoder, empty (see `empty`); or a rank's part of it: its share of heads and widths, and
    its run of experts (parallel/sharding.py)."""
    model = empty(lambda: CausalLM(shard.config(text)))
    if text.enable_moe_block and shard.size > 1:
        first, count = shard.experts(text)
        for layer in model.model.layers:
            layer.experts = empty(lambda: Experts(count, text.hidden_size, text.moe_intermediate_size or 0, first))
    return model


def text_tensors(text: TextConfig, prefix: str) -> list[TensorSpec]:
    model = empty_model(text)
    specs = []
    for name, tensor in model.state_dict().items():
        relative = name.removeprefix("model.")
        full = f"{prefix}{relative}" if name.startswith("model.") else name  # lm_head sits outside the decoder
        specs.append(TensorSpec(full, tuple(tensor.shape), text_component(relative)))
    return specs


def _clipped_linear(prefix: str, out_features: int, in_features: int, clipped: bool) -> list[tuple[str, tuple[int, ...]]]:
    """`Gemma4ClippableLinear`: a linear, plus scalar input/output clamp bounds when clipped."""
    bounds = [(f"{prefix}.{b}", ()) for b in ("input_min", "input_max", "output_min", "output_max")] if clipped else []
    return [(f"{prefix}.linear.weight", (out_features, in_features)), *bounds]


def vision_tensors(vision: VisionConfig, text_hidden: int) -> list[TensorSpec]:
    hidden, width, head_dim = vision.hidden_size, vision.intermediate_size, vision.head_dim
    heads, kv_heads, clipped = vision.num_attention_heads, vision.num_key_value_heads, vision.use_clipped_linears
    names: list[tuple[str, tuple[int, ...]]] = [
        ("patch_embedder.position_embedding_table", (2, vision.position_embedding_size, hidden)),
        ("patch_embedder.input_proj.weight", (hidden, 3 * vision.patch_size**2)),
    ]
    if vision.standardize:
        names += [("std_bias", (hidden,)), ("std_scale", (hidden,))]
    for i in range(vision.num_hidden_layers):
        layer = f"encoder.layers.{i}"
        names += _clipped_linear(f"{layer}.self_attn.q_proj", heads * head_dim, hidden, clipped)
        names += _clipped_linear(f"{layer}.self_attn.k_proj", kv_heads * head_dim, hidden, clipped)
        names += _clipped_linear(f"{layer}.self_attn.v_proj", kv_heads * head_dim, hidden, clipped)
        names += _clipped_linear(f"{layer}.self_attn.o_proj", hidden, heads * head_dim, clipped)
        names += [(f"{layer}.self_attn.q_norm.weight", (head_dim,)), (f"{layer}.self_attn.k_norm.weight", (head_dim,))]
        names += _clipped_linear(f"{layer}.mlp.gate_proj", width, hidden, clipped)
        names += _clipped_linear(f"{layer}.mlp.up_proj", width, hidden, clipped)
        names += _clipped_linear(f"{layer}.mlp.down_proj", hidden, width, clipped)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            names.append((f"{layer}.{norm}.weight", (hidden,)))
    specs = [TensorSpec(f"model.vision_tower.{n}", s, "vision") for n, s in names]
    specs.append(TensorSpec("model.embed_vision.embedding_projection.weight", (text_hidden, hidden), "vision"))
    return specs


def audio_tensors(audio: AudioConfig, text_hidden: int) -> list[TensorSpec]:
    hidden, heads, clipped = audio.hidden_size, audio.num_attention_heads, audio.use_clipped_linears
    c0, c1 = audio.subsampling_conv_channels
    names: list[tuple[str, tuple[int, ...]]] = [
        ("subsample_conv_projection.layer0.conv.weight", (c0, 1, 3, 3)),
        ("subsample_conv_projection.layer0.norm.weight", (c0,)),
        ("subsample_conv_projection.layer1.conv.weight", (c1, c0, 3, 3)),
        ("subsample_conv_projection.layer1.norm.weight", (c1,)),
        ("subsample_conv_projection.input_proj_linear.weight", (hidden, (c0 // 4) * c1)),
    ]
    for i in range(audio.num_hidden_layers):
        layer = f"layers.{i}"
        for ff in ("feed_forward1", "feed_forward2"):
            names += _clipped_linear(f"{layer}.{ff}.ffw_layer_1", 4 * hidden, hidden, clipped)
            names += _clipped_linear(f"{layer}.{ff}.ffw_layer_2", hidden, 4 * hidden, clipped)
            names += [(f"{layer}.{ff}.pre_layer_norm.weight", (hidden,)), (f"{layer}.{ff}.post_layer_norm.weight", (hidden,))]
        names.append((f"{layer}.self_attn.per_dim_scale", (hidden // heads,)))
        for proj in ("q_proj", "k_proj", "v_proj", "post"):
            names += _clipped_linear(f"{layer}.self_attn.{proj}", hidden, hidden, clipped)
        names.append((f"{layer}.self_attn.relative_k_proj.weight", (hidden, hidden)))
        names += _clipped_linear(f"{layer}.lconv1d.linear_start", 2 * hidden, hidden, clipped)
        names += _clipped_linear(f"{layer}.lconv1d.linear_end", hidden, hidden, clipped)
        names += [
            (f"{layer}.lconv1d.depthwise_conv1d.weight", (hidden, 1, audio.conv_kernel_size)),
            (f"{layer}.lconv1d.pre_layer_norm.weight", (hidden,)),
            (f"{layer}.lconv1d.conv_norm.weight", (hidden,)),
        ]
        names += [(f"{layer}.{n}.weight", (hidden,)) for n in ("norm_pre_attn", "norm_post_attn", "norm_out")]
    names += [("output_proj.weight", (audio.output_proj_dims, hidden)), ("output_proj.bias", (audio.output_proj_dims,))]
    specs = [TensorSpec(f"model.audio_tower.{n}", s, "audio") for n, s in names]
    specs.append(TensorSpec("model.embed_audio.embedding_projection.weight", (text_hidden, audio.output_proj_dims), "audio"))
    return specs


def checkpoint_tensors(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor the checkpoint described by `config` holds."""
    specs = text_tensors(config.text, decoder_prefix(config))
    if config.vision is not None:
        specs += vision_tensors(config.vision, config.text.hidden_size)
    if config.audio is not None:
        specs += audio_tensors(config.audio, config.text.hidden_size)
    return specs
