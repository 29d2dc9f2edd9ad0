"""The layer plan: every per-layer fact, derived once from the config.

Modules receive their `LayerPlan` and never re-derive it; the runtime (caches, memory
planner) reads the same records.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import FULL, SLIDING, TextConfig
from .errors import ConfigError


@dataclass(frozen=True)
class RopePlan:
    theta: float
    rotated_pairs: int  # frequency pairs that rotate; the rest (proportional RoPE) are identity
    head_dim: int
    factor: float = 1.0


@dataclass(frozen=True)
class LayerPlan:
    index: int
    attention_type: str  # "sliding_attention" | "full_attention"
    sliding_window: int | None  # None on global layers
    num_heads: int
    num_kv_heads: int
    head_dim: int
    k_eq_v: bool  # no v_proj: the value is v_norm(k_proj(x))
    kv_source: int  # the layer whose K/V this layer attends over (itself unless KV-shared)
    mlp_width: int
    moe: bool
    ple_dim: int  # per-layer-embedding width, 0 when the model has none
    rope: RopePlan
    attention_scale: float = 1.0  # Gemma 4: 1.0 (q/k norms instead); Gemma 3: query_pre_attn_scalar^-1/2
    v_norm: bool = True  # Gemma 4 RMS-normalises values (without weight)

    @property
    def is_sliding(self) -> bool:
        return self.attention_type == SLIDING

    @property
    def owns_kv(self) -> bool:
        return self.kv_source == self.index


def rope_plan(config: TextConfig, layer_type: str, head_dim: int) -> RopePlan:
    params = config.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    fraction = params.get("partial_rotary_factor", 1.0)
    if rope_type in ("default", "linear"):  # linear: positions divided by `factor`
        pairs = head_dim // 2  # the reference ignores partial_rotary_factor here
    elif rope_type == "proportional":
        pairs = int(fraction * head_dim // 2)
    else:
        raise ConfigError(f"config.json: rope_type {rope_type!r} for {layer_type} is not supported")
    return RopePlan(float(params["rope_theta"]), pairs, head_dim, float(params.get("factor", 1.0)))


def kv_sources(config: TextConfig) -> list[int]:
    """Layer i reads the K/V of kv_sources[i]: the last KV-sharing layers reuse the last
    non-shared layer of their own attention type (E2B: sliding -> 13, global -> 14)."""
    n = config.num_hidden_layers
    first_shared = n - config.num_kv_shared_layers
    if not 0 < first_shared <= n:
        raise ConfigError(f"config.json: num_kv_shared_layers={config.num_kv_shared_layers} leaves no layer to own KV")
    last_owner = {t: i for i, t in enumerate(config.layer_types[:first_shared])}
    sources = list(range(first_shared))
    for i in range(first_shared, n):
        layer_type = config.layer_types[i]
        if layer_type not in last_owner:
            raise ConfigError(f"config.json: shared layer {i} is {layer_type} but no earlier layer of that type owns KV")
        sources.append(last_owner[layer_type])
    return sources


def build_plan(config: TextConfig) -> tuple[LayerPlan, ...]:
    sources = kv_sources(config)
    if config.enable_moe_block and not (config.num_experts and config.top_k_experts and config.moe_intermediate_size):
        raise ConfigError("config.json: enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
    plans = []
    for i, layer_type in enumerate(config.layer_types):
        head_dim = config.layer_head_dim(i)
        kv_heads = config.layer_kv_heads(i)
        if config.num_attention_heads % kv_heads:
            raise ConfigError(f"config.json: layer {i} has {kv_heads} KV heads, which do not divide {config.num_attention_heads}")
        shared = sources[i] != i
        plans.append(
            LayerPlan(
                index=i,
                attention_type=layer_type,
                sliding_window=config.sliding_window if layer_type == SLIDING else None,
                num_heads=config.num_attention_heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                k_eq_v=config.attention_k_eq_v and layer_type == FULL,
                kv_source=sources[i],
                mlp_width=config.intermediate_size * (2 if config.use_double_wide_mlp and shared else 1),
                moe=config.enable_moe_block,
                ple_dim=config.hidden_size_per_layer_input or 0,
                rope=rope_plan(config, layer_type, head_dim),
                attention_scale=config.attention_scale,
                v_norm=config.has_v_norm,
            )
        )
    return tuple(plans)
