"""Choosing the next token: a seeded, pure function of the last logits.

Order as in `transformers` (and vLLM for the OpenAI penalties): logit bias, repetition penalty
over prompt and answer, presence and frequency penalties over the answer, then temperature,
top-k, top-p, min-p."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token the answer already holds
    frequency_penalty: float = 0.0  # ... and this, times how often it holds it
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
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


def penalize_presence(logits: Tensor, answer: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties over the tokens generated so far ([B, n])."""
    if (presence == 0.0 and frequency == 0.0) or answer.numel() == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add(-1, answer, torch.ones_like(answer, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def adjust_logits(logits: Tensor, params: SamplingParams, history: Tensor, answer: Tensor | None = None) -> Tensor:
    """Everything before the choice: bias and penalties, in fp32. history: prompt and answer; answer: the answer alone."""
    logits = logits.float()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits = logits.index_add(-1, ids, torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype).expand(*logits.shape[:-1], -1))
    logits = penalize_repetition(logits, history, params.repetition_penalty)
    if answer is not None:
        logits = penalize_presence(logits, answer, params.presence_penalty, params.frequency_penalty)
    return logits


def sample(logits: Tensor, params: SamplingParams, history: Tensor, generator: torch.Generator | None, answer: Tensor | None = None) -> Tensor:
    """logits: [B, V] (fp32 preferred), history: [B, S] token ids seen, answer: [B, n] the ones
    generated so far (for presence/frequency penalties) -> next ids [B]."""
    logits = adjust_logits(logits, params, history, answer)
    if params.temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
