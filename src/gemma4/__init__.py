"""gemma4: Google's Gemma 4 models on the hardware people own."""

from __future__ import annotations

from pathlib import Path

import torch

from .runtime.engine import Model

__version__ = "0.1.0"


def load(
    path: str | Path,
    dtype: torch.dtype | str = torch.bfloat16,
    context: int | None = None,
    prefill_chunk: int = 512,
    progress: bool = True,
) -> Model:
    """Load a Gemma 4 checkpoint.

    Args:
        path: a Hugging Face checkpoint folder (config.json + safetensors, single or sharded).
        dtype: compute dtype: torch.bfloat16 (default), torch.float16 or torch.float32 (or "bf16", "fp16", "fp32").
        context: the longest sequence to serve (default: the model's maximum); the cache grows only as used.
        prefill_chunk: prompt tokens processed per step; bounds the attention scores held at once.
        progress: show a progress bar when loading takes more than a second.

    Returns:
        The model: `model(input_ids)` maps a LongTensor [batch, seq] to soft-capped logits
        [batch, seq, vocab]; `model.generate(prompt)` continues text or token ids; `model.chat(messages)`
        answers OpenAI-style messages.
    """
    return Model.from_folder(path, dtype=dtype, context=context, prefill_chunk=prefill_chunk, progress=progress)


__all__ = ["Model", "load", "__version__"]
