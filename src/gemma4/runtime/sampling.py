"""Choosing the next token: a seeded, pure function of the last logits.

Order as in `transformers`: repetition penalty, then temperature, top-k, top-p, min-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def penalize_repetition(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """Tokens already seen: positive logits divided by `penalty`, negative ones multiplied."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    return logits.scatter(-1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, history: Tensor, generator: torch.Generator | None) -> Tensor:
    """logits: [B, V] (fp32 preferred), history: [B, S] token ids seen -> next ids [B]."""
    logits = penalize_repetition(logits.float(), history, params.repetition_penalty)
    if params.temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
