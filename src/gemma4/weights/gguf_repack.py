"""GGUF quantized blocks -> our packed formats, losslessly and without a float copy: every
llama.cpp type here is w = scale * code + offset over small groups, so the codes move into our
int4 (4-bit types) or int8 (5-bit types) layouts and each group's scale and offset into fp16
where that is exact (Q4_0, Q4_1), fp32 otherwise. Q6_K stays as stored (quant/q6_k.py).

Block layouts follow ggml-quants.c; tests check each against gguf.quants.dequantize."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .. import kernels
from ..quant import int4
from ..quant.packed import PackedTensor
from .file_rows import FileRows

BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, as fp32 [B, 1]."""
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """Bytes [B, n] -> 2n nibbles: all low nibbles, then all high ones."""
    return np.concatenate((qs & 15, qs >> 4), axis=1)


def _bits(qh: np.ndarray, count: int) -> np.ndarray:
    """[B, 4] bytes of a little-endian bit field -> [B, count] bits."""
    return np.unpackbits(qh, axis=1, bitorder="little")[:, :count]


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes of a Q4_K/Q5_K super-block (get_scale_min_k4)."""
    q = scales.astype(np.uint8)
    sc = np.concatenate((q[:, 0:4] & 63, (q[:, 8:12] & 15) | ((q[:, 0:4] >> 6) << 4)), axis=1)
    mn = np.concatenate((q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)), axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_codes(qs: np.ndarray, high_bits: np.ndarray | None) -> np.ndarray:
    """Q4_K/Q5_K codes [B, 256]: chunk c of 32 bytes holds sub-block 2c in low nibbles, 2c+1 in high ones;
    Q5_K adds bit 2c (resp. 2c+1) of qh[l] as the fifth bit of element l of that sub-block."""
    chunks = []
    for c in range(4):
        low, high = qs[:, 32 * c : 32 * c + 32] & 15, qs[:, 32 * c : 32 * c + 32] >> 4
        if high_bits is not None:
            low = low | (((high_bits >> (2 * c)) & 1) << 4)
            high = high | (((high_bits >> (2 * c + 1)) & 1) << 4)
        chunks += [low, high]
    return np.concatenate(chunks, axis=1)


def repack(data: np.ndarray, type_name: str, shape: tuple[int, ...], tiled: bool = False) -> PackedTensor:
    """Raw blocks (uint8 [..., row bytes]) of a tensor of `shape` -> a PackedTensor of that shape
    (int4 in the matmul kernel's tiles where `tiled` and the rows allow)."""
    *rows, K = shape
    if tiled and type_name == "Q4_0" and kernels.available() and int4.tileable(rows[-1]):
        codes, scales = kernels.tile_q4_0(np.ascontiguousarray(data), math.prod(rows), K)
        stacked = lambda t: t.view(*rows[:-1], rows[-1] // 8, *t.shape[1:])  # noqa: E731 - experts [E, N/8, ...]
        return PackedTensor.of(stacked(codes), stacked(scales), dims=len(shape))
    b = np.ascontiguousarray(data).reshape(-1, BLOCK_BYTES[type_name])
    offsets = None  # (int4: the Q4_0 grid)
    if type_name == "Q8_0":
        codes, scales, group = b[:, 2:].view(np.int8), _f16(b, 0), 32
    elif type_name in ("Q4_0", "Q4_1"):
        codes, scales, group = b[:, -16:], _f16(b, 0), 32  # already our int4 layout
        offsets = None if type_name == "Q4_0" else _f16(b, 2)
    elif type_name in ("Q5_0", "Q5_1"):
        d, qh = _f16(b, 0), b[:, -20:-16]
        codes, scales, group = _low_high(b[:, -16:]) | (_bits(qh, 32) << 4), d, 32
        if type_name == "Q5_0":
            codes = codes.astype(np.int8) - 16
        else:
            offsets = _f16(b, 2)
    elif type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scales(b[:, 4:16])
        high_bits = b[:, 16:48] if type_name == "Q5_K" else None
        codes = _k_codes(b[:, -128:], high_bits)
        scales, offsets, group = d * sc, -dmin * mn, 32
        if type_name == "Q4_K":
            codes = int4.pack(torch.from_numpy(np.ascontiguousarray(codes))).numpy()
    elif type_name == "Q6_K":  # kept as stored (quant/q6_k.py)
        # a copy, as every quantized type gets: the loader drops the tensor's mapped pages once repacked
        return PackedTensor("q6_k", torch.from_numpy(np.array(data).reshape(*rows, -1)))
    else:
        raise ValueError(f"no packed form for {type_name}")
    to_torch = lambda a, width: torch.from_numpy(np.ascontiguousarray(a).reshape(*rows, width))  # noqa: E731
    codes_t = to_torch(codes.astype(np.uint8 if type_name in ("Q4_0", "Q4_1", "Q4_K") else np.int8, copy=False), -1)
    G = K // group
    dtype = np.float16 if type_name in ("Q4_0", "Q4_1") else np.float32  # (the file's own fp16 values)
    return PackedTensor.of(codes_t, to_torch(scales.astype(dtype, copy=False), G), None if offsets is None else to_torch(offsets.astype(dtype, copy=False), G), dims=len(shape))


# Bytes per column of what `repack` makes of each type: codes, then each 32-column group's scale and
# offset where it has one (fp16 for Q4_0/Q4_1, fp32 otherwise; Q4_0's is implied); Q6_K as stored.
_LOADED_BYTES_PER_COLUMN = {
    "F32": 4, "F16": 2, "BF16": 2,
    "Q8_0": 1 + 4 / 32, "Q4_0": 0.5 + 2 / 32, "Q4_1": 0.5 + 4 / 32, "Q4_K": 0.5 + 8 / 32,
    "Q5_0": 1 + 4 / 32, "Q5_1": 1 + 8 / 32, "Q5_K": 1 + 8 / 32, "Q6_K": 210 / 256,
}


def loaded_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes a GGUF tensor of this type takes once loaded in its own type (float32 for F32)."""
    return int(np.prod(shape) * _LOADED_BYTES_PER_COLUMN[type_name])


class BlockRows(nn.Module):
    """A row-read table (the PLE table) left in the GGUF file: a lookup reads, repacks and dequantizes
    just the rows it needs, so the table costs no RAM beyond the page cache."""

    def __init__(self, blocks: FileRows, type_name: str, width: int, scale: float):
        super().__init__()
        self.blocks, self.type_name, self.width, self.scale = blocks, type_name, width, scale  # blocks: uint8 [rows, row bytes]

    def forward(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        picked = self.blocks[ids.reshape(-1)].numpy()
        rows = repack(picked, self.type_name, (len(picked), self.width)).dequantize()
        return rows.view(*ids.shape, -1).to(dtype or torch.float32) * self.scale

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def extra_repr(self) -> str:
        return f"{self.type_name}, {self.blocks.shape[0]} rows of {self.width}, in the file"
