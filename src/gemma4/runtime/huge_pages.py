"""The weights every decode step streams, held in 2 MB pages.

A step reads each packed matrix once (1.2 GB for E2B int4). Through 4 KB pages a thread's stream
crosses a page every 64 cache lines, where the TLB misses and the hardware prefetcher stops; from
transparent huge pages (2 MB, asked for with madvise) the one-token int4 kernel read 10-20 % faster on
an Intel Xeon, a plain read of memory (kernels/bandwidth.c) ~25 %, and an E2B int4 step took 0.88x
the time (benchmarks/results.md).

Loaders leave those tensors in 4 KB pages: views into the checkpoint's file mapping (saved int4 and
int8, GGUF blocks) or heap blocks (repacked or quantized at load). `gather_streamed_weights` copies
them into one anonymous mapping advised MADV_HUGEPAGE and drops the file pages behind the originals,
so each weight is held once. The tables read a row at a time (the per-layer embeddings, left on disk)
stay where they are, and so do heap blocks over 64 MB (a copy of one would raise the load's peak). Linux only; elsewhere, or with huge pages off, nothing moves."""

from __future__ import annotations

import bisect
import ctypes
import functools
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..model.transformer import CausalLM
from ..quant.modules import SUFFIXES, PackedEmbedding, PackedLinear, PackedModule
from . import heap

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor's start: a cache line, as the kernels' loads want it
_TRIM_EVERY = 64 << 20  # bytes of heap-held originals freed between returns of the heap's free pages
# Larger heap-held originals stay: copying one raised a load's peak by its size (a Q4_0 E2B GGUF's 315 MB LM
# head table: 2.09 GB against the 1.88 planned), and there it was in huge pages already (0.32 GB of them before).
_LARGEST_HEAP_COPY = 64 << 20
_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this system gives huge pages to a mapping that asks for them ("[always]" or "[madvise]")."""
    try:
        return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in _SETTING.read_text()
    except OSError:
        return False


def allocate(nbytes: int) -> Tensor:
    """uint8 [nbytes], zeroed, starting on a huge page, in a mapping advised to use them (4 KB pages
    where the system gives none). The tensor keeps the mapping alive."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if available():
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def gather_streamed_weights(lm: CausalLM, progress: bool = False) -> int:
    """Move the packed matrices every decode step streams whole (each PackedLinear's, and the embedding
    table where it is also the LM head) into huge pages; the byte-identical copies replace them in their
    modules. Returns the bytes moved (0 where huge pages are not available). `progress`: a bar where it
    takes over a second (fresh memory can fault in slowly: 10-16 s for bf16 E2B in a VM whose host took
    back the guest's free blocks).

    Not the experts: a step reads a few of each MoE layer's (8 of the 26B-A4B's 128), and moving
    all of them would cost seconds of loading. Each original is released as it is copied (the heap's
    free pages returned every 64 MB), so loading peaks at most ~128 MB higher."""
    if not available():
        return 0
    holders: list[PackedModule] = [m for m in lm.modules() if isinstance(m, PackedLinear)]
    if lm.lm_head is None and isinstance(lm.model.embed_tokens, PackedEmbedding):
        holders.append(lm.model.embed_tokens)
    if not holders:  # (a model of plain Linear layers: no need to read this process's mappings)
        return 0
    files = _FileMappings()
    originals: dict[int, Tensor] = {}
    places: dict[int, list[tuple[PackedModule, str]]] = {}  # each original's (module, buffer name)s: a table may be tied
    for module in holders:
        for name in (n + s for n in module.packed_names for s in SUFFIXES):
            t = module._buffers.get(name)
            if t is not None and (t.nbytes <= _LARGEST_HEAP_COPY or files.of(t)):
                originals[id(t)] = t
                places.setdefault(id(t), []).append((module, name))
    if not originals:
        return 0
    arena = allocate(sum(_aligned(t.nbytes) for t in originals.values()))
    offset, freed = 0, 0
    with tqdm(total=arena.numel(), unit="B", unit_scale=True, desc="into huge pages", delay=1.0, disable=not progress, leave=False) as bar:
        for key, where in places.items():
            original = originals.pop(key)  # (the last reference to a heap-held one, once its modules let go)
            copy = arena[offset : offset + original.nbytes]
            mapping = files.of(original)
            _copy_releasing(original, copy, mapping)
            for module, name in where:
                module._buffers[name] = copy.view(original.dtype).view(original.shape)
                module._views.clear()  # (their PackedTensor views held the originals)
            offset += _aligned(original.nbytes)
            bar.update(_aligned(original.nbytes))
            freed += 0 if mapping else original.nbytes
            del original
            if freed >= _TRIM_EVERY:  # the heap keeps what it frees, beside the growing copies (60 MB of a Q4_0 E2B GGUF's load)
                heap.release_free()
                freed = 0
    return offset


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _FileMapping:
    start: int
    end: int
    offset: int  # of `start` in the file
    path: str  # (ending " (deleted)" where the file is gone from its folder, replaced or removed)
    written: bool  # whether any of its pages were written (copied on write: no longer the file's bytes)


class _FileMappings:
    """This process's file-backed mappings (/proc/self/smaps), by start."""

    def __init__(self) -> None:
        found, current = [], None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line: range, perms, offset, device, inode, path
                current = fields if len(fields) >= 6 and fields[4] != "0" else None
            elif current is not None and fields[0] == "Anonymous:":
                start, end = (int(a, 16) for a in current[0].split("-"))
                found.append(_FileMapping(start, end, int(current[2], 16), " ".join(current[5:]), int(fields[1]) > 0))
        self.mappings = sorted(found, key=lambda m: m.start)
        self.starts = [m.start for m in self.mappings]

    def of(self, t: Tensor) -> _FileMapping | None:
        """The mapping all of t's bytes lie in, if a file's."""
        i = bisect.bisect_right(self.starts, t.data_ptr()) - 1
        return self.mappings[i] if i >= 0 and t.data_ptr() + t.nbytes <= self.mappings[i].end else None


def _copy_releasing(original: Tensor, into: Tensor, mapping: _FileMapping | None) -> None:
    """Copy contiguous `original`'s bytes into `into`. From a file mapping whose pages still hold the
    file's bytes, they are read from the file (a copy through the mapping faulted its pages in 4 KB at a
    time: 1.7 ms a MB against 0.5), and the original's pages are dropped (clean pages of a file: read
    again, they would come back from it)."""
    if mapping is None or mapping.written or not _read_file(mapping, original.data_ptr() - mapping.start, into):
        into.copy_(original.reshape(-1).view(torch.uint8))
    if mapping is not None:
        _drop_pages(original)


def _read_file(mapping: _FileMapping, at: int, into: Tensor) -> bool:
    """Read len(into) bytes at `at` in the mapping from its file; False where that file cannot be read
    (gone from its folder since it was mapped: the mapping holds the only copy)."""
    try:
        file = open(mapping.path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError:
        return False
    with file:
        view, at = memoryview(into.numpy()), mapping.offset + at
        while len(view):
            read = os.preadv(file.fileno(), [view], at)
            if read <= 0:
                return False
            view, at = view[read:], at + read
    return True


def _drop_pages(t: Tensor) -> None:
    """MADV_DONTNEED over the whole pages inside t's bytes."""
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.nbytes) // page * page
    if end > start:
        _madvise()(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


@functools.cache
def _madvise():  # noqa: ANN202 - a ctypes function
    return ctypes.CDLL(None).madvise
