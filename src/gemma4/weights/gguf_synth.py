"""Synthetic GGUF files in llama.cpp's own layout: what its `convert_hf_to_gguf.py` (to BF16) and then
`llama-quantize` would write for the synthetic checkpoint `synthesize` makes from the same preset and
seed (the same bf16 weights), written directly, tensor by tensor. So a full-size 26B-A4B or 31B
reaches both engines without its 50-60 GB bf16 folder, and never sits in RAM.

What is llama.cpp's here, and tested against it on tiny configs (tests/test_gguf_synth.py):
- the metadata its converter derives from config.json, and the vocabulary as its converter reads it
  (through the `gguf` package's own vocabulary readers, on the synthetic tokenizer's files);
- each tensor's type: F32 for 1-D tensors, norms, the router and scales (the converter's rule); the
  quantizer's choice for the rest (a tied embedding at Q6_K, or Q8_0 when its rows do not divide into
  256-blocks; every other matrix at the target type, or F16 when its rows do not divide into blocks);
- the blocks themselves (weights/gguf_quants.py), and the quantizer's tensor order."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import Gemma4Error
from ..plan import RopePlan, build_plan
from .gguf_file import gguf_name
from .gguf_quants import BLOCK, quantize_blocks
from .layout import TensorSpec, decoder_prefix, text_tensors
from .presets import preset_config
from .synth import GENERATION_CONFIG, tensor_values
from .synth_tokenizer import write_tokenizer

# what users ask for -> (llama.cpp's file type number, the type its matrices get)
GGUF_KINDS = {"q4_0": (2, "Q4_0"), "q8_0": (7, "Q8_0")}
VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
NEVER_QUANTIZED = ("ffn_gate_inp.weight", "per_layer_model_proj")  # llama-quantize keeps these as converted


@dataclass(frozen=True)
class GGUFTensorPlan:
    name: str  # llama.cpp's
    shape: tuple[int, ...]  # ours (outermost first)
    type_name: str
    spec: TensorSpec | None  # where its values come from; None: derived (rope_freqs)

    @property
    def nbytes(self) -> int:
        numel = int(np.prod(self.shape))
        if self.type_name in BLOCK:
            values, size = BLOCK[self.type_name]
            return numel // values * size
        return numel * (4 if self.type_name == "F32" else 2)


def converted_type(name: str, shape: tuple[int, ...]) -> str:
    """The type llama.cpp's converter gives a tensor at --outtype bf16."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight") or not name.endswith(".weight"):
        return "F32"
    return "BF16"


def quantized_type(name: str, shape: tuple[int, ...], target: str) -> str:
    """The type llama-quantize gives a tensor of a BF16 GGUF, for a file of `target` (Q4_0, Q8_0)."""
    source = converted_type(name, shape)
    if source == "F32" or any(part in name for part in NEVER_QUANTIZED):
        return source
    columns = shape[-1]
    chosen = target
    if name == "token_embd.weight":  # tied: quantized as the output layer is
        chosen = "Q8_0" if columns % BLOCK[target][0] or target == "Q8_0" else "Q6_K"
    if columns % BLOCK[chosen][0]:  # the quantizer's fallback for rows that do not divide into blocks
        chosen = "Q8_0" if chosen == "Q6_K" else chosen
        chosen = chosen if columns % BLOCK[chosen][0] == 0 else "F16"
    return chosen


def tensor_plan(config: ModelConfig, kind: str) -> list[GGUFTensorPlan]:
    """Every tensor of the file, in the order llama-quantize writes them (the model's, then by layer and name)."""
    _, target = GGUF_KINDS[kind]
    prefix = decoder_prefix(config)
    plans = []
    for spec in text_tensors(config.text, prefix):
        name = gguf_name(spec.name.removeprefix(prefix))
        if name is None:
            raise Gemma4Error(f"no llama.cpp name for {spec.name}")
        plans.append(GGUFTensorPlan(name, spec.shape, quantized_type(name, spec.shape, target), spec))
    if (rope := _global_rope(config)) is not None:
        plans.append(GGUFTensorPlan("rope_freqs.weight", (rope.head_dim // 2,), "F32", None))
    layer = lambda p: int(p.name.split(".")[1]) if p.name.startswith("blk.") else -1  # noqa: E731
    return sorted(plans, key=lambda p: (layer(p), p.name))


def synthesize_gguf(
    preset: str, out: str | Path, kind: str = "q4_0", seed: int = 0, overrides: dict | None = None, progress: bool = True
) -> Path:
    """Write the named preset's decoder as one GGUF file of `kind` (q4_0, q8_0): the weights
    of `synthesize(preset, ..., seed=seed)`, as llama.cpp's converter and quantizer would store them."""
    if kind not in GGUF_KINDS:
        raise Gemma4Error(f"a synthetic GGUF is written as one of {', '.join(GGUF_KINDS)}, not {kind!r}")
    out = Path(out)
    if out.exists():
        raise Gemma4Error(f"{out} already exists; choose another file name")
    raw = preset_config(preset)
    text_raw = raw.get("text_config", raw)
    text_raw.update(overrides or {})
    raw["dtype"] = "bfloat16"
    config = ModelConfig.from_dict(raw)
    plans = tensor_plan(config, kind)

    import gguf

    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, "gemma4")
    for p in plans:
        if p.type_name in ("F32", "F16"):
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32 if p.type_name == "F32" else np.float16), p.nbytes)
        else:
            byte_shape = (*p.shape[:-1], p.nbytes // int(np.prod(p.shape[:-1])))
            writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes, gguf.GGMLQuantizationType[p.type_name])
    writer.add_type("model")
    for key in ("top_k", "top_p"):
        if key in GENERATION_CONFIG:
            getattr(writer, f"add_sampling_{key}")(GENERATION_CONFIG[key])
    writer.add_name(f"gemma4 synthetic {preset}")
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    _add_hparams(writer, text_raw)
    with tempfile.TemporaryDirectory() as folder:
        _add_vocab(writer, Path(folder), raw, config.text.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(GGUF_KINDS[kind][0])

    writer.open_output_file()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    with tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress) as bar:
        for p in plans:
            writer.write_padding(fout, fout.tell())
            for data in _encoded(p, config, seed):
                fout.write(data.tobytes())
                bar.update(data.nbytes)
            writer.write_padding(fout, p.nbytes)
    writer.close()
    partial.rename(out)  # complete, or not there at all
    return out


