"""Checkpoint files: layouts, loaders, the synthetic generator."""

from .checkpoint import load_model, open_checkpoint, validate
from .synth import synthesize

__all__ = ["load_model", "open_checkpoint", "synthesize", "validate"]
