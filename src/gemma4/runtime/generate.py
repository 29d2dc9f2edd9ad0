"""The generation loop over token ids: chunked prefill, then one decode step per token.

Two feeders share one sampling loop: `Batch` (several prompts, left-padded, a fresh cache) and
`Session` (one conversation whose cache lives on between calls, so a new turn prefills only
what is new). Text, chat formatting, stop strings and timing sit one layer above this."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import Gemma4Error
from ..model import CausalLM, MediaInputs
from .kv_cache import CacheSnapshot, ModelCache
from .sampling import SamplingParams, sample

DEFAULT_PREFILL_CHUNK = 512


class PromptTooLong(Gemma4Error):
    pass


def check_fits(prompt_tokens: int, context: int) -> None:
    if prompt_tokens >= context:
        raise PromptTooLong(f"the prompt is {prompt_tokens} tokens but the context is {context}: shorten it or raise --context")


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


def chunk_end(start: int, chunk: int, length: int, blocks: Tensor | None) -> int:
    """Where a prefill chunk from `start` ends: `chunk` tokens on, but never inside an image block
    that attends both ways (its tokens must all be there when any of them is), and not past `length`."""
    end = min(start + chunk, length)
    if blocks is not None:
        while end < length and bool(((blocks[:, end - 1] == blocks[:, end]) & (blocks[:, end] >= 0)).any()):
            end += 1
    return end


def prefill(
    lm: CausalLM, cache: ModelCache, ids: Tensor, positions: Tensor, chunk: int, logits: bool = True, media: MediaInputs | None = None
) -> Tensor | None:
    """Feed tokens in chunks (attention never spans more than chunk x cache). KV-shared layers
    run only in the last chunk, on its last position, and not at all when no logits are wanted.
    -> logits [B, vocab] of the last position."""
    out, start, length = None, 0, ids.shape[1]
    while start < length:
        end = chunk_end(start, chunk, length, None if media is None else media.blocks)
        last = logits and end == length
        part = None if media is None else media.part(start, end)
        out = lm.step(ids[:, start:end], positions[:, start:end], cache, keep=1 if last else 0, media=part)
        start = end
    return None if out is None else out[:, -1]


class Batch:
    """Several prompts at once, in a fresh cache."""

    def __init__(self, lm: CausalLM, prompts: list[list[int]], context: int, prefill_chunk: int, pad_id: int):
        check_fits(max(len(p) for p in prompts), context)
        self.lm, self.chunk, self.pad_id = lm, prefill_chunk, pad_id
        self.ids, self.positions = left_pad(prompts, pad_id)
        self.cache = ModelCache.for_model(lm, len(prompts), context)
        self.next_position = self.positions[:, -1] + 1
        self.room = context - self.ids.shape[1]

    def start(self) -> tuple[Tensor, Tensor]:
        """-> (logits [B, vocab], token history [B, L] for repetition penalties)."""
        return prefill(self.lm, self.cache, self.ids, self.positions, self.chunk), self.ids  # type: ignore[return-value]

    def feed(self, tokens: Tensor, finished: Tensor) -> Tensor:
        fed = torch.where(finished, self.pad_id, tokens)
        positions = torch.where(finished, -1, self.next_position)
        self.next_position = self.next_position + 1
        return self.lm.step(fed[:, None], positions[:, None], self.cache, keep=1)[:, -1]  # type: ignore[index]


@dataclass
class Prompt:
    """What a session is asked to hold: token ids, and with media the soft tokens that stand in
    for the placeholders and what identifies each token for reuse (the same placeholders with a
    different image must not match)."""

    ids: list[int]
    media: MediaInputs | None = None  # [1, len(ids)]
    keys: list[Hashable] | None = None  # per token (default: its id)
    costs: list[tuple[str, int, str]] = field(default_factory=list)  # per media item: (kind, soft tokens, description)

    @property
    def identity(self) -> list[Hashable]:
        return self.keys if self.keys is not None else list(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


class Session:
    """One sequence whose cache outlives each call: a prompt that extends what is cached prefills
    only the new tokens. When a later prompt departs from the cached tokens (a chat template drops
    earlier thoughts, a user edits a message, an agent resends the same system prompt with a new
    question), the sliding layers' ring buffers cannot rewind by themselves: snapshots of them,
    taken at the marks a prompt names (chat: where turns open), let the cache roll back to the
    latest one at or before the departure and re-feed only what follows."""

    def __init__(self, lm: CausalLM, context: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.lm, self.context, self.chunk = lm, context, prefill_chunk
        self.reset()

    def reset(self) -> None:
        self.cache = ModelCache.for_model(self.lm, 1, self.context)
        self.tokens: list[int] = []  # the tokens whose K/V the cache holds, in order
        self.keys: list[Hashable] = []  # and what identifies each (Prompt.keys)
        self.snapshots: dict[int, CacheSnapshot] = {}  # by length
        self.reused = 0  # prompt tokens the last prompt did not have to feed (or re-feed)

    def reusable(self, prompt: Sequence[int] | Prompt) -> int:
        """How many leading tokens of `prompt` this cache can keep (the last one is always fed)."""
        common = 0
        for cached, new in zip(self.keys, prompt.identity if isinstance(prompt, Prompt) else prompt):
            if cached != new:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        if common == len(self.tokens) or self.cache.can_truncate(common):
            return common
        return max((n for n in self.snapshots if n <= common), default=0)

    def _rewind(self, keep: int) -> None:
        """Make the cache hold exactly self.tokens[:keep] (keep from `reusable`)."""
        if keep == len(self.tokens):
            return
        if self.cache.can_truncate(keep):
            self.cache.truncate(keep)
        elif keep in self.snapshots:
            self.cache.restore(self.snapshots[keep])
        else:
            assert keep == 0, "rewind to a point with no snapshot"
            self.cache = ModelCache.for_model(self.lm, 1, self.context)
        self.tokens, self.keys = self.tokens[:keep], self.keys[:keep]
        self.snapshots = {n: snap for n, snap in self.snapshots.items() if n <= keep}

    def _feed(self, prompt: Prompt, start: int, end: int, logits: bool) -> Tensor | None:
        ids = torch.tensor([prompt.ids[start:end]])
        positions = torch.arange(len(self.tokens), len(self.tokens) + end - start)[None]
        self.tokens += prompt.ids[start:end]
        self.keys += prompt.identity[start:end]
        media = None if prompt.media is None else prompt.media.part(start, end)
        return prefill(self.lm, self.cache, ids, positions, self.chunk, logits, media)

    def prefill_steps(self, prompt: Sequence[int] | Prompt, marks: Collection[int] = ()) -> Iterator[Tensor | None]:
        """Make the cache hold `prompt`, one chunk per step (so a server can decode other
        sequences in between); the last step yields the logits after the prompt, the others None.
        `marks` are where a later prompt may first differ: the ring buffers are snapshotted there.
        `reused` counts the prompt tokens kept from before."""
        check_fits(len(prompt), self.context)
        prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
        keep = self.reusable(prompt)
        self._rewind(keep)
        self.reused = keep
        marks = sorted(m for m in set(marks) if 0 < m < len(prompt))
        # Only this prompt's marks keep snapshots (memory is planned per mark).
        self.snapshots = {n: snap for n, snap in self.snapshots.items() if n in marks}
        at = keep
        while at < len(prompt):
            if at in marks and at not in self.snapshots:
                self.snapshots[at] = self.cache.snapshot()
            step = min([self.chunk, *(m - at for m in marks if m > at)])
            end = chunk_end(at, step, len(prompt), None if prompt.media is None else prompt.media.blocks)
            last = end == len(prompt)
            logits = self._feed(prompt, at, end, logits=last)
            at = end
            yield logits if last else None

    def start_prompt(self, prompt: Sequence[int] | Prompt, marks: Collection[int] = ()) -> tuple[Tensor, Tensor]:
        """All of `prefill_steps` at once -> (logits after the prompt [1, vocab], the prompt's ids [1, L])."""
        *_, logits = self.prefill_steps(prompt, marks)
        return logits, torch.tensor([prompt.ids if isinstance(prompt, Prompt) else list(prompt)])  # type: ignore[return-value]

    @property
    def room(self) -> int:
        return self.context - len(self.tokens)

    def nbytes(self) -> int:
        """K/V bytes held: the cache and its snapshots."""
        return sum(self.cache.nbytes_by_type().values()) + sum(s.nbytes() for s in self.snapshots.values())

    def feed(self, tokens: Tensor, finished: Tensor) -> Tensor:
        return decode_step(self.lm, [self], [int(tokens[0])])


def decode_step(lm: CausalLM, sessions: Sequence[Session], tokens: Sequence[int]) -> Tensor:
    """One new token for each session, as one batch (projections read the weights once for all;
    each attends over its own cache) -> logits [B, vocab]."""
    ids = torch.tensor([[t] for t in tokens])
    positions = torch.tensor([[len(s.tokens)] for s in sessions])
    logits = lm.step(ids, positions, [s.cache for s in sessions], keep=1)[:, -1]  # type: ignore[index]
    for session, token in zip(sessions, tokens):
        session.tokens.append(token)
        session.keys.append(token)
    return logits


def teacher_forced_logits(lm: CausalLM, ids: Sequence[int]) -> Tensor:
    """Logits [len(ids), vocab] at every position, as generation computes them: one cached decode
    step per token, each fed the text's next token rather than a sampled one. A one-shot forward
    (`lm(ids)`) runs other kernels; this is what a user of `generate` gets."""
    session = Session(lm, context=len(ids))
    rows = [session.start_prompt(list(ids[:1]))[0][0]]
    rows += [decode_step(lm, [session], [token])[0] for token in ids[1:]]
    return torch.stack(rows)


MAX_MARKS = 4  # snapshots a session keeps at most (the planner counts them)


def turn_marks(prompt: Sequence[int], turn_id: int | None) -> list[int]:
    """Where a later chat prompt is likely to depart from this one: where the first turn after
    the system turn opens (the same system prompt and tools, a new conversation), where the last
    user turn opens (the same history, a new or edited question), where the model's turn opens
    (its answer comes back re-rendered: templates drop the thinking), and the prompt's last
    token (the same prompt again: regenerate)."""
    opens = [i for i, t in enumerate(prompt) if t == turn_id]
    return sorted(set(opens[1:2] + opens[-2:] + [len(prompt) - 1]))[-MAX_MARKS:]


def sample_loop(
    feeder: Batch | Session,
    logits: Tensor,
    history: Tensor,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_ids: Collection[int],
    banned_ids: Collection[int],
) -> Iterator[Tensor]:
    """Yield the next token of every sequence, [B] per step; -1 for sequences already finished.
    A sequence finishes on a stop id (which is yielded, not fed) or after `max_new_tokens`."""
    generator = sampling.generator()
    banned = torch.tensor(sorted(banned_ids), dtype=torch.long)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    finished = torch.zeros(history.shape[0], dtype=torch.bool)
    budget = min(max_new_tokens, feeder.room)
    for step in range(budget):
        token = sample(logits.float().index_fill(-1, banned, float("-inf")), sampling, history, generator)
        token = torch.where(finished, -1, token)
        yield token
        finished |= torch.isin(token, stops)
        if finished.all() or step + 1 == budget:
            return
        history = torch.cat((history, token.clamp(min=0)[:, None]), dim=1)
        logits = feeder.feed(token, finished)


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
    """A batch of prompts in a fresh cache; see `sample_loop`."""
    batch = Batch(lm, prompts, context or lm.config.max_position_embeddings, prefill_chunk, pad_id)
    logits, history = batch.start()
    yield from sample_loop(batch, logits, history, max_new_tokens, sampling, stop_ids, banned_ids)
