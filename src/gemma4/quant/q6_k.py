"""GGUF's Q6_K blocks, held as the file stores them: 210 bytes per 256 weights (ql: 4 low bits,
qh: 2 high bits, 16 int8 scales, an fp16 d; w = d * scale * (code - 32) per 16 columns). The
tied embedding of llama.cpp's 4-bit files is Q6_K, and as the LM head it is read whole every
token: unpacked to int8 codes and fp32 scales it took 1.25 bytes a weight, 1.5x the file's
(the 26B-A4B's head: 923 MB a token against 605). The matmul kernel (kernels/matmul.c) reads
the blocks as they are; prompts and embedding rows unpack them (here)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import kernels

BLOCK_VALUES, BLOCK_BYTES = 256, 210


def columns(row_bytes: int) -> int:
    return row_bytes // BLOCK_BYTES * BLOCK_VALUES


def unpack(blocks: np.ndarray) -> tuple[Tensor, Tensor]:
    """Blocks uint8 [B, 210] -> int8 codes (-32..31) [B, 256] and fp32 scales d * scale [B, 16]."""
    blocks = np.ascontiguousarray(blocks)
    if kernels.available():
        return kernels.unpack_q6_k(blocks)
    ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208].view(np.int8), blocks[:, 208:210].copy().view(np.float16)
    parts = []
    for h in range(2):  # ggml-quants.c's dequantize_row_q6_K: two halves of 128, four 32-runs each
        low, top = ql[:, 64 * h : 64 * h + 64], qh[:, 32 * h : 32 * h + 32]
        parts += [
            (low[:, :32] & 15) | ((top & 3) << 4),
            (low[:, 32:] & 15) | (((top >> 2) & 3) << 4),
            (low[:, :32] >> 4) | (((top >> 4) & 3) << 4),
            (low[:, 32:] >> 4) | (((top >> 6) & 3) << 4),
        ]
    codes = np.concatenate(parts, axis=1).astype(np.int16) - 32
    return torch.from_numpy(codes.astype(np.int8)), torch.from_numpy(d.astype(np.float32) * sc.astype(np.float32))


def dequantize(rows: Tensor) -> Tensor:
    """Rows of blocks uint8 [n, K / 256 * 210] -> fp32 [n, K]."""
    n = rows.shape[0]
    codes, scales = unpack(rows.contiguous().numpy().reshape(-1, BLOCK_BYTES))
    return (codes.float().view(-1, 16, 16) * scales[..., None]).view(n, -1)
