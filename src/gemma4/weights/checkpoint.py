"""Hugging Face checkpoint folders: find the files, check them against config.json, and load
the decoder from memory-mapped safetensors into a model built on the meta device."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import CausalLM
from ..model.multimodal import MediaEncoders
from ..parallel.sharding import WHOLE, Shard
from ..quant.modules import PackedModule, Scheme, is_row_table, pack_modules, pack_state
from ..quant.packed import KINDS
from .file_rows import FileRows, read_rows_from_files
from .layout import TensorSpec, checkpoint_tensors, decoder_prefix, empty, empty_model
from .safetensors_io import SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = ("BF16", "F16", "F32")
QUANT_METHOD = "gemma4"  # config.json's quantization_config.quant_method in checkpoints `gemma4 quantize` wrote

# Names `gemma4.load(path, dtype=...)` accepts besides torch dtypes.
DTYPE_ALIASES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float32": torch.float32,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_ALIASES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_ALIASES:
        return DTYPE_ALIASES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}: use bf16, fp16 or fp32")


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    files: list[SafetensorsFile]
    tensors: dict[str, TensorInfo]  # every tensor in the checkpoint, by name

    def file_of(self, name: str) -> SafetensorsFile:
        info = self.tensors[name]
        return next(f for f in self.files if f.path == info.file)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json and every safetensors header; no tensor data is touched."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a Hugging Face checkpoint folder (config.json + *.safetensors)")
    config = ModelConfig.from_file(folder / "config.json")
    files = [SafetensorsFile(p) for p in _weight_files(folder)]
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in f.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{f.path.name}: tensor {name!r} is also in {tensors[name].file.name}")
            tensors[name] = info
    _check_index(folder, tensors)
    return Checkpoint(folder, config, files, tensors)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        shards = sorted(set(_read_index(index).values()))
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{INDEX_NAME} lists {shard}, which is missing from {folder}: download it again")
        return [folder / s for s in shards]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{folder}: no *.safetensors weight files next to config.json")
    return found


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
        return weight_map
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index.name}: corrupt (no weight_map object); re-download it") from None


def _check_index(folder: Path, tensors: dict[str, TensorInfo]) -> None:
    index = folder / INDEX_NAME
    if not index.is_file():
        return
    for name, shard in _read_index(index).items():
        if name not in tensors or tensors[name].file.name != shard:
            raise CheckpointError(f"{shard}: missing tensor {name!r}, which {INDEX_NAME} says it holds")


def ignorable(name: str, config: ModelConfig) -> bool:
    """K/V weights some exports keep for KV-shared layers; the reference ignores them too."""
    prefix = decoder_prefix(config)
    if not name.startswith(prefix + "layers."):
        return False
    parts = name.removeprefix(prefix).split(".")
    if len(parts) < 4 or parts[2] != "self_attn" or parts[3] not in ("k_proj", "v_proj", "k_norm", "v_norm"):
        return False
    layer = int(parts[1])
    return layer < config.text.num_hidden_layers and config.text.num_hidden_layers - layer <= config.text.num_kv_shared_layers


def quant_config(checkpoint: Checkpoint) -> dict | None:
    """The settings of a checkpoint `gemma4 quantize` wrote; None for a float checkpoint."""
    found = checkpoint.config.raw.get("quantization_config")
    if not isinstance(found, dict) or found.get("quant_method") != QUANT_METHOD:
        return None
    if found.get("kind") not in KINDS:
        raise CheckpointError(f"{checkpoint.path}/config.json: quantization kind {found.get('kind')!r} is not one of {', '.join(KINDS)}")
    return found


def validate(checkpoint: Checkpoint) -> list[TensorSpec]:
    """Check every tensor against what config.json implies; return the expected layout.
    (A quantized checkpoint's packed tensors are checked as they load.)"""
    expected = checkpoint_tensors(checkpoint.config)
    if quant_config(checkpoint) is not None:
        return expected
    names = {s.name for s in expected}
    for spec in expected:
        info = checkpoint.tensors.get(spec.name)
        if info is None:
            raise CheckpointError(
                f"{checkpoint.path}: missing tensor {spec.name!r} (config.json implies it); the checkpoint is incomplete"
            )
        if info.shape != spec.shape:
            raise CheckpointError(
                f"{info.file.name}: tensor {spec.name!r} has shape {list(info.shape)}, but config.json implies "
                f"{list(spec.shape)}: the weights do not belong to this config"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file.name}: tensor {spec.name!r} has dtype {info.dtype}; expected one of {', '.join(FLOAT_DTYPES)}"
            )
    for name, info in checkpoint.tensors.items():
        if name not in names and not ignorable(name, checkpoint.config):
            raise CheckpointError(
                f"{info.file.name}: unexpected tensor {name!r}, which a Gemma 4 model with this config.json does not have"
            )
    return expected


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.bfloat16,
    progress: bool = True,
    quant: str | None = None,
    group: int = 0,
    pack_tables: bool = False,
    shard: Shard = WHOLE,
) -> CausalLM:
    """Load the text decoder of the checkpoint at `path`. Weights already in `dtype` stay
    memory-mapped (no copy); row-read tables keep their stored dtype.

    quant: pack the matrices as "bf16", "int8" or "int4" (group: columns per int4/int8 scale) and
    compute in fp32 on the packed kernels; `dtype` is then ignored. The PLE table stays as stored
    (memory-mapped) unless pack_tables. A checkpoint saved quantized loads as it was saved.
    shard: load only this rank's part of the model (tensor parallelism); nothing else is read."""
    checkpoint = open_checkpoint(path)
    from .quantized import load_quantized

    if (settings := quant_config(checkpoint)) is not None:
        return load_quantized(checkpoint, settings, shard)
    dtype = torch.float32 if quant else resolve_dtype(dtype)
    validate(checkpoint)
    model = empty_model(checkpoint.config.text, shard)
    prefix = decoder_prefix(checkpoint.config)
    stored = {name: checkpoint.tensors[_checkpoint_name(name, prefix)] for name in model.state_dict()}
    packed = pack_modules(model, Scheme(quant, group, tables=quant if pack_tables else None)) if quant else {}
    state, in_file = {}, {}
    total = sum(info.end - info.start for info in stored.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", delay=1.0, disable=not progress, leave=False) as bar:
        for name, info in stored.items():
            file = checkpoint.file_of(info.name)
            whole = file.tensor(info.name)
            tensor = shard.cut(name, whole)
            if name in packed:
                loaded = pack_state(name, tensor, *packed[name])
            elif not is_row_table(name):
                loaded = {name: tensor.to(dtype)}
            else:  # left in the file, which its rows are read from
                loaded = {name: tensor}
                in_file[name] = FileRows.of(info)
            file.release_unless_kept(info.name, whole, loaded.values())  # converted or copied: the file's pages need not stay resident
            state.update(loaded)
            bar.update(info.end - info.start)
    install(model, state)
    read_rows_from_files(model, in_file)
    return model.eval()


def load_encoders(path: str | Path, dtype: torch.dtype | str = torch.float32) -> MediaEncoders:
    """The vision and audio encoders of the checkpoint at `path`, with their embedders, computing
    in `dtype`. Weights already in it stay memory-mapped; bf16 matrices computing in fp32 stay bf16
    and mapped too (packed: the kernels widen them as they read). A checkpoint without encoders
    gives an empty module."""
    checkpoint = open_checkpoint(path)
    dtype = resolve_dtype(dtype)
    encoders = empty(lambda: MediaEncoders(checkpoint.config))
    names = list(encoders.state_dict())
    for name in names:
        if "model." + name not in checkpoint.tensors:
            raise CheckpointError(f"{checkpoint.path}: missing tensor {'model.' + name!r} (config.json implies it); the checkpoint is incomplete")
    stored_bf16 = all(checkpoint.tensors["model." + n].dtype == "BF16" for n in names if n.endswith("weight"))
    packed = pack_modules(encoders, Scheme("bf16")) if dtype == torch.float32 and stored_bf16 else {}
    state = {}
    for name in names:
        tensor = checkpoint.file_of("model." + name).tensor("model." + name)
        state.update(pack_state(name, tensor, "bf16", 0) if name in packed else {name: tensor.to(dtype)})
    install(encoders, state)
    return encoders.eval()


def install(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors into a model built on the meta device (parameters and packed buffers alike)."""
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        elif attr in module._buffers:
            module._buffers[attr] = tensor
        else:
            raise CheckpointError(f"unexpected tensor {name!r} for this model")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    left += [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, PackedModule) for p in m.packed_names if getattr(m, p) is None]
    if left:
        raise CheckpointError(f"missing tensor {left[0]!r} (and {len(left) - 1} more)")


def _checkpoint_name(name: str, prefix: str) -> str:
    return prefix + name.removeprefix("model.") if name.startswith("model.") else name
