"""The two int4 layouts. Both keep 4-bit codes in 32-column blocks of 16 bytes, byte j holding
column j in its low nibble and column j + 16 in its high one (llama.cpp's Q4 order).

Rows, for tables read a row at a time (the PLE table): codes uint8 [..., N, K/2], scales and
offsets [..., N, G]. A lookup touches its own row only.

Tiles, for matrices that are multiplied: 8 rows x 32 columns in 128 bytes, codes uint8
[..., N/8, K/32, 128], scales and offsets [..., N/8, G, 8]. Chunk c (32 bytes) of a tile holds
row c's block, then row c + 4's. So a one-token matmul reads a single stream, 8 rows per 32-byte
vector pair, and its integer dot products come out as one vector of 8 rows in order, ready for
the 8 rows' scales loaded as one vector (kernels/int4.c)."""

from __future__ import annotations

import torch
from torch import Tensor

TILE_ROWS = 8


def pack(values: Tensor) -> Tensor:
    """uint8 codes 0..15 [..., K] (K a multiple of 32) -> row-layout codes [..., K/2]."""
    blocks = values.view(*values.shape[:-1], -1, 32)
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).flatten(-2).contiguous()


def unpack(codes: Tensor) -> Tensor:
    """Row-layout codes [..., K/2] -> uint8 codes [..., K]."""
    blocks = codes.view(*codes.shape[:-1], -1, 16)
    return torch.cat((blocks & 15, blocks >> 4), dim=-1).flatten(-2)


def tileable(N: int) -> bool:
    return N % TILE_ROWS == 0


def tile(codes: Tensor, per_group: list[Tensor | None]) -> tuple[Tensor, list[Tensor | None]]:
    """Row layout -> tiles: codes [..., N, K/2] and each of scales/offsets [..., N, G]."""
    *lead, N, half = codes.shape
    # row n = 8 t + 4 h + c: [t, h, c, block, 16] -> [t, block, c, h, 16]
    blocks = codes.reshape(*lead, N // 8, 2, 4, half // 16, 16)
    tiled = _swap_half_and_block(blocks).reshape(*lead, N // 8, half // 16, 128).contiguous()
    return tiled, [None if t is None else t.reshape(*lead, N // 8, 8, -1).transpose(-1, -2).contiguous() for t in per_group]


def untile(codes: Tensor, per_group: list[Tensor | None]) -> tuple[Tensor, list[Tensor | None]]:
    """Tiles -> row layout (the inverse of `tile`)."""
    *lead, T, blocks, _ = codes.shape
    rows = _swap_half_and_block(codes.reshape(*lead, T, blocks, 4, 2, 16)).reshape(*lead, T * 8, blocks * 16)
    return rows, [None if t is None else t.transpose(-1, -2).reshape(*lead, T * 8, -1) for t in per_group]


def _swap_half_and_block(t: Tensor) -> Tensor:
    """[..., a, b, c, 16] -> [..., c, b, a, 16]: between rows [t, h, c, block] and tiles [t, block, c, h]."""
    return t.transpose(-4, -2)


def tile_rows(codes: Tensor, per_group: list[Tensor | None], ids: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    """Rows `ids` of a tiled 2-D weight, in row layout; only their tiles are read."""
    T, blocks, _ = codes.shape
    t, i = ids // 8, ids % 8
    picked = codes.view(T, blocks, 4, 2, 16)[t, :, i % 4, i // 4].reshape(len(ids), blocks * 16)
    return picked, [None if s is None else s[t, :, i] for s in per_group]
