"""Rotary tables. Sliding layers rotate every pair (theta 1e4); global layers use proportional
RoPE: theta 1e6 over the full 512-wide head, only the first 25 % of pairs rotate, the rest
are identity. Tables are built per step from the positions at hand, never for the whole context."""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import RopePlan


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
