"""Model math: pure tensor code, no I/O."""

from .transformer import CausalLM, TextModel

__all__ = ["CausalLM", "TextModel"]
