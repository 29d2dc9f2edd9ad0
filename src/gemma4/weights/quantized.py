"""Quantized checkpoints: a Hugging Face folder whose decoder matrices are stored packed (codes,
scales, offsets as `gemma4 quantize` wrote them), so a reload memory-maps them without re-quantizing.

config.json keeps the source model's config plus
    "quantization_config": {"quant_method": "gemma4", "kind": "int4", "group_size": 64}
and each packed parameter `p` is stored as `p` (codes), `p_scale` and `p_offset`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import CheckpointError
from ..model import CausalLM
from ..quant.modules import SUFFIXES, Scheme, is_row_table, pack_modules
from ..quant.packed import PackedTensor
from .checkpoint import INDEX_NAME, QUANT_METHOD, Checkpoint, _checkpoint_name, install, load_model, open_checkpoint
from .file_rows import FileRows, read_rows_from_files
from ..parallel.sharding import WHOLE, Shard
from .layout import decoder_prefix, empty_model

SHARD_BYTES = 2 << 30
ENCODER_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")


def save_quantized(source: str | Path, target: str | Path, kind: str, group: int = 0, progress: bool = True) -> Path:
    """Quantize the decoder of `source` (every matrix and table, the PLE table included) into `target`;
    its vision and audio encoders are copied as they are."""
    source, target = Path(source), Path(target)
    if target.exists() and any(target.iterdir()):
        raise CheckpointError(f"{target}: exists and is not empty; choose a new folder")
    checkpoint = open_checkpoint(source)
    lm = load_model(source, progress=progress, quant=kind, group=group, pack_tables=True)
    prefix = decoder_prefix(checkpoint.config)
    state = {_checkpoint_name(name, prefix): t.contiguous() for name, t in lm.state_dict().items()}
    # The encoders go as stored: quantized, they lose what they see and hear (and they are small).
    for name, info in checkpoint.tensors.items():
        if name.startswith(ENCODER_PREFIXES):
            state[name] = checkpoint.file_of(name).tensor(name).contiguous()
    target.mkdir(parents=True, exist_ok=True)
    shards = _shards(state)
    weight_map = {}
    for i, names in enumerate(tqdm(shards, desc="writing", unit="shard", disable=not progress, leave=False)):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, target / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (target / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = dict(checkpoint.config.raw)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "kind": kind, "group_size": group}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for extra in source.iterdir():  # tokenizer, chat template, generation config
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", INDEX_NAME):
            shutil.copy2(extra, target / extra.name)
    return target


def _shards(state: dict[str, torch.Tensor]) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        if size and size + t.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    return shards


def load_quantized(checkpoint: Checkpoint, settings: dict, shard: Shard = WHOLE) -> CausalLM:
    """A checkpoint saved by save_quantized: packed tensors are memory-mapped as they are (a shard's
    parts of them copied out where they are not whole rows)."""
    model = empty_model(checkpoint.config.text, shard)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    packed = pack_modules(model, Scheme(settings["kind"], settings.get("group_size", 0), tables=settings["kind"]))
    prefix = decoder_prefix(checkpoint.config)
    state, in_file = {}, {}
    for name, shape in shapes.items():
        stored = _checkpoint_name(name, prefix)
        names = [stored + s for s in SUFFIXES] if name in packed else [stored]
        if stored not in checkpoint.tensors:
            raise CheckpointError(f"{checkpoint.path}: missing tensor {stored!r}; the quantized checkpoint is incomplete")
        tensors = [checkpoint.file_of(n).tensor(n) if n in checkpoint.tensors else None for n in names]
        if is_row_table(name):  # left in the file, which its rows (codes, scales and offsets) are read from
            in_file |= {our: FileRows.of(checkpoint.tensors[n]) for our, n in zip([name + s for s in SUFFIXES], names) if n in checkpoint.tensors}
        held = shard.cut_packed(name, PackedTensor.of(*tensors, dims=len(shape))) if name in packed else shard.cut(name, tensors[0])
        parts = [held.codes, held.scales, held.offsets] if name in packed else [held]
        for n, whole, part in zip(names, tensors, parts):
            if whole is not None:  # a rank's copied part: the file's pages need not stay resident
                checkpoint.file_of(n).release_unless_kept(n, whole, [part])
        tensors = parts
        if tuple(held.shape) != shape:
            raise CheckpointError(f"{checkpoint.path}: tensor {stored!r} holds shape {list(held.shape)}, but config.json implies {list(shape)}")
        if isinstance(held, PackedTensor) and held.tileable and not is_row_table(name):
            raise CheckpointError(f"{checkpoint.path}: int4 weights in an older layout; quantize the source checkpoint again (gemma4 quantize)")
        for our, t in zip([name + s for s in SUFFIXES], tensors):
            if t is not None:
                state[our] = t if name in packed else t.float()
    install(model, state)
    read_rows_from_files(model, in_file)
    return model.eval()
