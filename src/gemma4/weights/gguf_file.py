"""GGUF files (llama.cpp, Ollama) through the `gguf` package: metadata -> our config, llama.cpp
tensor names -> ours (one table, each numeric transform named beside it), vocabulary -> our
tokenizer. The file is memory-mapped; tensors are dequantized one at a time into the dtype asked for."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import FULL, SLIDING, ModelConfig
from ..errors import CheckpointError, ConfigError
from ..model import CausalLM
from ..quant.modules import (
    PackedModule,
    Scheme,
    is_row_table,
    pack_modules,
    pack_state,
    packable,
    packed_state,
    packed_twin,
    replace_module,
)
from ..parallel.sharding import AXIS, COLUMNS, WHOLE, Shard, cut_of
from ..quant.packed import PackedTensor
from ..runtime.tokenizer import SPECIAL_TOKENS, Tokenizer
from .checkpoint import install
from .gguf_header import GGUFTensor, read_gguf
from .file_rows import FileRows
from .gguf_repack import BLOCK_BYTES, BlockRows, repack
from .layout import empty_model

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def unshift_norm(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp stores Gemma 1-3 norm weights as 1 + w (its norms multiply by w directly)."""
    return w - 1.0


def as_is(w: torch.Tensor) -> torch.Tensor:
    return w


# llama.cpp name (with {i} for the layer) -> our module path. Gemma 4 and Gemma 3 share most.
TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "per_layer_projection_norm.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_feedforward_layernorm.weight",
    "blk.{i}.layer_output_scale.weight": "layers.{i}.layer_scalar",
    "blk.{i}.inp_gate.weight": "layers.{i}.per_layer_input_gate.weight",
    "blk.{i}.proj.weight": "layers.{i}.per_layer_projection.weight",
    "blk.{i}.post_norm.weight": "layers.{i}.post_per_layer_input_norm.weight",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.router.proj.weight",
    "blk.{i}.ffn_gate_inp.scale": "layers.{i}.router.scale",
    "blk.{i}.ffn_down_exps.scale": "layers.{i}.router.per_expert_scale",
    "blk.{i}.ffn_gate_up_exps.weight": "layers.{i}.experts.gate_up_proj",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.experts.down_proj",
    "blk.{i}.pre_ffw_norm_2.weight": "layers.{i}.pre_feedforward_layernorm_2.weight",
    "blk.{i}.post_ffw_norm_1.weight": "layers.{i}.post_feedforward_layernorm_1.weight",
    "blk.{i}.post_ffw_norm_2.weight": "layers.{i}.post_feedforward_layernorm_2.weight",
}
# Derived by llama.cpp's converter from the config; we derive it ourselves (plan.rope).
DERIVED = ("rope_freqs.weight",)
_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in TENSOR_NAMES.items()]


_OUR_PATTERNS = [(re.compile("^" + re.escape(v).replace(r"\{i\}", r"(\d+)") + "$"), k) for k, v in TENSOR_NAMES.items()]


def our_name(gguf_name: str) -> str | None:
    return _renamed(gguf_name, _PATTERNS)


def gguf_name(our_name: str) -> str | None:
    """llama.cpp's name for one of our decoder tensors (relative to the decoder: `layers.0.mlp...`)."""
    return _renamed(our_name, _OUR_PATTERNS)


def _renamed(name: str, patterns: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in patterns:
        if m := pattern.match(name):
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


@dataclass
class GGUFCheckpoint:
    path: Path
    fields: dict[str, Any]
    tensors: list[GGUFTensor]
    architecture: str
    config: ModelConfig

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    fields, tensors = read_gguf(path)
    architecture = fields.get("general.architecture")
    if architecture not in ("gemma4", "gemma3"):
        raise CheckpointError(f"{path.name}: architecture {architecture!r} is not supported (gemma4 or gemma3)")
    for t in tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path.name}: tensor {t.name} has type {t.tensor_type.name}; supported: {', '.join(SUPPORTED_TYPES)}")
    config = ModelConfig.from_dict(_config_from_metadata(fields, {t.name for t in tensors}, architecture))
    return GGUFCheckpoint(path, fields, tensors, architecture, config)


