"""What packed weights and the decode path cost in predictions, on a real model: next-token top-1
agreement, KL divergence and perplexity against the exact model (the checkpoint's weights in fp32,
one full forward), over public-domain texts.

Each load is measured twice: one full forward (the prompt path: what the weights cost, and where
the CPU has AVX-512 VNNI the int4 prompt kernel's rounding of the activations, as decode rounds them)
and teacher-forced through the decode path, one cached step per token as `generate` runs it (what a
user gets: the one-token kernels and the K/V cache's dtype).

The K/V cache's dtypes are measured the same way over a text several sliding windows long.

    python benchmarks/quality.py CHECKPOINT_OR_GGUF [--tokens N] [--sections loads,kv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import gemma4
from gemma4.quant.quality import next_token_quality, perplexity
from gemma4.runtime.generate import teacher_forced_logits

ROOT = Path(__file__).parent.parent
TEXTS = {"declaration": ROOT / "tests" / "data" / "declaration.txt", "gettysburg": Path(__file__).parent / "data" / "gettysburg.txt"}
LONG_TEXT = Path(__file__).parent / "data" / "python-license.txt"  # ~3,400 tokens: many sliding windows


def loads(gguf: bool) -> dict[str, dict]:
    native = "file's types" if gguf else "bf16 (unpacked)"
    return {
        native: {},
        f"{native}, --fast-math": {"fast_math": True},
        f"{native}, K/V bf16": {"kv_dtype": "bf16"},
        "int8": {"quant": "int8"},
        "int8, --fast-math": {"quant": "int8", "fast_math": True},
        "int4": {"quant": "int4"},
        "int4, --fast-math": {"quant": "int4", "fast_math": True},
        "bf16": {"quant": "bf16"},
    }


def row(label: str, cells: list[tuple[float, float]], ppl: float) -> str:
    return f"| {label} | " + " | ".join(f"{kl:.5f} / {top1:.3f}" for top1, kl in cells) + f" | {ppl:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of each text at most")
    parser.add_argument("--sections", default="loads,kv", help="loads: weights and decode paths; kv: K/V dtypes over a long text")
    parser.add_argument("--long-tokens", type=int, default=1600, help="tokens of the long text (default 1600: 3 windows of Gemma 3)")
    args = parser.parse_args()
    exact = gemma4.load(args.model, dtype="fp32", progress=False)
    if exact.tokenizer is None:
        raise SystemExit("the checkpoint has no tokenizer: quality needs real text")
    sections = args.sections.split(",")
    if "loads" in sections:
        compare_loads(args.model, exact, args.tokens)
    if "kv" in sections:
        compare_kv_dtypes(args.model, exact, args.long_tokens)


def compare_loads(path: str, exact: gemma4.Model, tokens: int) -> None:
    texts = {name: torch.tensor(exact.tokenizer.encode(text.read_text())[:tokens]) for name, text in TEXTS.items()}
    references = {name: exact(ids[None])[0] for name, ids in texts.items()}
    print(f"{path}, against its weights in fp32 (one forward); {', '.join(f'{n} {len(t)} tokens' for n, t in texts.items())}")
    print("KL / top-1 agreement, both texts together\n")
    print("| load | weights (one forward vs exact) | decode path (vs one forward, same weights) | what users get (decode vs exact) | perplexity (decode) |")
    print("|---|---|---|---|---|")
    for label, options in loads(str(path).endswith(".gguf")).items():
        model = gemma4.load(path, progress=False, **options)
        one_shot = torch.cat([model(ids[None])[0] for ids in texts.values()])
        decoded = torch.cat([teacher_forced_logits(model.lm, ids.tolist()) for ids in texts.values()])
        reference, ids = torch.cat(list(references.values())), torch.cat(list(texts.values()))
        ppl = sum(perplexity(decoded[a : a + len(t)], t) for a, t in zip(_starts(texts), texts.values())) / len(texts)
        print(row(label, [next_token_quality(reference, one_shot), next_token_quality(one_shot, decoded), next_token_quality(reference, decoded)], ppl), flush=True)
        del model


def compare_kv_dtypes(path: str, exact: gemma4.Model, tokens: int) -> None:
    ids = torch.tensor(exact.tokenizer.encode(LONG_TEXT.read_text())[:tokens])  # type: ignore[union-attr]
    reference = exact(ids[None])[0]
    print(f"\nK/V cache dtypes over {LONG_TEXT.name}, {len(ids)} tokens (sliding window {exact.config.sliding_window}), default weights\n")
    print("| K/V | decode vs exact: KL / top-1 | perplexity (exact: {:.3f}) |\n|---|---|---|".format(perplexity(reference, ids)))
    for kv in ("fp32", "fp16", "bf16", "int8"):
        model = gemma4.load(path, progress=False, kv_dtype=kv)
        decoded = teacher_forced_logits(model.lm, ids.tolist())
        top1, kl = next_token_quality(reference, decoded)
        print(f"| {kv} | {kl:.5f} / {top1:.3f} | {perplexity(decoded, ids):.3f} |", flush=True)


def _starts(texts: dict[str, torch.Tensor]) -> list[int]:
    starts, at = [], 0
    for ids in texts.values():
        starts.append(at)
        at += len(ids)
    return starts


if __name__ == "__main__":
    main()
