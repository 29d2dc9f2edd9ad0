"""gemma4: Google's Gemma 4 models on the hardware people own."""

from __future__ import annotations

from pathlib import Path

import torch

from .parallel.ranks import Ranks, fingerprint
from .runtime.engine import Model

__version__ = "0.1.0"


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    context: int | None = None,
    prefill_chunk: int = 512,
    progress: bool = True,
    quant: str | None = None,
    group: int = 0,
    kv_dtype: torch.dtype | str | None = None,
    fast_math: bool = False,
    tp: int = 1,
) -> Model:
    """Load a Gemma 4 (or Gemma 3) checkpoint.

    Args:
        path: a Hugging Face checkpoint folder (config.json + safetensors, single or sharded; also one
            saved by `gemma4 quantize`), or a llama.cpp / Ollama GGUF file.
        dtype: compute dtype of a plain model: torch.bfloat16, torch.float16 or torch.float32 (or "bf16",
            "fp16", "fp32"). Default: bf16 for folders; for GGUF files, the file's own types.
        context: the longest sequence to serve (default: the model's maximum); the cache grows only as used.
        prefill_chunk: prompt tokens processed per step; bounds the attention scores held at once.
        progress: show a progress bar when loading takes more than a second.
        quant: "bf16", "int8", "int4" or "q4_0": keep the matrices packed in that format and compute in fp32
            on the packed kernels (int8: per output channel; int4: asymmetric, groups of `group`, default
            64; q4_0: llama.cpp's symmetric grid over groups of 32, for quantization-aware checkpoints).
        group: columns per int8/int4 scale (0: the default).
        kv_dtype: the K/V cache's dtype, "bf16", "fp16" or "fp32" (default: fp16 beside packed weights,
            else the compute dtype).
        fast_math: packed int8/int4 matmuls round activations to 8 bits, as llama.cpp does: faster
            decoding and (int4, with AVX-512 VNNI) prompts, but not the model's own answers (next-token KL ~0.02-0.05 on Gemma 3 270M, where
            the default's is ~1e-5).
        tp: run the model over this many ranks (tensor parallelism; the 26B-A4B's experts spread over
            them). Call on every rank of an initialised default process group (torchrun sets it up):
            each loads only its own part, and `model(input_ids)` and `generate` give every rank the
            same, full answer.

    Returns:
        The model: `model(input_ids)` maps a LongTensor [batch, seq] to soft-capped logits
        [batch, seq, vocab]; `model.generate(prompt)` continues text or token ids; `model.chat(messages)`
        answers OpenAI-style messages.
    """
    ranks = Ranks.join(tp)
    if ranks.size > 1:
        ranks.agree("checkpoint and options", (fingerprint(path), str(dtype), context, prefill_chunk, quant, group, str(kv_dtype), fast_math))
    model = Model.from_folder(path, dtype=dtype, context=context, prefill_chunk=prefill_chunk, progress=progress, quant=quant, group=group,
                              ranks=ranks)
    model.configure(kv_dtype, fast_math)
    return model


__all__ = ["Model", "load", "__version__"]
