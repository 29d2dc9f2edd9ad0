"""The C heap's policy for a prompt chunk's large, short-lived tensors.

glibc serves a request above its mmap threshold (at most 32 MB unless set) with fresh pages from the
kernel and unmaps them on free, so a prompt chunk's large activations (a 512-token 26B-A4B chunk's routed
rows are 46 MB each, several a layer) fault in 4 KB at a time, again at every layer: ~13 ms per 46 MB
here, 12 % of a 512-token 26B-A4B prefill (17.0 -> 15.0 s, alternated runs). With the threshold raised to
the largest of them, such blocks come from the heap and freed ones are reused, as llama.cpp reuses its
compute buffers. Only up to that size: the attention's blocks grow with the context (an E2B global layer's
keys and values read widened are 64 MB each at 32K), so a freed one never fits the next chunk's, and the
heap kept them as holes (a 32K E2B prompt peaked 0.2 GB higher with every block from the heap). Larger
blocks keep coming from mmap and go back to the system when freed."""

from __future__ import annotations

import ctypes
import os

KEPT = 1 << 30  # the free memory the heap keeps at its top (below it, freed blocks are kept wherever they are)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_MB = 1 << 20


def reuse_blocks_up_to(largest: int) -> bool:
    """Serve blocks up to `largest` bytes from the heap, and keep them when freed. Whether this C library
    took it (glibc does; elsewhere nothing changes)."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    threshold = -(-largest // _MB) * _MB + _MB  # (a block of exactly `largest` plus the allocator's header)
    return mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1 and mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(KEPT)) == 1


def release_free() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing): what loading
    made and dropped stays resident otherwise (parsing the release tokenizer.json leaves 180 MB free in the
    heap, beside the 150 MB the tokenizer keeps)."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


def _libc(name: str):  # noqa: ANN202 - a ctypes function
    """The C library's function `name`, where this is POSIX and it has one (glibc's malloc tuning)."""
    return getattr(ctypes.CDLL(None), name, None) if os.name == "posix" else None
