"""The GGUF container: metadata and tensor directory, read in one pass over a memory map.

`gguf.GGUFReader` builds a numpy view per array element, which takes ~10 s on a 262K-token
vocabulary; here numeric arrays are single views and strings one decode each (~0.3 s).
Type tables and dequantization still come from the `gguf` package."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # raw: typed for float types, uint8 rows of blocks for quantized ones
    start: int = 0  # where the data starts in the file

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    def release(self) -> None:
        """Drop this tensor's pages from the process once a copy has replaced them (clean pages of a
        read-only map: read again, they come back from the file), so loading holds the copy alone."""
        start = self.start - self.start % mmap.PAGESIZE
        self.data._mmap.madvise(mmap.MADV_DONTNEED, start, self.start + self.data.nbytes - start)  # type: ignore[attr-defined]


class _Cursor:
    def __init__(self, buffer: np.memmap, path: Path):
        self.buffer, self.at, self.path = buffer, 0, path

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.buffer):
            raise CheckpointError(f"{self.path.name}: truncated GGUF header; download the file again")
        view = memoryview(self.buffer)[self.at : self.at + n]
        self.at += n
        return view

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar(10))).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.scalar(4), self.scalar(10)
            if item == STRING:
                return [self.string() for _ in range(count)]
            if item not in _NUMPY:
                return [self.value(item) for _ in range(count)]
            size = np.dtype(_NUMPY[item]).itemsize * count
            return np.frombuffer(self.take(size), dtype=_NUMPY[item]).tolist()
        if kind not in _SCALARS:
            raise CheckpointError(f"{self.path.name}: unknown GGUF value type {kind}")
        return self.scalar(kind)


def read_gguf(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    import gguf

    buffer = np.memmap(path, mode="r")
    cursor = _Cursor(buffer, path)
    if bytes(cursor.take(4)) != b"GGUF":
        raise CheckpointError(f"{path.name}: not a GGUF file (bad magic)")
    version = cursor.scalar(4)
    if version not in (2, 3):
        raise CheckpointError(f"{path.name}: GGUF version {version} is not supported")
    tensor_count, kv_count = cursor.scalar(10), cursor.scalar(10)
    fields = {}
    for _ in range(kv_count):
        key = cursor.string()
        fields[key] = cursor.value(cursor.scalar(4))
    directory = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = tuple(cursor.scalar(10) for _ in range(cursor.scalar(4)))
        directory.append((name, dims, cursor.scalar(4), cursor.scalar(10)))
    alignment = fields.get("general.alignment", 32)
    start = -(-cursor.at // alignment) * alignment
    tensors = []
    for name, dims, kind, offset in directory:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise CheckpointError(f"{path.name}: tensor {name} has unknown ggml type {kind}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows = tuple(reversed(dims))
        if dims[0] % block:
            raise CheckpointError(f"{path.name}: tensor {name} row of {dims[0]} is not a whole number of {qtype.name} blocks")
        row_bytes = dims[0] // block * block_bytes
        n_bytes = row_bytes * int(np.prod(rows[:-1], dtype=np.int64))
        if start + offset + n_bytes > len(buffer):
            raise CheckpointError(f"{path.name}: truncated: tensor {name} ends past the end of the file; download it again")
        raw = buffer[start + offset : start + offset + n_bytes]
        if qtype.name in ("F32", "F16", "F64"):
            data = raw.view(np.dtype(qtype.name.lower().replace("f", "float"))).reshape(rows)
        else:
            data = raw.reshape(*rows[:-1], row_bytes)
        tensors.append(GGUFTensor(name, dims, qtype, data, start + offset))
    return fields, tensors
