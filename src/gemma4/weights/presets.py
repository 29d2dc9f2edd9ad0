"""config.json of the four released Gemma 4 models (release dialect, values from Google
DeepMind's `gemma` 4.0.1 definitions) and tiny presets that keep every mechanism of each family."""

from __future__ import annotations

import copy
from typing import Any

from ..config import FULL, SLIDING

TOKEN_IDS = {
    "boi_token_id": 255_999,
    "eoi_token_id": 258_882,
    "image_token_id": 258_880,
    "video_token_id": 258_884,
    "boa_token_id": 256_000,
    "eoa_token_index": 258_883,
    "audio_token_id": 258_881,
}

_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

_EDGE_VISION = {"model_type": "gemma4_vision", "use_clipped_linears": True}
_SERVER_VISION = {
    "model_type": "gemma4_vision",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 72,
    "standardize": True,
}
_AUDIO = {"model_type": "gemma4_audio"}


def _pattern(sliding_per_global: int, layers: int) -> list[str]:
    period = sliding_per_global + 1
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(layers)]


def _text(**fields: Any) -> dict[str, Any]:
    text = {
        "model_type": "gemma4_text",
        "vocab_size": 262_144,
        "vocab_size_per_layer_input": 262_144,
        "head_dim": 256,
        "global_head_dim": 512,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "rope_parameters": copy.deepcopy(_ROPE),
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "num_experts": None,
        "top_k_experts": None,
        "moe_intermediate_size": None,
        "use_bidirectional_attention": None,
    }
    text.update(fields)
    return text


def _release(text: dict[str, Any], vision: dict[str, Any], audio: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": vision,
        "audio_config": audio,
        "tie_word_embeddings": True,
        "eos_token_id": [1, 106],
        "dtype": "bfloat16",
    }
    config.update(TOKEN_IDS)
    return config


FULL_SIZE: dict[str, dict[str, Any]] = {
    "e2b": _release(
        _text(
            hidden_size=1536,
            intermediate_size=6144,
            num_hidden_layers=35,
            layer_types=_pattern(4, 35),
            sliding_window=512,
            num_attention_heads=8,
            num_key_value_heads=1,
            hidden_size_per_layer_input=256,
            num_kv_shared_layers=20,
            use_double_wide_mlp=True,
            max_position_embeddings=131_072,
        ),
        _EDGE_VISION,
        _AUDIO,
    ),
    "e4b": _release(
        _text(
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=42,
            layer_types=_pattern(5, 42),
            sliding_window=512,
            num_attention_heads=8,
            num_key_value_heads=2,
            hidden_size_per_layer_input=256,
            num_kv_shared_layers=18,
            max_position_embeddings=131_072,
        ),
        _EDGE_VISION,
        _AUDIO,
    ),
    "26b-a4b": _release(
        _text(
            hidden_size=2816,
            intermediate_size=2112,
            num_hidden_layers=30,
            layer_types=_pattern(5, 30),
            sliding_window=1024,
            num_attention_heads=16,
            num_key_value_heads=8,
            num_global_key_value_heads=2,
            attention_k_eq_v=True,
            enable_moe_block=True,
            num_experts=128,
            top_k_experts=8,
            moe_intermediate_size=704,
            max_position_embeddings=262_144,
            use_bidirectional_attention="vision",
        ),
        _SERVER_VISION,
        None,
    ),
    "31b": _release(
        _text(
            hidden_size=5376,
            intermediate_size=21504,
            num_hidden_layers=60,
            layer_types=_pattern(5, 60),
            sliding_window=1024,
            num_attention_heads=32,
            num_key_value_heads=16,
            num_global_key_value_heads=4,
            attention_k_eq_v=True,
            max_position_embeddings=262_144,
            use_bidirectional_attention="vision",
        ),
        _SERVER_VISION,
        None,
    ),
}

# Tiny text-only presets: real vocabulary (so real token ids work), small widths, every
# mechanism of the family kept. Windows are short so tests run past them cheaply.
_TINY_COMMON = dict(head_dim=16, global_head_dim=32, sliding_window=8, max_position_embeddings=131_072)
TINY: dict[str, dict[str, Any]] = {
    "tiny-e2b": _text(  # PLE, KV sharing of both layer types, double-wide MLP on shared layers
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=10,
        layer_types=_pattern(4, 10),
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_size_per_layer_input=32,  # a multiple of 32, as real widths are: a row of a batch vectorises as it does alone
        num_kv_shared_layers=5,  # like the release, the last KV owner is global, the one before sliding
        use_double_wide_mlp=True,
        **_TINY_COMMON,
    ),
    "tiny-e4b": _text(  # PLE, KV sharing, 2 KV heads
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=12,
        layer_types=_pattern(5, 12),
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=6,
        **_TINY_COMMON,
    ),
    "tiny-26b-a4b": _text(  # hybrid MoE with dense branch, K=V, divergent GQA
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=12,
        layer_types=_pattern(5, 12),
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=16,
        top_k_experts=4,
        moe_intermediate_size=24,
        **_TINY_COMMON,
    ),
    "tiny-31b": _text(  # K=V, divergent GQA
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=12,
        layer_types=_pattern(5, 12),
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        **_TINY_COMMON,
    ),
}
TINY = {name: {**text, "architectures": ["Gemma4ForCausalLM"]} for name, text in TINY.items()}

# A tiny multimodal checkpoint: the tiny E2B decoder under `model.language_model.*`, beside
# small vision and audio encoders, to exercise the multimodal naming end to end.
TINY["tiny-e2b-mm"] = _release(
    {k: v for k, v in TINY["tiny-e2b"].items() if k != "architectures"},
    {**_EDGE_VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
     "num_key_value_heads": 2, "head_dim": 16, "position_embedding_size": 64},
    # 128 first-layer channels, as released: the projection after the convolutions reads (channels / 4) x
    # second-layer channels, which only matches the 128 mel bins when the first layer has 128.
    {**_AUDIO, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
     "subsampling_conv_channels": [128, 8], "output_proj_dims": 48},
)
# The server models' multimodal layout: a standardised vision tower without clipped linears (a head
# width that is no power of two, as the release's 72), and image blocks that attend both ways.
_TINY_SERVER_VISION = {**_SERVER_VISION, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 4, "head_dim": 12, "position_embedding_size": 64}
for _name in ("tiny-31b", "tiny-26b-a4b"):
    TINY[f"{_name}-mm"] = _release(
        {**{k: v for k, v in TINY[_name].items() if k != "architectures"}, "use_bidirectional_attention": "vision"}, _TINY_SERVER_VISION, None
    )

def _gemma3(**fields: Any) -> dict[str, Any]:
    """A Gemma 3 text config.json as its releases write it (legacy rope keys)."""
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262_144,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 256,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": None,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
    }
    config.update(fields)
    config["layer_types"] = _pattern(5, config["num_hidden_layers"])
    return config


# Gemma 3: the same model code by configuration. The 270M is the one real checkpoint reachable here.
GEMMA3 = {
    "gemma3-270m": _gemma3(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
        sliding_window=512, max_position_embeddings=32_768,
    ),
    "tiny-gemma3": _gemma3(  # with the linear RoPE scaling of the larger Gemma 3 models
        hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=32_768,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
}

PRESETS = {**FULL_SIZE, **TINY, **GEMMA3}


def preset_config(name: str) -> dict[str, Any]:
    """A fresh copy of the named preset's config.json."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
