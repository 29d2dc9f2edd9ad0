"""Where a decode step's time goes, and what batching buys: one model, N cached decode steps after a
short prompt, the time inside the packed matmul kernels measured apart from everything else
(attention, norms, PyTorch operators, Python, the PLE row read); then B sequences decoded together
(as `gemma4 serve` batches them), aggregate tokens per second.

    python benchmarks/decode_step.py CHECKPOINT [--quant int4] [--fast-math] [--steps 32] [--batches 1,2,4,8]
"""

from __future__ import annotations

import argparse
import time

import torch

import gemma4
from gemma4 import kernels
from gemma4.runtime.generate import Session, decode_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--quant")
    parser.add_argument("--fast-math", action="store_true")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", default="1,2,4,8")
    args = parser.parse_args()
    in_kernels = [0.0]
    bind = kernels.bind_matmul

    def timed_bind(*a, **k):  # noqa: ANN002, ANN003, ANN202
        matmul = bind(*a, **k)

        def run(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = matmul(x)
            in_kernels[0] += time.perf_counter() - start
            return y

        return run

    kernels.bind_matmul = timed_bind  # every packed weight binds its kernel on first use, after this
    model = gemma4.load(args.model, quant=args.quant, fast_math=args.fast_math, progress=False)
    prompt = list(range(1000, 1064))
    for batch in [int(b) for b in args.batches.split(",")]:
        sessions = [Session(model.lm, 4096) for _ in range(batch)]
        for session in sessions:
            session.start_prompt(prompt)
        for _ in range(3):
            decode_step(model.lm, sessions, [17] * batch)
        in_kernels[0] = 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            decode_step(model.lm, sessions, [17] * batch)
        step = (time.perf_counter() - start) / args.steps
        matmuls = in_kernels[0] / args.steps
        print(f"batch {batch}: step {step * 1e3:.1f} ms, {batch / step:.1f} tok/s aggregate; "
              f"packed matmul kernels {matmuls * 1e3:.1f} ms ({matmuls / step:.0%}), everything else {(step - matmuls) * 1e3:.1f} ms",
              flush=True)


if __name__ == "__main__":
    main()