def _global_rope(config: ModelConfig) -> RopePlan | None:
    return next((layer.rope for layer in build_plan(config.text) if not layer.is_sliding), None)


def _encoded(p: GGUFTensorPlan, config: ModelConfig, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bytes in pieces: its synthetic values, rounded to bf16 as the checkpoint stores
    them, in the plan's type. Pieces hold whole blocks (the generator's chunks are multiples of 256)."""
    if p.spec is None:  # rope_freqs: llama.cpp's stand-in for proportional RoPE (unrotated pairs at 1e30)
        rope = _global_rope(config)
        yield np.array([1.0] * rope.rotated_pairs + [1e30] * (rope.head_dim // 2 - rope.rotated_pairs), dtype=np.float32)
        return
    for chunk in tensor_values(p.spec, seed):
        values = chunk.bfloat16()
        if p.type_name == "BF16":
            yield values.view(torch.int16).numpy()
        elif p.type_name == "F32":
            yield values.float().numpy()
        elif p.type_name == "F16":
            yield values.float().half().numpy()
        else:
            yield quantize_blocks(values.float(), p.type_name)


def _add_hparams(writer: Any, h: dict[str, Any]) -> None:
    """The model's metadata as llama.cpp's converter derives it from config.json (its TextModel,
    Gemma3Model and Gemma4Model set_gguf_parameters, in that order)."""
    layer_types = h["layer_types"]
    swa = [t == "sliding_attention" for t in layer_types]
    rope = h["rope_parameters"]
    writer.add_block_count(h["num_hidden_layers"])
    writer.add_context_length(h["max_position_embeddings"])
    writer.add_embedding_length(h["hidden_size"])
    writer.add_feed_forward_length(h["intermediate_size"])
    writer.add_head_count(h["num_attention_heads"])
    if h.get("num_global_key_value_heads") is None:
        writer.add_head_count_kv(h["num_key_value_heads"])
    else:  # per layer (the converter writes the global count, then overwrites it with this list)
        writer.add_head_count_kv([h["num_key_value_heads"] if s else h["num_global_key_value_heads"] for s in swa])
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    writer.add_layer_norm_rms_eps(h["rms_norm_eps"])
    if h.get("num_experts") is not None:
        writer.add_expert_count(h["num_experts"])
    if h.get("top_k_experts") is not None:
        writer.add_expert_used_count(h["top_k_experts"])
    if h.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(h["final_logit_softcapping"])
    writer.add_sliding_window(h["sliding_window"])
    shared = h["num_kv_shared_layers"]
    writer.add_shared_kv_layers(shared)
    writer.add_embedding_length_per_layer_input(h.get("hidden_size_per_layer_input") or 0)
    writer.add_sliding_window_pattern(swa)
    head_dim_full = h.get("global_head_dim") or next(
        c["head_dim"] for i, c in sorted(h["per_layer_config"].items(), key=lambda kv: int(kv[0])) if layer_types[int(i)] == "full_attention"
    )
    writer.add_key_length(head_dim_full)
    writer.add_value_length(head_dim_full)
    writer.add_key_length_swa(h["head_dim"])
    writer.add_value_length_swa(h["head_dim"])
    if h.get("moe_intermediate_size") is not None:
        writer.add_expert_feed_forward_length(h["moe_intermediate_size"])
    if h.get("use_double_wide_mlp"):
        first_shared = h["num_hidden_layers"] - shared
        writer.add_feed_forward_length([h["intermediate_size"] * (1 if i < first_shared else 2) for i in range(h["num_hidden_layers"])])
    writer.add_rope_dimension_count(head_dim_full)
    writer.add_rope_dimension_count_swa(int(h["head_dim"] * rope.get("partial_rotary_factor", 1.0)))


def _add_vocab(writer: Any, folder: Path, raw: dict[str, Any], vocab_size: int) -> None:
    """The vocabulary as llama.cpp's Gemma 4 converter reads it, from the synthetic tokenizer's files
    (beside the config and generation config it also consults)."""
    import gguf

    write_tokenizer(folder, vocab_size)
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    tokens, scores, types = [], [], []
    for text, score, token_type in gguf.LlamaHfVocab(folder).all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in VISIBLE_TOKENS else token_type)
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True)
    special.add_special_token["bos"] = True  # the converter's add_add_bos_token(True), said once
    special.add_to_gguf(writer)
    writer.add_add_space_prefix(False)
