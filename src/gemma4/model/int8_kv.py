"""Keys and values in 8 bits: int8 codes with one fp32 scale per (sequence, head, position), the
scale being the vector's largest magnitude / 127. A K/V cache in this form holds (D + 4) / 2D of
its bf16 bytes (51.6 % at D = 256); the decode kernel reads the codes in place and applies the
scales to the scores and the softmax weights, so nothing is widened."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Int8Tensor:
    """Stands in for a K/V tensor [B, K, S, D]: indexing and assignment act on the first three axes."""

    codes: Tensor  # int8 [B, K, S, D]
    scales: Tensor  # fp32 [B, K, S]

    @classmethod
    def quantize(cls, x: Tensor) -> Int8Tensor:
        scales = x.float().abs().amax(-1) / 127
        codes = torch.round(x.float() / scales.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).to(torch.int8)
        return cls(codes, scales)

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Int8Tensor:
        return cls(torch.zeros(shape, dtype=torch.int8), torch.zeros(shape[:-1]))

    @classmethod
    def cat(cls, parts: list[Int8Tensor], dim: int) -> Int8Tensor:
        assert dim == 2, "K/V tensors grow along positions"
        return cls(torch.cat([p.codes for p in parts], dim), torch.cat([p.scales for p in parts], dim))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.codes.to(dtype) * self.scales[..., None].to(dtype)).to(dtype)

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
