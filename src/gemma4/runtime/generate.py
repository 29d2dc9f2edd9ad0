"""The generation loop over token ids: chunked prefill, then one decode step per token.

Text, chat formatting, stop strings and timing sit one layer above this."""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
from torch import Tensor

from ..errors import Gemma4Error
from ..model import CausalLM
from .kv_cache import ModelCache
from .sampling import SamplingParams, sample

DEFAULT_PREFILL_CHUNK = 512


class PromptTooLong(Gemma4Error):
    pass


def check_fits(prompt_tokens: int, context: int) -> None:
    if prompt_tokens >= context:
        raise PromptTooLong(
            f"the prompt is {prompt_tokens} tokens but the context is {context}: shorten it or raise --context"
        )


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """-> ids [B, L], positions [B, L] with -1 on padding (so masks ignore it)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        positions[row, width - len(prompt) :] = torch.arange(len(prompt))
    return ids, positions


def prefill(lm: CausalLM, cache: ModelCache, ids: Tensor, positions: Tensor, chunk: int) -> Tensor:
    """Feed the prompt in chunks (attention never spans more than chunk x cache); only the last
    chunk runs the KV-shared layers, and only on its last position. -> logits [B, vocab]."""
    logits = None
    for start in range(0, ids.shape[1], chunk):
        last = start + chunk >= ids.shape[1]
        logits = lm.step(ids[:, start : start + chunk], positions[:, start : start + chunk], cache, keep=1 if last else 0)
    assert logits is not None
    return logits[:, -1]


def generate_ids(
    lm: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Collection[int] = (),
    banned_ids: Collection[int] = (),
    context: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    pad_id: int = 0,
) -> Iterator[Tensor]:
    """Yield the next token of every prompt, [B] per step; -1 for prompts already finished.

    A prompt finishes on a stop id (which is yielded) or after `max_new_tokens`."""
    context = context or lm.config.max_position_embeddings
    check_fits(max(len(p) for p in prompts), context)
    ids, positions = left_pad(prompts, pad_id)
    dtype = lm.model.embed_tokens.weight.dtype
    cache = ModelCache(lm.plan, len(prompts), context, dtype)
    steps = min(max_new_tokens, context - ids.shape[1])
    history = ids
    generator = sampling.generator()
    banned = torch.tensor(sorted(banned_ids), dtype=torch.long)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    next_position = positions[:, -1] + 1

    logits = prefill(lm, cache, ids, positions, prefill_chunk)
    for _ in range(steps):
        logits = logits.float().index_fill(-1, banned, float("-inf"))
        token = sample(logits, sampling, history, generator)
        token = torch.where(finished, -1, token)
        yield token
        finished |= torch.isin(token, stops)
        if finished.all():
            return
        fed = torch.where(finished, pad_id, token)
        step_positions = torch.where(finished, -1, next_position)
        history = torch.cat((history, fed[:, None]), dim=1)
        logits = lm.step(fed[:, None], step_positions[:, None], cache, keep=1)[:, -1]  # type: ignore[index]
        next_position += 1
