"""Rotary tables. Sliding layers rotate every pair (theta 1e4); global layers use proportional
RoPE: theta 1e6 over the full 512-wide head, only the first 25 % of pairs rotate, the rest
are identity. Query tables are built per step from the positions at hand; K=V layers, which rotate
their cached keys on every read, keep one row of rotated pairs per position seen (`KeyRotations`)."""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from ..plan import RopePlan


@cache  # (every step builds query tables from it: not rebuilt each time; never written to)
def inverse_frequencies(rope: RopePlan) -> Tensor:
    """[head_dim // 2] fp32, laid out as transformers' `ROPE_INIT_FUNCTIONS` lay it out.

    The exponent divides by the *whole* head_dim even when only some pairs rotate: that is
    what makes proportional RoPE differ from the usual partial RoPE."""
    exponents = torch.arange(0, 2 * rope.rotated_pairs, 2, dtype=torch.int64).float() / rope.head_dim
    rotated = 1.0 / (rope.theta**exponents)
    identity = torch.zeros(rope.head_dim // 2 - rope.rotated_pairs)
    return torch.cat((rotated, identity)) / rope.factor


def rotary_tables(rope: RopePlan, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [*positions.shape, head_dim], computed in fp32 then cast."""
    freqs = positions[..., None].float() * inverse_frequencies(rope).to(positions.device)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, head_axis: int | None = 2) -> Tensor:
    """x: [B, T, H, D] with cos/sin [B, T, D] (head_axis=2), or cos/sin already broadcastable
    to x (head_axis=None). Pairs are (i, i + D/2)."""
    if head_axis is not None:
        cos, sin = cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


class KeyRotations:
    """cos and sin of the rotated pairs [positions, rotated_pairs] of every position seen so far, the
    values `rotary_tables` gives (fp32, rounded to `dtype`), kept between steps. K=V layers rotate each
    cached key on every read: recomputing the tables of all held keys each step took 0.7 ms at 576
    tokens, 4.5 ms at 4K and 119 ms at 32K (a 26B-A4B global layer's 512-wide head, 2 threads), where a
    step's new rows cost nothing. Rows are added `GROWTH` positions at a time; identity pairs are not
    stored (the 26B-A4B keeps 64 of 256 pairs: 512 bytes a position)."""

    GROWTH = 1024

    def __init__(self, rope: RopePlan, dtype: torch.dtype):
        self.rope, self.dtype = rope, dtype
        self.cos = self.sin = torch.empty(0, rope.rotated_pairs)

    def covering(self, positions: Tensor) -> KeyRotations:
        """Self, with rows for every position up to the largest of `positions`."""
        seen, last = len(self.cos), int(positions.max()) if positions.numel() else -1
        if last >= seen:
            new = torch.arange(seen, (last // self.GROWTH + 1) * self.GROWTH, device=positions.device)
            freqs = new[:, None].float() * inverse_frequencies(self.rope)[: self.rope.rotated_pairs].to(positions.device)
            self.cos = torch.cat((self.cos, freqs.cos().to(self.dtype).float()))
            self.sin = torch.cat((self.sin, freqs.sin().to(self.dtype).float()))
        return self

    def tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [*positions.shape, head_dim] fp32 at positions (>= 0, covered), as rotary_tables'."""
        identity = self.rope.head_dim // 2 - self.rope.rotated_pairs
        halves = []
        for rows, fill in ((self.cos, 1.0), (self.sin, 0.0)):
            half = torch.cat((rows[positions], torch.full((*positions.shape, identity), fill)), dim=-1)
            halves.append(torch.cat((half, half), dim=-1))
        return halves[0], halves[1]
