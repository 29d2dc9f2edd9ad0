"""Keys and values in 8 bits: int8 codes with one fp16 scale per 32 values of a head's vector (the
block's largest magnitude / 127, as llama.cpp's Q8_0). A K/V cache in this form holds 34 / 64 of its
bf16 bytes; the decode kernel reads the codes in place and applies the scales per block, so nothing
is widened. On Gemma 3 270M, one scale per whole vector (D = 256) cost next-token KL 0.017; blocks of
32 cost 0.002 over three sliding windows (benchmarks/quality.py --sections kv)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


BLOCK = 32  # values per scale


def block_size(head_dim: int) -> int:
    """Values per scale: 32, or the whole vector where it is not a multiple of 32 (tiny test models)."""
    return BLOCK if head_dim % BLOCK == 0 else head_dim


@dataclass
class Int8Tensor:
    """Stands in for a K/V tensor [B, K, S, D]: indexing and assignment act on the first three axes."""

    codes: Tensor  # int8 [B, K, S, D]
    scales: Tensor  # fp16 [B, K, S, D / BLOCK]

    @classmethod
    def quantize(cls, x: Tensor) -> Int8Tensor:
        blocks = x.float().unflatten(-1, (-1, block_size(x.shape[-1])))
        scales = (blocks.abs().amax(-1) / 127).half()  # rounded first: the codes are fitted to the scale kept
        codes = torch.round(blocks / scales.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp(-127, 127)
        return cls(codes.to(torch.int8).flatten(-2), scales)

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Int8Tensor:
        return cls(torch.zeros(shape, dtype=torch.int8), torch.zeros(*shape[:-1], shape[-1] // block_size(shape[-1]), dtype=torch.float16))

    @classmethod
    def cat(cls, parts: list[Int8Tensor], dim: int) -> Int8Tensor:
        assert dim == 2, "K/V tensors grow along positions"
        return cls(torch.cat([p.codes for p in parts], dim), torch.cat([p.scales for p in parts], dim))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.codes.float().unflatten(-1, (self.scales.shape[-1], -1)) * self.scales.float()[..., None]).flatten(-2).to(dtype)

    def __getitem__(self, index: tuple) -> Int8Tensor:
        return Int8Tensor(self.codes[index], self.scales[index])

    def __setitem__(self, index: tuple, value: Int8Tensor) -> None:
        self.codes[index] = value.codes
        self.scales[index] = value.scales

    def clone(self) -> Int8Tensor:
        return Int8Tensor(self.codes.clone(), self.scales.clone())

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def widen(t: Tensor | Int8Tensor, dtype: torch.dtype) -> Tensor:
    """K/V as `dtype` values, whatever the cache stores."""
    return t.dequantize(dtype) if isinstance(t, Int8Tensor) else t.to(dtype)
