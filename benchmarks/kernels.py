"""Decode-shaped matmuls (one token against a weight matrix): our packed kernels against what
PyTorch offers on this CPU, in GB/s of weight bytes read (the figure a bandwidth-bound decode cares about).

    python benchmarks/kernels.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gemma4 import kernels
from gemma4.quant.packed import quantize

SHAPES = {"mlp up (E2B)": (6144, 1536), "mlp down (E2B)": (1536, 6144), "lm head (E2B)": (262144, 1536)}


def seconds(fn, repeat: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def candidates(w: torch.Tensor, x: torch.Tensor) -> dict[str, tuple[callable, int]]:
    N, K = w.shape
    out = {}
    w32, w16 = w.contiguous(), w.to(torch.bfloat16)
    out["torch fp32 linear"] = (lambda: F.linear(x, w32), w32.nbytes)
    out["torch bf16 linear"] = (lambda: F.linear(x.bfloat16(), w16), w16.nbytes)
    for kind in ("bf16", "int8", "int4"):
        p = quantize(w, kind)
        out[f"gemma4 {kind}"] = (lambda p=p: p.matmul(x), p.nbytes)
    # PyTorch's packed CPU kernels
    q8 = quantize(w, "int8")
    scales8 = q8.scales.view(-1).to(torch.bfloat16)
    out["torch._weight_int8pack_mm"] = (lambda: torch._weight_int8pack_mm(x.bfloat16(), q8.codes, scales8), q8.codes.nbytes + scales8.nbytes)
    try:
        int4_values = torch.randint(0, 16, (N, K), dtype=torch.int32)
        packed4 = torch._convert_weight_to_int4pack_for_cpu(int4_values, 1)
        sz = torch.randn(K // 64, N, 2, dtype=torch.bfloat16)
        out["torch._weight_int4pack_mm_for_cpu"] = (
            lambda: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed4, 64, sz),
            packed4.nbytes + sz.nbytes,
        )
    except (RuntimeError, AttributeError) as error:
        print(f"(no int4pack kernel: {error})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, compiled kernels: {kernels.available()}")
    for label, (N, K) in SHAPES.items():
        w, x = torch.randn(N, K) * 0.02, torch.randn(1, K)
        print(f"\n{label}: [1, {K}] x [{K}, {N}]")
        for name, (fn, nbytes) in candidates(w, x).items():
            s = seconds(fn, repeat=5 if N > 100_000 else 30)
            print(f"  {name:36s} {s * 1e3:8.3f} ms  {nbytes / s / 1e9:6.1f} GB/s of weights")


if __name__ == "__main__":
    main()
