"""Engine output as OpenAI responses: Server-Sent Events chunk by chunk, or one object. Both are
built from the same deltas, so a streamed answer and a whole one are the same answer."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ...runtime.scheduler import TokenStep, Usage
from ...runtime.tokenizer import Tokenizer
from .outputs import End, Update


def usage_body(usage: Usage, reasoning_tokens: int, media: list[tuple[str, int, str]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """OpenAI's usage; `media` (kind, tokens, description) adds image_tokens (images and video frames) and audio_tokens."""
    details: dict[str, Any] = {"cached_tokens": usage.cached_tokens}
    for name, kinds in (("image_tokens", ("image", "video")), ("audio_tokens", ("audio",))):
        if any(kind in kinds for kind, _, _ in media):
            details[name] = sum(tokens for kind, tokens, _ in media if kind in kinds)
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def timings_body(usage: Usage) -> dict[str, Any]:
    """Beyond OpenAI (as llama.cpp's server adds): what a user wants to see about speed."""
    decoded = max(usage.completion_tokens - 1, 0)
    return {
        "queued_ms": round(usage.queued_seconds * 1e3, 1),
        "first_token_ms": round(usage.first_token_seconds * 1e3, 1),
        "decode_tokens_per_second": round(decoded / usage.decode_seconds, 2) if usage.decode_seconds > 0 else None,
        "cached_tokens": usage.cached_tokens,
    }


class Completion:
    """One answer in OpenAI's shape: `chat` (chat.completion) or text (text_completion)."""

    def __init__(self, chat: bool, model: str, tokenizer: Tokenizer, prefix: str = "", media: list[tuple[str, int, str]] = ()):  # type: ignore[assignment]
        self.chat, self.model, self.tokenizer, self.media = chat, model, tokenizer, list(media)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prefix = prefix  # text completions with echo: the prompt comes first

    # --- pieces -------------------------------------------------------------------------
    def logprobs(self, steps: list[TokenStep]) -> dict[str, Any] | None:
        if not steps:
            return None
        text = lambda i: self.tokenizer.decode([i])  # noqa: E731
        if self.chat:
            entry = lambda i, lp: {"token": text(i), "logprob": lp, "bytes": list(text(i).encode())}  # noqa: E731
            return {"content": [{**entry(s.id, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top or []]} for s in steps]}
        return {
            "tokens": [text(s.id) for s in steps],
            "token_logprobs": [s.logprob for s in steps],
            "top_logprobs": [{text(i): lp for i, lp in s.top or []} for s in steps],
        }

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None, logprobs: list[TokenStep] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = (delta or {}).get("text", "")
        choice["logprobs"] = self.logprobs(logprobs or [])
        choice["finish_reason"] = finish
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    # --- whole ----------------------------------------------------------------------------
    def whole(self, updates: list[Update], end: End) -> dict[str, Any]:
        deltas = [d for u in updates for d in u.deltas]
        steps = [s for u in updates for s in u.logprobs]
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            content = "".join(d.get("content", "") for d in deltas)
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
            calls: list[dict[str, Any]] = []
            for d in deltas:
                for call in d.get("tool_calls", []):
                    if "id" in call:
                        calls.append({"id": call["id"], "type": "function", "function": dict(call["function"])})
                    else:
                        calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
            if reasoning:
                message["reasoning_content"] = message["reasoning"] = reasoning
            if calls:
                message["tool_calls"] = calls
            choice["message"] = message
        else:
            choice["text"] = self.prefix + "".join(d.get("text", "") for d in deltas)
        choice["logprobs"] = self.logprobs(steps)
        choice["finish_reason"] = end.reason
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_body(end.usage, end.reasoning_tokens, self.media),
            "timings": timings_body(end.usage),
        }


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def stream(completion: Completion, updates: AsyncIterator[Update | End], include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body: a first chunk with the role, one per update, the finishing chunk, usage, [DONE]."""
    yield sse(completion.chunk({"role": "assistant", "content": ""} if completion.chat else {"text": completion.prefix}))
    async for item in updates:
        last = item.last if isinstance(item, End) else item
        for delta in last.deltas:
            yield sse(completion.chunk(delta, logprobs=last.logprobs))
            last.logprobs = []
        if last.logprobs:  # log-probabilities of tokens whose text is still held back
            yield sse(completion.chunk(None, logprobs=last.logprobs))
        if isinstance(item, End):
            if item.reason == "error":
                yield sse({"error": {"message": f"generation failed: {item.error}", "type": "server_error", "param": None, "code": None}})
            else:
                yield sse(completion.chunk(None, finish=item.reason))
                if include_usage:
                    body = completion.chunk(None)
                    body["choices"] = []
                    yield sse({**body, "usage": usage_body(item.usage, item.reasoning_tokens, completion.media), "timings": timings_body(item.usage)})
    yield sse("[DONE]")


async def gather(updates: AsyncIterator[Update | End], disconnected: Callable[[], Awaitable[bool]]) -> tuple[list[Update], End | None]:
    """All of an answer, or (None) when the client left before it was done."""
    collected: list[Update] = []
    iterator = updates.__aiter__()
    while True:
        task = asyncio.ensure_future(iterator.__anext__())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await disconnected():
                task.cancel()
                return collected, None
        item = task.result()
        if isinstance(item, End):
            collected.append(item.last)
            return collected, item
        collected.append(item)
