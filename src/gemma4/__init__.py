"""gemma4: Google's Gemma 4 models on the hardware people own."""

from __future__ import annotations

from pathlib import Path

import torch

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
        quant: "bf16", "int8" or "int4": keep the matrices packed in that format and compute in fp32 on
            the packed kernels (int8: per output channel; int4: asymmetric, groups of `group`, default 64).
        group: columns per int8/int4 scale (0: the default).

    Returns:
        The model: `model(input_ids)` maps a LongTensor [batch, seq] to soft-capped logits
        [batch, seq, vocab]; `model.generate(prompt)` continues text or token ids; `model.chat(messages)`
        answers OpenAI-style messages.
    """
    return Model.from_folder(path, dtype=dtype, context=context, prefill_chunk=prefill_chunk, progress=progress, quant=quant, group=group)


__all__ = ["Model", "load", "__version__"]
