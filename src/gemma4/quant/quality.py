"""How much a quantization changes a model's predictions."""

from __future__ import annotations

import torch


def next_token_quality(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """Logits [T, vocab] of two models on the same tokens -> (top-1 agreement, mean KL(reference || candidate))."""
    ref, cand = torch.log_softmax(reference.double(), -1), torch.log_softmax(candidate.double(), -1)
    kl = (ref.exp() * (ref - cand)).sum(-1).mean().item()
    return (reference.argmax(-1) == candidate.argmax(-1)).double().mean().item(), kl