def _config_from_metadata(fields: dict[str, Any], tensors: set[str], arch: str) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{name}", default)

    layers = key("block_count")
    hidden = key("embedding_length")
    heads = key("attention.head_count")
    if None in (layers, hidden, heads):
        raise CheckpointError(f"{arch} metadata lacks block_count, embedding_length or attention.head_count")
    config: dict[str, Any] = {
        "vocab_size": len(fields.get("tokenizer.ggml.tokens", [])) or key("vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "sliding_window": key("attention.sliding_window", 4096),
        "max_position_embeddings": key("context_length", 131_072),
        "final_logit_softcapping": key("final_logit_softcapping"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": fields.get("tokenizer.ggml.padding_token_id", 0),
    }
    kv_heads, ffn = key("attention.head_count_kv"), key("feed_forward_length")
    if arch == "gemma3":
        head_dim = key("attention.key_length", 256)
        scaling = key("rope.scaling.type")
        config.update(
            model_type="gemma3_text",
            intermediate_size=ffn,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=key("rope.freq_base", 1_000_000.0),
            rope_local_base_freq=key("rope.freq_base_swa", 10_000.0),
            rope_scaling={"rope_type": "linear", "factor": 1.0 / key("rope.scale_linear", 1.0)} if scaling == "linear" else None,
            # llama.cpp's rule: the 27B (62 layers) scales by hidden/heads, the others by head_dim
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        )
        return config
    swa = key("attention.sliding_window_pattern")
    layer_types = [SLIDING if s else FULL for s in swa] if isinstance(swa, list) else None
    if layer_types is None:
        raise CheckpointError("gemma4 metadata lacks attention.sliding_window_pattern")
    kv_per_layer = kv_heads if isinstance(kv_heads, list) else [kv_heads] * layers
    ffn_per_layer = ffn if isinstance(ffn, list) else [ffn] * layers
    first_global = layer_types.index(FULL)
    shared = key("attention.shared_kv_layers", 0)
    config.update(
        model_type="gemma4_text",
        intermediate_size=ffn_per_layer[0],
        use_double_wide_mlp=shared > 0 and ffn_per_layer[-1] == 2 * ffn_per_layer[0],
        layer_types=layer_types,
        head_dim=key("attention.key_length_swa", key("attention.key_length")),
        num_key_value_heads=kv_per_layer[layer_types.index(SLIDING)] if SLIDING in layer_types else kv_per_layer[0],
        per_layer_config={
            str(i): {"head_dim": key("attention.key_length"), "num_key_value_heads": kv_per_layer[i]}
            for i, t in enumerate(layer_types)
            if t == FULL
        },
        num_kv_shared_layers=shared,
        hidden_size_per_layer_input=key("embedding_length_per_layer_input", 0),
        attention_k_eq_v=f"blk.{first_global}.attn_v.weight" not in tensors,
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": key("rope.freq_base_swa", 10_000.0)},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": key("rope.freq_base", 1_000_000.0)},
        },
    )
    if experts := key("expert_count"):
        config.update(
            enable_moe_block=True,
            num_experts=experts,
            top_k_experts=key("expert_used_count"),
            moe_intermediate_size=key("expert_feed_forward_length"),
        )
    return config


