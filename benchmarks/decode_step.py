"""Where a decode step's time goes, and what batching buys: one model, N cached decode steps after a
prompt, split into the compiled layer calls (the packed matmuls, norms and GELU of each layer:
kernels/layer.c; with the attention too where one call runs all layers, as it does for one cache), the
other packed matmuls (the LM head, the PLE projection), attention, and everything
else (PyTorch operators, Python, the cache, the MoE router, the embedding and PLE row reads); then B sequences decoded
together (as `gemma4 serve` batches them), aggregate tokens per second.

    python benchmarks/decode_step.py CHECKPOINT [--quant int4] [--fast-math] [--prompt 64] [--steps 32] [--batches 1,2,4,8]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import gemma4
from gemma4 import kernels
from gemma4.runtime.generate import Session, decode_step

SPENT: dict[str, float] = defaultdict(float)


def timed(part: str, call):  # noqa: ANN001, ANN201
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        out = call(*args, **kwargs)
        SPENT[part] += time.perf_counter() - start
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--quant")
    parser.add_argument("--fast-math", action="store_true")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", default="1,2,4,8")
    args = parser.parse_args()
    for name in ("decode_layers", "decode_layer_attention_inputs", "decode_layer_rest", "decode_layer_attention_output", "decode_layer_feedforward"):
        setattr(kernels, name, timed("layer calls", getattr(kernels, name)))
    kernels.attend_one_query = timed("attention", kernels.attend_one_query)
    kernels.BoundMatmul.__call__ = timed("other matmuls", kernels.BoundMatmul.__call__)
    model = gemma4.load(args.model, quant=args.quant, fast_math=args.fast_math, progress=False)
    prompt = list(range(1000, 1000 + args.prompt))
    for batch in [int(b) for b in args.batches.split(",")]:
        sessions = [Session(model.lm, 4096) for _ in range(batch)]
        for session in sessions:
            session.start_prompt(prompt)
        for _ in range(3):
            decode_step(model.lm, sessions, [17] * batch)
        SPENT.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            decode_step(model.lm, sessions, [17] * batch)
        step = (time.perf_counter() - start) / args.steps
        parts = {part: spent / args.steps for part, spent in SPENT.items()}
        parts["everything else"] = step - sum(parts.values())
        shares = ", ".join(f"{part} {t * 1e3:.1f} ms ({t / step:.0%})" for part, t in parts.items())
        print(f"batch {batch}: step {step * 1e3:.1f} ms, {batch / step:.1f} tok/s aggregate; {shares}", flush=True)


if __name__ == "__main__":
    main()
