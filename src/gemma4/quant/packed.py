"""Packed weights: 16-bit, int8 and int4 matrices that stay in their storage format and are
multiplied by fp32 activations, converted in registers (kernels/matmul.c, kernels/int4.c).

One format per kind, with w = scale[n, g] * code + offset[n, g] over groups of `group` columns:
  bf16, f16: codes are the 16-bit weights themselves (no scale).
  int8: int8 codes [N, K], fp32 scales; group K = per output channel (ours), or 32 (from GGUF
        Q8_0/Q5).
  int4: 4-bit codes in 32-column blocks, scales and offsets in fp16 (ours, GGUF Q4_0/Q4_1) or fp32
        (GGUF Q4_K); in tiles of 8 rows for matmuls, in rows for row-read tables (quant/int4.py).
        "q4_0" quantizes onto llama.cpp's Q4_0 grid (symmetric, groups of 32: offset = -8 scale),
        the grid Google's quantization-aware checkpoints were trained for; it is stored as int4
        without offsets.
  q6_k: GGUF Q6_K blocks as the file stores them, uint8 [N, K / 256 * 210], scales inside
        (quant/q6_k.py).
Offsets are optional: int8 without them is symmetric, int4 without them is the Q4_0 grid (offset
-8 scale, implied: GGUF Q4_0 loads so). Leading dimensions stack experts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from . import int4, q6_k

KINDS = ("bf16", "int8", "int4", "q4_0")  # what users pick; "f16" also exists, for GGUF F16 tensors
DEFAULT_GROUP = {"int8": 0, "int4": 64, "q4_0": 32}  # 0: one group per output channel
STREAMING_MAX_ROWS = 8  # activations rows up to which the streaming kernels beat dequantize + dense matmul
DENSE_BLOCK_BYTES = 8 << 20  # fp32 rows dequantized at once on the dense path: L2-sized blocks (64 MB: 2x slower prompts of 32-128 tokens on E2B int4)


@dataclass(frozen=True)
class PackedTensor:
    kind: str
    codes: Tensor
    scales: Tensor | None = None  # [..., N, K/group]; int4 tiles: [..., N/8, K/group, 8]
    offsets: Tensor | None = None
    group: int = 0  # 0: one group per row
    tiled: bool = False  # int4 only
    fast_math: bool = False  # int8/int4 matmuls round activations to int8 only (llama.cpp's way; changes answers): one-token kernels, and int4 prompts with VNNI

    @classmethod
    def of(cls, codes: Tensor, scales: Tensor | None = None, offsets: Tensor | None = None, dims: int = 2) -> PackedTensor:
        """The format is in the tensors: the codes' dtype names the kind (uint8 without scales: Q6_K
        blocks, which hold theirs), int4 codes with one more dimension than the weight's `dims` are
        tiles, the number of scales per row gives the group."""
        kind = {torch.bfloat16: "bf16", torch.float16: "f16", torch.int8: "int8", torch.uint8: "int4"}[codes.dtype]
        if kind == "int4" and scales is None:
            kind = "q6_k"
        packed = cls(kind, codes, scales, offsets, tiled=kind == "int4" and codes.dim() == dims + 1)
        if scales is None:
            return packed
        groups = scales.shape[-2] if packed.tiled else scales.shape[-1]
        return cls(kind, codes, scales, offsets, packed.shape[-1] // groups, packed.tiled)

    @property
    def group_size(self) -> int:
        return self.group or self.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        if self.tiled:
            *lead, tiles, blocks, _ = self.codes.shape
            return (*lead, tiles * int4.TILE_ROWS, blocks * 32)
        *lead, n, k = self.codes.shape
        return (*lead, n, k * 2 if self.kind == "int4" else q6_k.columns(k) if self.kind == "q6_k" else k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offsets) if t is not None)

    def __getitem__(self, index: int) -> PackedTensor:
        """One matrix of a stack (an expert)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return PackedTensor(self.kind, self.codes[index], pick(self.scales), pick(self.offsets), self.group, self.tiled, self.fast_math)

    @property
    def tileable(self) -> bool:
        """int4 in rows that tiles could hold (a row count that is a multiple of 8)."""
        return self.kind == "int4" and not self.tiled and int4.tileable(self.shape[-2])

    def as_tiles(self) -> PackedTensor:
        """int4 in the tile layout the matmul kernel reads; anything else as it is."""
        if not self.tileable:
            return self
        codes, (scales, offsets) = int4.tile(self.codes, [self.scales, self.offsets])
        return PackedTensor("int4", codes, scales, offsets, self.group, tiled=True)

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        """fp32 [rows, K] of a 2-D weight."""
        if self.kind in ("bf16", "f16"):
            return self.codes[rows].float()
        if self.kind == "q6_k":
            return q6_k.dequantize(self.codes[rows])
        if self.tiled:
            if kernels.available():
                return kernels.dequantize_int4(self.codes, self.scales, self.offsets, self.group_size, rows)  # type: ignore[arg-type]
            codes, (scales, offsets) = int4.untile(self.codes, [self.scales, self.offsets])
            return PackedTensor("int4", codes, scales, offsets, self.group).dequantize(rows)
        codes = self.codes[rows]
        n = codes.shape[0]
        values = int4.unpack(codes) if self.kind == "int4" else codes
        scales = self.scales[rows, :, None].float()  # type: ignore[index]
        w = values.float().view(n, -1, self.group_size) * scales
        if self.offsets is not None:
            w += self.offsets[rows, :, None].float()
        elif self.kind == "int4":
            w += -8 * scales
        return w.view(n, -1)

    def rows(self, ids: Tensor, sources: Sequence[Any] | None = None) -> Tensor:
        """Embedding rows for token ids, fp32 [*ids.shape, K]; only those rows are read: from `sources`
        where given (what the codes, scales and offsets are looked up in: model/layers.py's row_source)."""
        flat = ids.reshape(-1)
        if self.tiled:
            codes, (scales, offsets) = int4.tile_rows(self.codes, [self.scales, self.offsets], flat)
        else:
            codes, scales, offsets = (None if t is None else t[flat].contiguous() for t in sources or (self.codes, self.scales, self.offsets))
        return PackedTensor(self.kind, codes, scales, offsets, self.group).dequantize().view(*ids.shape, -1)  # type: ignore[arg-type]

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., K] @ W.T -> [..., N] in x's dtype, computed in fp32."""
        *lead, K = x.shape
        flat = x.reshape(-1, K)
        if flat.dtype != torch.float32 or not flat.is_contiguous():  # (a decode step makes ~300 calls: no no-op copies)
            flat = flat.float().contiguous()
        streaming = self.row_kernel(flat.shape[0])
        y = (streaming(flat) if streaming is not None else self._dense_matmul(flat)).view(*lead, -1)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def row_kernel(self, rows: int) -> kernels.BoundMatmul | None:
        """The compiled call `matmul` makes for fp32 [rows, K] contiguous, where it makes one."""
        return self._streaming_kernel if rows <= STREAMING_MAX_ROWS else None

    @property
    def routable(self) -> bool:
        """A stack of int4 tiles that `routed_matmul` takes."""
        return self.kind == "int4" and self.tiled and self.codes.dim() == 4 and self.codes.is_contiguous() and kernels.available()

    def routed_matmul(self, x: Tensor, experts: Tensor, streaming: bool = True) -> Tensor:
        """Row m of x (fp32 [M, K], contiguous) through matrix experts[m] of this stack -> fp32 [M, N],
        by the one-token kernel (`streaming`) or the prompt kernel, as `matmul` would take the rows."""
        if not streaming:
            return self._prompt_matmul(x, experts)
        return kernels.routed_int4_matmul(x, self.codes, self.scales, self.offsets, self.group_size, self.fast_math, experts)  # type: ignore[arg-type]

    @cached_property
    def _streaming_kernel(self) -> kernels.BoundMatmul | None:
        """The compiled kernel bound to these weights, where it takes them."""
        if not kernels.available():
            return None
        if self.kind == "int4":
            streamable = self.tiled and self.codes.is_contiguous()
        elif self.kind == "q6_k":
            streamable = self.codes.is_contiguous()
        else:
            streamable = self.codes.is_contiguous() and (self.shape[-1] % 32 == 0 if self.kind in ("bf16", "f16") else self.group_size % 8 == 0)
        if not streamable:
            return None
        return kernels.BoundMatmul(self.kind, self.shape[-2:], self.codes, self.scales, self.offsets, self.group_size, self.fast_math)

    def _prompt_matmul(self, x: Tensor, experts: Tensor | None = None) -> Tensor:
        """Many rows through int4 tiles: with AVX-512 VNNI the activations rounded as the one-token kernels
        round them (kernels/int4_prompt_vnni.c), else exact in fp32 (kernels/int4_prompt.c: an expert
        stack's runs only, where it beats dequantize + sgemm)."""
        halves = (1 if self.fast_math else 2) if kernels.prompt_rounding() else 0
        return kernels.prompt_int4_matmul(x, self.codes, self.scales, self.offsets, self.group_size, experts, halves)  # type: ignore[arg-type]

    def _dense_matmul(self, x: Tensor) -> Tensor:
        if self.tiled and self.codes.is_contiguous() and kernels.prompt_rounding():
            return self._prompt_matmul(x)
        N, K = self.shape
        step = max(1, DENSE_BLOCK_BYTES // (4 * K))
        if step >= N:
            return F.linear(x, self.dequantize())
        return torch.cat([F.linear(x, self.dequantize(slice(n, n + step))) for n in range(0, N, step)], dim=-1)


def prompt_scratch_bytes(values: int) -> int:
    """The most a prefill matmul over `values` activations (rows x K, the largest of a chunk) holds beside
    them: their int8 halves and per-32 steps (kernels/int4_prompt_vnni.c), or a dequantized block of the
    weight (PackedTensor._dense_matmul)."""
    per_value = 2.25 if kernels.prompt_rounding() else 0
    return max(DENSE_BLOCK_BYTES, int(values * per_value))


def quantize(weight: Tensor, kind: str, group: int | None = None, rows: bool = False) -> PackedTensor:
    """Pack a float weight [..., N, K]: bf16 by rounding; int8 symmetric (per channel by default);
    int4 asymmetric over groups of `group` (default 64) columns, in tiles for matmuls, or in rows
    for a table read by row (`rows`; quant/int4.py). group 0: one per row."""
    packed = _quantize_rows(weight, kind, group)
    return packed if rows else packed.as_tiles()


def _quantize_rows(weight: Tensor, kind: str, group: int | None) -> PackedTensor:
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "bf16":
        return PackedTensor("bf16", weight.to(torch.bfloat16).contiguous())
    rows_per_block = max(1, DENSE_BLOCK_BYTES // (4 * weight.shape[-1]))
    if weight.dim() == 2 and weight.shape[0] > rows_per_block:  # big tables: bound the fp32 working copy
        parts = [_quantize_rows(weight[n : n + rows_per_block], kind, group) for n in range(0, weight.shape[0], rows_per_block)]
        cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        first = parts[0]
        return PackedTensor(first.kind, cat([p.codes for p in parts]), cat([p.scales for p in parts]), cat([p.offsets for p in parts]), first.group)
    K = weight.shape[-1]
    fitted_kind, group = fit_group(K, kind, group)
    if fitted_kind != kind:
        return _quantize_rows(weight, fitted_kind, group)
    size = group or K
    w = weight.float().reshape(*weight.shape[:-1], K // size, size)
    if kind == "int8":
        scales = w.abs().amax(-1).clamp_min(1e-30) / 127
        codes = torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8)
        return PackedTensor("int8", codes.flatten(-2).contiguous(), scales.contiguous(), None, group)
    scales, offsets, codes = _fit_q4_0(w.contiguous()) if kind == "q4_0" else _fit_int4(w.contiguous())
    return PackedTensor("int4", codes, scales.contiguous(), None if offsets is None else offsets.contiguous(), group)


def fit_group(K: int, kind: str, group: int | None) -> tuple[str, int]:
    """The (kind, group) a row of K columns gets: the group narrowed to divide K; int4 needs whole
    32-blocks, so rows too narrow for them (tiny models only) fall back to int8."""
    if kind == "q4_0":
        if group not in (None, 0, 32):
            raise ValueError(f"q4_0 is llama.cpp's grid of groups of 32, not {group}")
        return ("q4_0", 32) if K % 32 == 0 else ("int8", math.gcd(K, 32))
    group = DEFAULT_GROUP[kind] if group is None else group
    if group and K % group:
        group = math.gcd(K, group)
    if kind == "int4" and (group or K) % 32:
        return "int8", group
    return kind, group


def packed_row_bytes(K: int, kind: str, group: int | None = None) -> list[int]:
    """Bytes one row of K columns takes in each tensor `quantize` makes: codes, scales, offsets."""
    if kind in ("bf16", "f16"):
        return [2 * K]
    kind, group = fit_group(K, kind, group)
    groups = K // (group or K)
    if kind == "int8":
        return [K, 4 * groups]
    return [K // 2, 2 * groups] if kind == "q4_0" else [K // 2, 2 * groups, 2 * groups]  # (Q4_0's offsets are implied)


def packed_nbytes(shape: tuple[int, ...], kind: str, group: int | None = None) -> int:
    """Bytes `quantize(torch.empty(shape), kind, group)` holds, without making it."""
    *lead, K = shape
    return math.prod(lead) * sum(packed_row_bytes(K, kind, group))


def _fit_q4_0(w: Tensor) -> tuple[Tensor, None, Tensor]:
    """llama.cpp's Q4_0 per group [..., G, 32], step for step as `gguf`'s quantizer takes it (so the
    result equals its bit for bit): d = (the value of largest magnitude) / -8, codes trunc(w / d + 8.5)
    in 0..15; stored as the scale d in fp16 and no offsets (the grid's -8 d is implied), codes packed."""
    if kernels.available():  # the same steps in one pass (kernels/quantize.c)
        d, codes = kernels.fit_q4_0(w)
    else:
        top = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))
        d = top / -8
        inverse = torch.where(d == 0, 0.0, 1 / d)
        codes = int4.pack(torch.trunc(w * inverse + 8.5).clamp(0, 15).to(torch.uint8).flatten(-2))
        d = d[..., 0]
    return d.half(), None, codes


def _fit_int4(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per group [..., G, size]: the (scale, offset) with the least squared error among ranges clipped
    towards the group's mean, each refitted by least squares given its codes (16 levels make min/max
    a poor fit: outliers stretch every step); codes packed for the stored scale and offset."""
    scale, low = kernels.fit_int4(w) if kernels.available() else _search_int4(w)  # the same fit in one pass (kernels/quantize.c)
    # stored in fp16 (4.5 bits per weight at group 64, as Q4_0's), unless out of its range
    if torch.isfinite(scale.half()).all() and torch.isfinite(low.half()).all():
        scale, low = scale.half(), low.half()
    if kernels.available():
        return scale, low, kernels.code_int4(w, scale, low)
    s, z = scale.float()[..., None], low.float()[..., None]
    codes = torch.where(s > 0, torch.round((w - z) / s), 0).clamp(0, 15)
    return scale, low, int4.pack(codes.to(torch.uint8).flatten(-2))


def _search_int4(w: Tensor, shrinks: tuple[float, ...] = (1.0, 0.94, 0.88, 0.82)) -> tuple[Tensor, Tensor]:
    """_fit_int4's search in PyTorch, fp32 [..., G] scales and offsets."""
    best = None
    center = w.mean(-1, keepdim=True)
    for shrink in shrinks:
        low = center + (w.amin(-1, keepdim=True) - center) * shrink
        high = center + (w.amax(-1, keepdim=True) - center) * shrink
        scale = ((high - low) / 15).clamp_min(1e-30)
        codes = torch.round((w - low) / scale).clamp(0, 15)
        scale, low = _least_squares(w, codes, scale, low)
        codes = torch.round((w - low) / scale).clamp(0, 15)
        error = (codes * scale + low - w).square().sum(-1, keepdim=True)
        if best is None:
            best = [error, scale, low]
        else:
            better = error < best[0]
            best = [torch.where(better, new, old) for new, old in zip((error, scale, low), best)]
    _, scale, low = best  # type: ignore[misc]
    return scale[..., 0], low[..., 0]


def _least_squares(w: Tensor, codes: Tensor, scale: Tensor, low: Tensor) -> tuple[Tensor, Tensor]:
    """The scale and offset minimising |codes * scale + offset - w|^2 per group (kept where degenerate)."""
    n = w.shape[-1]
    sq, sw = codes.sum(-1, keepdim=True), w.sum(-1, keepdim=True)
    sqq, sqw = codes.square().sum(-1, keepdim=True), (codes * w).sum(-1, keepdim=True)
    det = n * sqq - sq * sq
    ok = det > 0
    fit_scale = torch.where(ok, (n * sqw - sq * sw) / det.clamp_min(1e-30), scale)
    fit_low = torch.where(ok, (sw - fit_scale * sq) / n, low)
    ok = fit_scale > 0
    return torch.where(ok, fit_scale, scale), torch.where(ok, fit_low, low)