def gguf_tokenizer(checkpoint: GGUFCheckpoint) -> Tokenizer:
    """The vocabulary in the GGUF metadata as a byte-fallback BPE: merges from the file when it
    has them (Gemma 4), else derived from the SentencePiece piece scores (Gemma 3), as
    `transformers` derives them. Control and user-defined tokens become special tokens."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens = checkpoint.field("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{checkpoint.path.name}: no tokenizer vocabulary in the metadata")
    types = checkpoint.field("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = checkpoint.field("tokenizer.ggml.merges")
    if merges:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        merges = _merges_from_scores(tokens, checkpoint.field("tokenizer.ggml.scores", [0.0] * len(tokens)), vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token=tokens[3] if len(tokens) > 3 else None))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control and user-defined tokens, and Gemma 4's own specials by name: converters have typed
    # those NORMAL when they sit inside the base vocabulary, yet llama.cpp still splits them out.
    # User-defined tokens (like "\n" in Gemma 3) are matched whole in text but are ordinary text when decoded.
    specials = [t for t, kind in zip(tokens, types) if kind == CONTROL or t in SPECIAL_TOKENS]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user_defined = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and t not in SPECIAL_TOKENS]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    ids = {k: checkpoint.field(f"tokenizer.ggml.{k}_token_id", d) for k, d in (("bos", 2), ("eos", 1), ("padding", 0))}
    return Tokenizer(backend, "tokenizers", backend.get_vocab(with_added_tokens=True), ids["bos"], ids["eos"], ids["padding"])


CONTROL, USER_DEFINED = 3, 4  # GGUF token types (as SentencePiece numbers them)


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    ranked = []
    for piece in tokens:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[vocab[piece]], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _transform(checkpoint: GGUFCheckpoint, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return unshift_norm if checkpoint.architecture == "gemma3" and name.endswith("norm.weight") else as_is


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """One GGUF tensor as float32 in our (row-major, outermost-first) shape."""
    import gguf

    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.array(data, dtype=np.float32).reshape(tensor.torch_shape)  # a writable copy


def load_gguf_model(
    path: str | Path, dtype: torch.dtype | None = None, progress: bool = True, quant: str | None = None, group: int = 0,
    shard: Shard = WHOLE,
) -> tuple[CausalLM, GGUFCheckpoint]:
    """The decoder of a GGUF file (or a rank's part of it: `shard`).

    By default the file's own types are kept: quantized and 16-bit matrices are re-packed for our
    kernels (no float copy), a quantized PLE table stays in the file, the rest is fp32. With `dtype`,
    every tensor is dequantized into it; with `quant`, dequantized and packed anew (bf16/int8/int4)."""
    checkpoint = open_gguf(path)
    expected = _expected_shapes(checkpoint)
    model = empty_model(checkpoint.config.text, shard)
    native = dtype is None and quant is None
    packed = pack_modules(model, Scheme(quant, group)) if quant else {}
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(checkpoint.tensors, desc="loading", unit="tensor", delay=1.0, disable=not progress, leave=False):
        if t.name in DERIVED:
            continue
        key = _our_key(checkpoint, t, expected)
        module_name = key.rpartition(".")[0]
        module = model.get_submodule(module_name)
        type_name = t.tensor_type.name
        if native and type_name != "F32" and packable(module_name, module):
            if is_row_table(key) and type_name in BLOCK_BYTES:
                replace_module(model, module_name, BlockRows(FileRows(checkpoint.path, t.start, t.data.shape, torch.uint8), type_name, expected[key][-1], module.scale))
                continue
            if not isinstance(module, PackedModule):
                module = packed_twin(module)
                replace_module(model, module_name, module)
            state.update(packed_state(key, _packed(*_raw_part(t, key, expected[key], shard), t.tensor_type.name)))
            if type_name in BLOCK_BYTES:  # (16-bit matrices are used in the map as they are)
                t.release()
            continue
        values = shard.cut(key, _transform(checkpoint, key)(torch.from_numpy(dequantize(t)).reshape(expected[key])))
        t.release()
        if key in packed:
            state.update(pack_state(key, values, *packed[key]))
        else:
            state[key] = values.to(dtype or torch.float32)
    install(model, state)
    return model.eval(), checkpoint


def gguf_loaded_bytes(path: str | Path | GGUFCheckpoint) -> dict[str, int]:
    """Bytes each tensor takes once `load_gguf_model` keeps it in the file's own type, by our checkpoint name."""
    from .gguf_repack import loaded_nbytes

    checkpoint = path if isinstance(path, GGUFCheckpoint) else open_gguf(path)
    expected = _expected_shapes(checkpoint)
    return {_our_key(checkpoint, t, expected): loaded_nbytes(t.tensor_type.name, tuple(t.torch_shape)) for t in checkpoint.tensors if t.name not in DERIVED}


def _expected_shapes(checkpoint: GGUFCheckpoint) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes for the model the metadata describes (whole, before any shard's cut)."""
    return {name: tuple(t.shape) for name, t in empty_model(checkpoint.config.text).state_dict().items()}


def _our_key(checkpoint: GGUFCheckpoint, t: GGUFTensor, expected: dict[str, tuple[int, ...]]) -> str:
    """Our parameter name for a GGUF tensor, after checking its shape against the metadata's model."""
    name = our_name(t.name)
    key = None if name is None else ("model." + name if not name.startswith("lm_head") else name)
    if key is None or key not in expected:
        raise CheckpointError(f"{checkpoint.path.name}: unexpected tensor {t.name!r} for this {checkpoint.architecture} model")
    want = expected[key]
    if int(np.prod(t.torch_shape)) != int(np.prod(want)) or (len(want) > 1 and tuple(t.torch_shape) != want):
        raise CheckpointError(
            f"{checkpoint.path.name}: tensor {t.name} has shape {list(t.torch_shape)}, but the metadata implies {list(want)}"
        )
    return key


def _raw_part(t: GGUFTensor, key: str, shape: tuple[int, ...], shard: Shard) -> tuple[np.ndarray, tuple[int, ...]]:
    """A rank's part of a tensor's raw data (uint8 [..., row bytes], or 16-bit [..., K]) and its
    shape, cut in the memory map: whole rows, experts, or runs of whole blocks."""
    data = t.data if t.tensor_type.name in BLOCK_BYTES else t.data.view(np.uint16).reshape(shape)
    how = cut_of(key)
    if how is None or shard.size == 1:
        return data, shape
    axis = AXIS[how]
    if how == COLUMNS and t.tensor_type.name in BLOCK_BYTES:
        block_columns = 256 if t.tensor_type.name.endswith("_K") else 32
        if (shape[-1] // shard.size) % block_columns:
            raise ConfigError(f"tensor parallelism over {shard.size} ranks: {t.name} ({t.tensor_type.name}) would split inside its blocks of "
                              f"{block_columns} columns; use fewer ranks")
    part_shape = list(shape)
    part_shape[axis] //= shard.size
    size = data.shape[axis] // shard.size
    return np.take(data, range(shard.rank * size, (shard.rank + 1) * size), axis=axis), tuple(part_shape)


def _packed(data: np.ndarray, shape: tuple[int, ...], type_name: str) -> PackedTensor:
    if type_name in BLOCK_BYTES:
        return repack(data, type_name, shape, tiled=True)
    with warnings.catch_warnings():  # the map is read-only, and so are our weights
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(data).reshape(shape)  # F16/BF16 stay in the memory map
    return PackedTensor.of(raw.view(torch.float16 if type_name == "F16" else torch.bfloat16))
