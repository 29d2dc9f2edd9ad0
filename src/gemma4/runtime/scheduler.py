"""The engine worker a server stands on: one thread owns the model and every cache, and answers
many requests at once.

- Slots: `parallel` sequences, each with a cache of its own (a `Session`). A slot that finishes
  keeps its cache, and the next request that shares a prefix with it prefills only the rest
  (the prefix cache); the session rolls back to a snapshot where a new prompt departs.
- Continuous batching: each step decodes one token for every running sequence as one batch
  (the weights are read once for all of them) and prefills one chunk of a waiting prompt, so a
  long prompt delays the running streams by one chunk at a time, never by all of it.
- Requests beyond the slots wait in a bounded queue; a cancelled one (its client went away)
  leaves before the next step and frees its slot at once.

Token ids in, token ids out: prompts, parsing and protocols belong to the callers."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ..errors import Gemma4Error
from ..model import CausalLM
from .constrained import Constraint
from .generate import Prompt, Session, check_fits, decode_step
from .sampling import SamplingParams, sample


class QueueFull(Gemma4Error):
    pass


@dataclass
class TokenStep:
    id: int
    logprob: float | None = None  # the model's log-probability of this token (when asked)
    top: list[tuple[int, float]] | None = None  # the most likely tokens at this step, with theirs


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens that were already in a slot's cache
    completion_tokens: int = 0
    queued_seconds: float = 0.0
    first_token_seconds: float = 0.0  # from submission to the first token
    decode_seconds: float = 0.0  # from the first token to the last


class Sink(Protocol):
    """Where a job's output goes. Called on the engine thread: keep it quick."""

    def token(self, step: TokenStep) -> bool:
        """One sampled token (the final stop token included); False ends the answer here."""
        ...

    def end(self, reason: str, usage: Usage, error: str | None = None) -> None:
        """reason: "stop" | "length" | "cancelled" | "error"."""
        ...


@dataclass(eq=False)
class Job:
    prompt: Prompt
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: Collection[int]
    sink: Sink
    marks: Sequence[int] = ()  # where a later prompt may depart from this one (Session.prefill_steps)
    banned_ids: Collection[int] = ()
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k likeliest
    constraint: Constraint | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class Slot:
    session: Session
    job: Job | None = None
    prefill: Iterator[Tensor | None] | None = None  # the prompt's remaining chunks
    next_token: int | None = None  # sampled, to be fed in the next decode step
    answer: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    allowed: Tensor | None = None  # bool [vocab]: False for the job's banned tokens (None: none banned)
    usage: Usage = field(default_factory=Usage)
    first_token_at: float = 0.0
    last_used: float = 0.0


