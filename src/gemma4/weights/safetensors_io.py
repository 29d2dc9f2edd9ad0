"""safetensors files, read through a memory map and written one tensor at a time.

The `safetensors` package copies every tensor it returns into fresh memory and can only write
a file whose tensors are all in RAM at once. A checkpoint is just an 8-byte header length,
a JSON header and raw little-endian data, so we read views straight out of a private memory
map (pages come from the page cache, only when touched) and stream writes; files we write are
read back by the `safetensors` package in the tests.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int
    file: Path


class SafetensorsFile:
    """One .safetensors file: its header on open, tensors as zero-copy views on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors, self.metadata = _read_header(path)
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    def tensor(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if self._bytes is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: a private mapping, so nothing can ever write back to the user's file.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        raw = self._bytes[info.start : info.end]
        dtype = DTYPES[info.dtype]
        if info.start % dtype.itemsize:
            raw = raw.clone()  # misaligned data (a non-conforming writer): copy rather than fail
        return raw.view(dtype).view(info.shape)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process once a converted copy replaced it (they are
        clean and private: read again, they would come back from the file)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, *self._pages(name))

    def release_unless_kept(self, name: str, whole: torch.Tensor, kept: Iterable[torch.Tensor | None]) -> None:
        """`release` tensor `name` (mapped as `whole`) unless one of `kept` is still a view of it."""
        mapped = whole.untyped_storage().data_ptr()
        if all(t is None or t.untyped_storage().data_ptr() != mapped for t in kept):
            self.release(name)

    def _pages(self, name: str) -> tuple[int, int]:
        """(start, length) of a tensor's bytes widened to the page it starts in, as madvise needs."""
        info = self.tensors[name]
        start = info.start - info.start % mmap.PAGESIZE
        return start, info.end - start


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path.name}: truncated ({size} bytes, too short for a safetensors header)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path.name}: truncated or not a safetensors file (header of {header_len} bytes, file of {size})"
            )
        try:
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({e}); re-download the file") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has dtype {dtype}, which this engine cannot read")
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * DTYPES[dtype].itemsize or start > end:
            raise CheckpointError(f"{path.name}: corrupt header: tensor {name!r} byte range does not match its shape")
        if data_start + end > size:
            raise CheckpointError(
                f"{path.name}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}; re-download it"
            )
        tensors[name] = TensorInfo(name, dtype, shape, data_start + start, data_start + end, path)
    return tensors, metadata


@dataclass(frozen=True)
class TensorToWrite:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Callable[[], Iterable[torch.Tensor]]  # yields the tensor's data, flattened, in order

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


def write_safetensors(
    path: Path, tensors: list[TensorToWrite], metadata: dict[str, str], on_bytes: Callable[[int], None] = lambda n: None
) -> None:
    """Stream `tensors` into `path`, holding one chunk in memory at a time. Writes to a
    temporary name first so an interrupted run never leaves a file that looks complete."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in sorted(tensors, key=lambda t: t.name):
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in sorted(tensors, key=lambda t: t.name):
            written = 0
            for chunk in t.chunks():
                data = chunk.to(t.dtype).contiguous().view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
                on_bytes(data.nbytes)
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
    os.replace(partial, path)
