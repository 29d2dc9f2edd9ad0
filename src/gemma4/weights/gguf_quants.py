"""float32 -> llama.cpp's quantized blocks, as `llama-quantize` writes them without an importance
matrix: Q4_0 and Q8_0 through the `gguf` package (its quantizers follow ggml's reference rounding),
Q6_K here, which `gguf` only decodes. Q6_K follows ggml-quants.c's `quantize_row_q6_K_ref` step for
step in float32, sums taken in its order, so the blocks come out equal bit for bit."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

GROUP_MAX_EPS = 1e-15  # ggml: a group whose largest magnitude is below this is all zero
BLOCK = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q6_K": (256, 210)}  # values and bytes per block


def quantize_blocks(values: Tensor, type_name: str) -> np.ndarray:
    """float32 values (a whole number of blocks, in row order) -> their blocks' bytes, uint8 [n_blocks, bytes]."""
    if type_name == "Q6_K":
        return _q6_k(values.reshape(-1, 256))
    import gguf

    # in rows of up to 8192 values: gguf quantizes 16 rows per numpy call, so narrow rows cost Python overhead
    row = math.gcd(values.numel(), 8192)
    blocks = gguf.quants.quantize(values.reshape(-1, row).numpy(), gguf.GGMLQuantizationType[type_name])
    return blocks.reshape(-1, BLOCK[type_name][1])


def _over(numerator: float, t: Tensor) -> Tensor:
    """numerator / t, divided in float32 (torch's scalar / tensor multiplies by a reciprocal instead)."""
    return torch.full_like(t, numerator) / t


def _sequential_sum(t: Tensor) -> Tensor:
    """Sum over the first axis in order, as ggml's scalar loops add (not pairwise)."""
    total = t[0].clone()
    for row in t[1:]:
        total += row
    return total


def _make_qx_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) over each row of x [S, n]: the scale
    [S] and the codes L [S, n] (0..2 nmax - 1) that best fit x, weighting each value by its square.
    Worked on as [n, S], so each of the n steps of a sum is one contiguous vector operation."""
    top = x.gather(-1, x.abs().argmax(-1, keepdim=True))[:, 0]  # the value of largest magnitude (first one)
    zero = top.abs() < GROUP_MAX_EPS
    top = torch.where(zero, 1.0, top)
    x = x.T.contiguous()
    w = x * x
    wx = w * x

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        l = torch.round(iscale * x).clamp_(-nmax, nmax - 1)  # nearest_int: ties to even, as float32 rounds
        return l, _sequential_sum(wx * l), _sequential_sum(w * l * l)

    l, sumlx, suml2 = fit(_over(-nmax, top))
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    codes = l
    for step in range(-9, 10):
        if step == 0:
            continue
        nudged = float(np.float32(nmax) + np.float32(0.1) * np.float32(step))  # `nmax + 0.1f*is` in float32
        l, sumlx, suml2 = fit(_over(-nudged, top))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = torch.where(better, l, codes)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, codes + nmax).T


def _q6_k(x: Tensor) -> np.ndarray:
    """Super-blocks x [B, 256] -> Q6_K blocks uint8 [B, 210]: ql[128] qh[64] scales[16] d(fp16)."""
    B = x.shape[0]
    sub = x.reshape(B * 16, 16)
    scales, codes = _make_qx_quants(sub, 32)
    scales, codes = scales.view(B, 16), codes.view(B, 16, 16)
    max_scale = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))[:, 0]
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = _over(-128.0, torch.where(empty, 1.0, max_scale))
    d = _over(1.0, iscale).half()
    block_scales = torch.round(iscale[:, None] * scales).clamp(max=127)
    step = d.float()[:, None] * block_scales  # [B, 16]
    requantized = torch.round(x.view(B, 16, 16) / torch.where(step == 0, 1.0, step)[..., None]).clamp(-32, 31) + 32
    L = torch.where((step != 0)[..., None], requantized, codes.float()).to(torch.uint8).view(B, 256)
    ql, qh = [], []
    for half in (0, 128):
        q1, q2, q3, q4 = (L[:, half + 32 * k : half + 32 * (k + 1)] for k in range(4))
        ql += [(q1 & 15) | ((q3 & 15) << 4), (q2 & 15) | ((q4 & 15) << 4)]
        qh.append((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))
    out = np.concatenate(
        [torch.cat(ql, 1).numpy(), torch.cat(qh, 1).numpy(), block_scales.to(torch.int8).numpy().view(np.uint8), d.numpy().view(np.uint8).reshape(B, 2)],
        axis=1,
    )
    out[empty.numpy()] = 0  # ggml writes an all-zero block
    return out
