"""Rows of a table read from its file as lookups ask for them: the PLE table, one row a token.

A table left in the memory map costs no RAM until it is touched, but a touched page then counts in
this process's memory, and a file in the page cache sits there in large folios (touching one row
maps a whole folio). Dropping the table from the page cache at load kept the memory honest but sent
each new token's row to the disk: 2-3.5 ms of a full-size E2B decode step. `pread` copies the row
out of the page cache instead: nothing of the table is mapped here, and a row read once stays
cached (by the kernel, outside this process) for the next time."""

from __future__ import annotations

import math
import os
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .safetensors_io import DTYPES, TensorInfo


class FileRows:
    """`table[ids]` for a row-major table of `shape` and `dtype` stored at byte `start` of a file."""

    def __init__(self, path: Path, start: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.start, self.shape, self.dtype = Path(path), start, tuple(shape), dtype
        self.row_shape = self.shape[1:]
        self.row_bytes = math.prod(self.row_shape) * dtype.itemsize
        self._for: Tensor | None = None  # the loaded tensor whose lookups this serves (see stand_in_for)
        self._version: int | None = None
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        if hasattr(os, "posix_fadvise"):  # (not on macOS) scattered rows: a read brings in its pages, not a read-ahead window
            os.posix_fadvise(self._fd, start, self.nbytes, os.POSIX_FADV_RANDOM)

    @classmethod
    def of(cls, info: TensorInfo) -> FileRows:
        """A safetensors file's tensor."""
        return cls(info.file, info.start, info.shape, DTYPES[info.dtype])

    def stand_in_for(self, tensor: Tensor) -> FileRows:
        """Serve lookups of `tensor` (the same bytes, mapped) while it stays that tensor, unwritten."""
        self._for, self._version = tensor, _version(tensor)
        return self

    def stands_in_for(self, tensor: Tensor) -> bool:
        """Whether `tensor` is still the one this stands in for, with nothing written into it since (its
        version counter: a weight edited in place is read from the edited tensor, not the file)."""
        return tensor is self._for and _version(tensor) == self._version

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __getitem__(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1).tolist()
        if any(not 0 <= i < self.shape[0] for i in flat):
            raise IndexError(f"row ids {min(flat)}..{max(flat)} outside a table of {self.shape[0]} rows")
        out = torch.empty((len(flat), self.row_bytes), dtype=torch.uint8)
        for row, i in zip(out.numpy(), flat):
            if os.preadv(self._fd, [row], self.start + i * self.row_bytes) != self.row_bytes:
                raise CheckpointError(f"{self.path.name}: truncated (row {i} of a table ends past the file's end); download it again")
        return out.view(self.dtype).view(*ids.shape, *self.row_shape)

    def __repr__(self) -> str:
        return f"FileRows({self.path.name}, {self.shape[0]} rows of {list(self.row_shape)} {self.dtype})"


def read_rows_from_files(model: nn.Module, tables: dict[str, FileRows]) -> None:
    """Have each row-read table's module look the rows of its tensors (by name: a float table's weight, a
    packed one's codes, scales and offsets) up in their files while those tensors stay as loaded."""
    for name, rows in tables.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module.stored_rows[attr] = rows.stand_in_for(getattr(module, attr))


def _version(tensor: Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version  # (tensors made under inference_mode keep no count)
