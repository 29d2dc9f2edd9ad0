"""How much a quantization (or a faster kernel) changes a model's predictions."""

from __future__ import annotations

import torch


def next_token_quality(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """Logits [T, vocab] of two models on the same tokens -> (top-1 agreement, mean KL(reference || candidate))."""
    ref, cand = torch.log_softmax(reference.double(), -1), torch.log_softmax(candidate.double(), -1)
    kl = (ref.exp() * (ref - cand)).sum(-1).mean().item()
    return (reference.argmax(-1) == candidate.argmax(-1)).double().mean().item(), kl


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of ids[1:] under logits[:-1] ([T, vocab], [T])."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:]).exp().item()
