"""Pages of memory-mapped tables that need not stay mapped: after a lookup of a few rows of the
PLE table, `release` unmaps what was read. The pages are clean copies of the file, so they stay in
the page cache (a later read of the same row is a minor fault) and the OS reclaims them as it
needs; the process holds only the rows of the tokens at hand, whatever the context length."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import numpy as np
from torch import Tensor

_MADV_DONTNEED = 4  # Linux (and the BSDs): drop the mapping's pages; file pages come back on access


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None  # elsewhere the table's pages stay mapped: correct, only larger
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def mapped_pages(*arrays: Tensor | np.ndarray | None) -> FilePages | None:
    """FilePages of arrays that are views into a memory-mapped file, else None (a copy in anonymous
    memory, e.g. of misaligned data, must never be dropped: its pages would come back as zeros)."""
    present = [a for a in arrays if a is not None]
    for a in present:
        in_file = a.untyped_storage().nbytes() > a.nbytes if isinstance(a, Tensor) else isinstance(_root(a), np.memmap)
        if not in_file:
            return None
    return FilePages(*present)


def _root(a: np.ndarray) -> object:
    while isinstance(a, np.ndarray) and a.base is not None and not isinstance(a, np.memmap):
        a = a.base  # type: ignore[assignment]
    return a


class FilePages:
    """The whole pages inside memory-mapped, file-backed arrays (see mapped_pages)."""

    _call = _madvise()

    def __init__(self, *arrays: Tensor | np.ndarray):
        self.ranges = []
        for a in arrays:
            address, nbytes = (a.data_ptr(), a.nbytes) if isinstance(a, Tensor) else (a.ctypes.data, a.nbytes)
            start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE  # inward: pages shared with neighbours stay
            end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
            if end > start:
                self.ranges.append((start, end - start))

    def release(self) -> None:
        if self._call is not None:
            for start, length in self.ranges:
                self._call(start, length, _MADV_DONTNEED)