class Scheduler:
    def __init__(self, lm: CausalLM, context: int, parallel: int, prefill_chunk: int, max_queue: int = 64):
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.lm, self.context, self.max_queue = lm, context, max_queue
        self.slots = [Slot(Session(lm, context, prefill_chunk)) for _ in range(parallel)]
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gemma4-engine", daemon=True)

    # --- the callers' side (any thread) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> None:
        check_fits(len(job.prompt), self.context)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting: try again shortly")
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (a client went away); its slot is free before the next step."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def running(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def cache_bytes(self) -> int:
        """K/V bytes every slot holds now, snapshots included (what the plan bounds)."""
        return sum(slot.session.nbytes() for slot in self.slots)

    # --- the engine thread --------------------------------------------------------------
    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not any(s.job for s in self.slots):
                    self._wake.wait()
                if self._stopping:
                    return
                self._admit()
            self.step()

    def _admit(self) -> None:
        """Waiting jobs into free slots, each to the slot whose cache it can reuse most."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.sink.end("cancelled", Usage(prompt_tokens=len(job.prompt)))
        while self._waiting:
            job = self._waiting[0]
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            slot = max(free, key=lambda s: (s.session.reusable(job.prompt), -s.last_used))
            self._waiting.popleft()
            slot.job, slot.answer, slot.next_token = job, [], None
            slot.generator = job.sampling.generator()
            slot.allowed = None
            if job.banned_ids:
                slot.allowed = torch.ones(self.lm.config.vocab_size, dtype=torch.bool)
                slot.allowed[list(job.banned_ids)] = False
            slot.prefill = slot.session.prefill_steps(job.prompt, job.marks)
            slot.usage = Usage(prompt_tokens=len(job.prompt), queued_seconds=time.perf_counter() - job.submitted)

    def step(self) -> None:
        """Drop cancelled jobs, prefill one chunk of the oldest waiting prompt, decode one token for every running sequence."""
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                self._finish(slot, "cancelled")
        prefilling = [s for s in self.slots if s.job is not None and s.prefill is not None]
        if prefilling:
            slot = min(prefilling, key=lambda s: s.job.submitted)  # type: ignore[union-attr]
            self._guarded([slot], lambda: self._prefill_chunk(slot))
        decoding = [s for s in self.slots if s.job is not None and s.next_token is not None]
        if decoding:
            self._guarded(decoding, lambda: self._decode(decoding))

    def _guarded(self, slots: list[Slot], work) -> None:  # noqa: ANN001
        """Run a step; if it fails, end its jobs with the error (their caches are discarded) and keep serving."""
        try:
            work()
        except Exception as error:  # noqa: BLE001 - one request's failure must not take the server down
            for slot in slots:
                slot.session.reset()
                if slot.job is not None:
                    self._finish(slot, "error", f"{type(error).__name__}: {error}")

    def _prefill_chunk(self, slot: Slot) -> None:
        logits = next(slot.prefill)  # type: ignore[arg-type]
        if logits is None:
            return
        slot.prefill = None
        slot.usage.cached_tokens = slot.session.reused
        self._emit(slot, logits)

    def _decode(self, slots: list[Slot]) -> None:
        logits = decode_step(self.lm, [s.session for s in slots], [s.next_token for s in slots])  # type: ignore[misc]
        for slot, row in zip(slots, logits):
            self._emit(slot, row[None])

    def _emit(self, slot: Slot, logits: Tensor) -> None:
        """Choose the next token from logits [1, vocab], hand it to the job, decide whether to go on."""
        job = slot.job
        assert job is not None
        raw = logits.float()
        allowed = slot.allowed
        if job.constraint is not None:
            allowed = job.constraint.allowed() if allowed is None else allowed & job.constraint.allowed()
        params = job.sampling
        history = torch.tensor([job.prompt.ids + slot.answer]) if params.repetition_penalty != 1.0 else torch.zeros(1, 0, dtype=torch.long)
        answer = torch.tensor([slot.answer], dtype=torch.long)
        choices = raw if allowed is None else raw.masked_fill(~allowed, float("-inf"))
        token = int(sample(choices, params, history, slot.generator, answer)[0])
        now = time.perf_counter()
        if not slot.answer:
            slot.first_token_at = now
            slot.usage.first_token_seconds = now - job.submitted
        slot.usage.decode_seconds = now - slot.first_token_at
        slot.answer.append(token)
        if job.constraint is not None:
            job.constraint.advance(token)
        go_on = job.sink.token(self._step_record(raw, token, job.logprobs))
        slot.usage.completion_tokens = len(slot.answer)
        if token in job.stop_ids or not go_on:
            self._finish(slot, "stop")
        elif len(slot.answer) >= job.max_new_tokens or slot.session.room <= 0:
            self._finish(slot, "length")
        else:
            slot.next_token = token

    @staticmethod
    def _step_record(logits: Tensor, token: int, top: int | None) -> TokenStep:
        if top is None:
            return TokenStep(token)
        logprobs = logits[0].log_softmax(-1)
        best = torch.topk(logprobs, top) if top else None
        pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
        return TokenStep(token, float(logprobs[token]), pairs)

    def _finish(self, slot: Slot, reason: str, error: str | None = None) -> None:
        job = slot.job
        assert job is not None
        if slot.prefill is not None:  # stopped mid-prompt: the cache keeps what was fed
            slot.prefill.close()
        slot.job, slot.prefill, slot.next_token = None, None, None
        slot.last_used = time.perf_counter()
        job.sink.end(reason, slot.usage, error)
