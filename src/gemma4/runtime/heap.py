"""The C heap's policy for a step's large, short-lived tensors.

glibc serves a request above its mmap threshold (at most 32 MB unless set) with fresh pages from the
kernel and unmaps them on free, so a prompt chunk's large activations (a 512-token 26B-A4B chunk's routed
rows are 46 MB each, several a layer) fault in 4 KB at a time, again at every layer: ~13 ms per 46 MB
here, 12 % of a 512-token 26B-A4B prefill (17.0 -> 15.0 s, alternated runs). With both thresholds raised,
such blocks come from the heap and freed ones are reused, as llama.cpp reuses its compute buffers. The
cost: up to KEPT bytes of freed memory stay with the process between steps instead of going back to
the system (the peak is unchanged: it is the same tensors, live at the same time)."""

from __future__ import annotations

import ctypes
import os

KEPT = 1 << 30  # the largest block served from the heap, and the free memory the heap keeps at its top
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def reuse_large_blocks() -> bool:
    """Serve blocks up to KEPT from the heap and keep them when freed. Whether this C library took it
    (glibc does; elsewhere nothing changes)."""
    if os.name != "posix":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return all(mallopt(option, ctypes.c_int(KEPT)) == 1 for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
