"""The quality cost of packed weights: next-token top-1 agreement and KL divergence against the
same checkpoint's bf16 weights (computed in fp32), over a fixed public-domain text.

    python benchmarks/quality.py CHECKPOINT_OR_GGUF [--tokens N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import gemma4
from gemma4.quant.quality import next_token_quality

TEXT = Path(__file__).parent.parent / "tests" / "data" / "declaration.txt"
CANDIDATES = [("int8", 0), ("int8", 32), ("int4", 64), ("int4", 32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    reference_model = gemma4.load(args.model, quant="bf16", progress=False)
    if reference_model.tokenizer is not None:
        ids = reference_model.tokenizer.encode(TEXT.read_text())[: args.tokens]
    else:
        ids = torch.randint(1000, 200_000, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = torch.tensor([ids])
    reference = reference_model(ids)[0]
    del reference_model
    print(f"{args.model}: {ids.shape[1]} tokens, against its bf16 weights")
    print("| weights | top-1 agreement | KL |\n|---|---|---|")
    for quant, group in CANDIDATES:
        top1, kl = next_token_quality(reference, gemma4.load(args.model, quant=quant, group=group, progress=False)(ids)[0])
        print(f"| {quant}{f' g{group}' if group else ''} | {top1:.3f} | {kl:.4f} |")


if __name__ == "__main__":
    main()
