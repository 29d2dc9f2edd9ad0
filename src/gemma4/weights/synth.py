"""Synthetic checkpoints: the exact config.json, tensor names, shapes, dtypes and file layout
of a real Gemma 4 release, filled with seeded random weights. Tensors are generated and
written in chunks, so a full-size model never sits in RAM."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import Gemma4Error
from .layout import TensorSpec, checkpoint_tensors
from .presets import preset_config
from .safetensors_io import TensorToWrite, write_safetensors
from .synth_tokenizer import write_tokenizer

CHUNK_ELEMENTS = 1 << 24  # 64 MB of fp32 scratch at most
DEFAULT_SHARD_BYTES = 5 * 10**9  # save_pretrained's customary 5 GB shards
GENERATION_CONFIG = {"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0, "do_sample": True, "top_k": 64, "top_p": 0.95}


def tensor_values(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    """Seeded per tensor name, so any tensor can be regenerated alone. Norm weights, scales and
    scalars are drawn around 1 (not left at 1, which would hide a misplaced one)."""
    generator = torch.Generator().manual_seed(zlib.crc32(spec.name.encode()) ^ seed)
    remaining = spec.numel
    while remaining:
        n = min(remaining, CHUNK_ELEMENTS)
        if len(spec.shape) >= 2:  # matrices and tables: variance-preserving
            yield torch.randn(n, generator=generator) * spec.shape[-1] ** -0.5
        elif len(spec.shape) == 1:  # norm weights, layer_scalar, router and expert scales
            yield torch.rand(n, generator=generator) + 0.5
        else:  # the encoders' clamp bounds: finite, below zero for minima
            sign = -1.0 if spec.name.endswith("_min") else 1.0
            yield sign * (4 + 4 * torch.rand(n, generator=generator))
        remaining -= n


def _shards(specs: list[TensorSpec], itemsize: int, shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def processor_config(config: ModelConfig) -> dict:
    """processor_config.json as the releases ship it: what `Gemma4Processor` and its image
    processor, video processor and audio feature extractor load."""
    out: dict = {"processor_class": "Gemma4Processor", "image_seq_length": 280, "audio_seq_length": 750, "audio_ms_per_token": 40}
    if config.vision is not None:
        common = {"patch_size": config.vision.patch_size, "pooling_kernel_size": config.vision.pooling_kernel_size, "do_resize": True,
                  "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3, "do_convert_rgb": True}
        out["image_processor"] = {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 280, "do_normalize": False, **common}
        out["video_processor"] = {"video_processor_type": "Gemma4VideoProcessor", "max_soft_tokens": 70, "num_frames": 32, **common}
    if config.audio is not None:
        out["feature_extractor"] = {"feature_extractor_type": "Gemma4AudioFeatureExtractor", "feature_size": 128, "sampling_rate": 16_000,
                                    "padding_value": 0.0, "return_attention_mask": True, "frame_length_ms": 20.0, "hop_length_ms": 10.0,
                                    "min_frequency": 0.0, "max_frequency": 8000.0, "mel_floor": 0.001}
    return out


def synthesize(
    preset: str,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    overrides: dict | None = None,
) -> Path:
    """Write the named preset's checkpoint into `out_dir` (which must hold no checkpoint yet),
    with config.json's text fields `overrides` changed (say, more KV heads to split)."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise Gemma4Error(f"{out} already holds a checkpoint (config.json); choose another folder")
    raw = preset_config(preset)
    (raw.get("text_config", raw)).update(overrides or {})
    raw["dtype"] = str(dtype).removeprefix("torch.")
    config = ModelConfig.from_dict(raw)
    specs = checkpoint_tensors(config)
    shards = _shards(specs, dtype.itemsize, shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    out.mkdir(parents=True, exist_ok=True)
    total = sum(s.numel for s in specs) * dtype.itemsize
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {preset}", disable=not progress) as bar:
        for shard, name in zip(shards, names):
            tensors = [TensorToWrite(s.name, s.shape, dtype, lambda s=s: tensor_values(s, seed)) for s in shard]
            write_safetensors(out / name, tensors, {"format": "pt"}, on_bytes=bar.update)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {s.name: name for shard, name in zip(shards, names) for s in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    write_tokenizer(out, config.text.vocab_size)
    if config.vision is not None or config.audio is not None:
        (out / "processor_config.json").write_text(json.dumps(processor_config(config), indent=2) + "\n")
    # config.json last: its presence marks a complete checkpoint.
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out
