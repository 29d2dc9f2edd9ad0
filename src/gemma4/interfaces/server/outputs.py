"""A job's tokens as OpenAI deltas, computed on the engine thread and handed to the request's
event loop. Chat answers go through the token-level chat parser, so no Gemma markup can reach
`content`; text completions through the stream decoder. Both honour stop strings."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...runtime.chat_parser import Event, OutputParser
from ...runtime.scheduler import TokenStep, Usage
from ...runtime.stop_strings import StopStrings
from ...runtime.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Update:
    """What one step adds: deltas (chat: message fields; text: {"text": ...}) and log-probabilities."""

    deltas: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[TokenStep] = field(default_factory=list)


@dataclass
class End:
    reason: str  # stop | length | cancelled | error | tool_calls
    usage: Usage
    error: str | None
    reasoning_tokens: int = 0
    last: Update = field(default_factory=Update)


class ChatOutput:
    """Tokens -> chat deltas: content, reasoning (also mirrored as `reasoning`), tool calls."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], stop_ids: set[int]):
        self.parser = OutputParser(tokenizer)
        self.stops = StopStrings(stop)
        self.stop_ids = stop_ids
        self.tool_calls = 0
        self.reasoning_tokens = 0

    def push(self, step: TokenStep) -> tuple[Update, bool]:
        thinking = self.parser.state in ("channel_name", "thought")
        events = self.parser.push(step.id)
        if thinking or any(e.kind == "reasoning" for e in events):
            self.reasoning_tokens += 1
        update = Update(self._deltas(events), [] if step.id in self.stop_ids or step.logprob is None else [step])
        return update, self.parser.state != "done" and not self.stops.hit

    def finish(self) -> Update:
        update = Update(self._deltas(self.parser.finish()))
        if rest := self.stops.flush():
            update.deltas.append({"content": rest})
        return update

    def _deltas(self, events: list[Event]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for event in events:
            if event.kind == "content":
                if text := self.stops.push(event.text):
                    deltas.append({"content": text})
            elif event.kind == "reasoning":
                deltas.append({"reasoning_content": event.text, "reasoning": event.text})
            elif not self.stops.hit:  # a tool call: its name first, then its arguments (strict clients expect both)
                index, call = self.tool_calls, event.call
                self.tool_calls += 1
                call_id = f"call_{uuid.uuid4().hex[:24]}"
                deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": {"name": call.name, "arguments": ""}}]})  # type: ignore[union-attr]
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": json.dumps(call.arguments)}}]})  # type: ignore[union-attr]
        return deltas


class TextOutput:
    """Tokens -> text deltas for /v1/completions."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], stop_ids: set[int]):
        self.decoder = StreamDecoder(tokenizer, skip_special=True)
        self.stops = StopStrings(stop)
        self.stop_ids = stop_ids
        self.reasoning_tokens = 0

    def push(self, step: TokenStep) -> tuple[Update, bool]:
        if step.id in self.stop_ids:
            return Update(), False
        text = self.stops.push(self.decoder.push(step.id))
        return Update([{"text": text}] if text else [], [] if step.logprob is None else [step]), not self.stops.hit

    def finish(self) -> Update:
        text = self.stops.push(self.decoder.flush()) + self.stops.flush()
        return Update([{"text": text}] if text else [])


class Bridge:
    """The scheduler's Sink for one job: output computed on the engine thread, read as an async iterator."""

    def __init__(self, output: ChatOutput | TextOutput, loop: asyncio.AbstractEventLoop, on_end: Callable[[str, Usage], None] | None = None):
        self.output, self.loop, self.on_end = output, loop, on_end
        self.queue: asyncio.Queue[Update | End] = asyncio.Queue()

    def token(self, step: TokenStep) -> bool:
        update, go_on = self.output.push(step)
        if update.deltas or update.logprobs:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, update)
        return go_on

    def end(self, reason: str, usage: Usage, error: str | None = None) -> None:
        last = self.output.finish()
        if reason == "stop" and getattr(self.output, "tool_calls", 0):
            reason = "tool_calls"
        if self.on_end is not None:  # here, not where the answer is read: a client may be gone
            self.on_end(reason, usage)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, End(reason, usage, error, self.output.reasoning_tokens, last))

    async def __aiter__(self) -> AsyncIterator[Update | End]:
        while True:
            item = await self.queue.get()
            yield item
            if isinstance(item, End):
                return
