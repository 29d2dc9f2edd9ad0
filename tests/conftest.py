"""Shared fixtures: tiny synthetic checkpoints, written once per test session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from gemma4.weights import synthesize

TINY_PRESETS = ("tiny-e2b", "tiny-e4b", "tiny-26b-a4b", "tiny-31b", "tiny-gemma3")


def reference_class(path: Path):
    """The `transformers` class that reads the checkpoint at `path` (text or multimodal, Gemma 3 or 4)."""
    import json

    import transformers

    model_type = json.loads((path / "config.json").read_text())["model_type"]
    return {
        "gemma4_text": transformers.Gemma4ForCausalLM,
        "gemma4": transformers.Gemma4ForConditionalGeneration,
        "gemma3_text": transformers.Gemma3ForCausalLM,
    }[model_type]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """checkpoints(preset, dtype) -> folder of a synthetic checkpoint, made on first use."""
    made: dict[tuple[str, torch.dtype], Path] = {}

    def get(preset: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (preset, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{preset}-{str(dtype).removeprefix('torch.')}")
            made[key] = synthesize(preset, out, dtype=dtype, seed=7, progress=False)
        return made[key]

    return get


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=UserWarning)
