"""gemma4: Google's Gemma 4 models on the hardware people own."""

from __future__ import annotations

from pathlib import Path

import torch

from .model import CausalLM

__version__ = "0.1.0"


def load(path: str | Path, dtype: torch.dtype | str = torch.bfloat16, progress: bool = True) -> CausalLM:
    """Load a Gemma 4 checkpoint.

    Args:
        path: a Hugging Face checkpoint folder (config.json + safetensors, single or sharded).
        dtype: compute dtype: torch.bfloat16 (default), torch.float16 or torch.float32 (or "bf16", "fp16", "fp32").
        progress: show a progress bar when loading takes more than a second.

    Returns:
        The model: `model(input_ids)` maps a LongTensor [batch, seq] to soft-capped logits [batch, seq, vocab].
    """
    from .weights import load_model

    return load_model(path, dtype=dtype, progress=progress)


__all__ = ["CausalLM", "load", "__version__"]
