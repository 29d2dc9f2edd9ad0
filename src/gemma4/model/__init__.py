"""Model math: pure tensor code, no I/O."""

from .transformer import CausalLM, MediaInputs, TextModel

__all__ = ["CausalLM", "MediaInputs", "TextModel"]
