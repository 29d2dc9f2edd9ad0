"""The server's stream paths fed the token sequences a real Gemma 4 writes: thinking, split
tags, a call right after thinking, a call after a tool result. Chunks must be what strict
clients expect, no markup may reach content, and the whole answer must equal the stream."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from gemma4.interfaces.server.outputs import Bridge, ChatOutput, End
from gemma4.interfaces.server.responses import Completion, stream
from gemma4.runtime.scheduler import TokenStep, Usage
from gemma4.runtime.tokenizer import Tokenizer

MARKUP = re.compile(r"<\|channel>|<channel\|>|<\|tool_call>|<tool_call\|>|<\|\"\|>|<turn\|>|<\|turn>|<\|tool_response>|<\|?think")
TURN_END, TOOL_RESPONSE = 106, 50

THOUGHT_THEN_ANSWER = "<|channel>thought\nThe user greets me; answer briefly.<channel|>Hello! How can I help?<turn|>"
CALL_AFTER_THOUGHT = '<|channel>thought\nI need the weather.<channel|><|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:3}<tool_call|><|tool_response>'
# After a tool result the model's turn goes on (no new turn opens): an answer, then another call.
CALL_AFTER_RESULT = 'It is sunny in Paris.<|tool_call>call:search{query:<|"|>umbrella shops<|"|>,filters:{open:true}}<tool_call|><|tool_response>'
TWO_CALLS = '<|tool_call>call:a{x:1}<tool_call|><|tool_call>call:b{y:<|"|>z<|"|>}<tool_call|><|tool_response>'


@pytest.fixture(scope="module")
def tokenizer(checkpoints) -> Tokenizer:
    return Tokenizer.from_folder(checkpoints("tiny-e2b"))


def token_ids(tokenizer: Tokenizer, text: str, split: bool) -> list[int]:
    """As the model emits it: tags as their special tokens, or (split) every character a token of its own."""
    return [i for ch in text for i in tokenizer.encode(ch)] if split else tokenizer.encode(text)


def run(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[dict], dict]:
    """Drive one answer through the engine-side output and the SSE writer, as the server does."""

    async def go() -> tuple[list[dict], dict]:
        bridge = Bridge(ChatOutput(tokenizer, (), {TURN_END, TOOL_RESPONSE}), asyncio.get_running_loop())
        usage = Usage(prompt_tokens=5)
        for n, token in enumerate(ids, 1):
            usage.completion_tokens = n
            if not bridge.token(TokenStep(token)):
                break
        bridge.end("stop", usage)
        completion = Completion(True, "m", tokenizer)
        updates = [item async for item in bridge]
        chunks = [json.loads(c.decode()[6:]) for c in [x async for x in stream(completion, _replay(updates), True)][:-1]]
        whole = completion.whole([u.last if isinstance(u, End) else u for u in updates], updates[-1])
        return chunks, whole

    return asyncio.run(go())


async def _replay(items):  # noqa: ANN001, ANN202
    for item in items:
        yield item


@pytest.mark.parametrize("split", [False, True], ids=["whole tags", "split tags"])
def test_thinking_is_reasoning_never_content(tokenizer, split):
    chunks, whole = run(tokenizer, token_ids(tokenizer, THOUGHT_THEN_ANSWER, split))
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "The user greets me; answer briefly."
    assert message["content"] == "Hello! How can I help?"
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert not any(MARKUP.search(d.get("content", "") + d.get("reasoning_content", "")) for d in deltas)


@pytest.mark.parametrize("split", [False, True], ids=["whole tags", "split tags"])
@pytest.mark.parametrize("text, calls", [
    (CALL_AFTER_THOUGHT, [("get_weather", {"city": "Paris, FR", "days": 3})]),
    (CALL_AFTER_RESULT, [("search", {"query": "umbrella shops", "filters": {"open": True}})]),
    (TWO_CALLS, [("a", {"x": 1}), ("b", {"y": "z"})]),
], ids=["call after thinking", "call after a tool result", "parallel calls"])
def test_tool_calls_stream_as_strict_clients_expect(tokenizer, split, text, calls):
    chunks, whole = run(tokenizer, token_ids(tokenizer, text, split))
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in choice["message"]["tool_calls"])
    assert len({c["id"] for c in choice["message"]["tool_calls"]}) == len(calls)
    if text == CALL_AFTER_RESULT:
        assert choice["message"]["content"] == "It is sunny in Paris."
    else:
        assert choice["message"]["content"] is None
    tool_deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    for index, (name, _) in enumerate(calls):
        mine = [d for d in tool_deltas if d["index"] == index]
        assert mine[0]["id"] and mine[0]["type"] == "function" and mine[0]["function"]["name"] == name
        assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in mine[1:])
        assert "".join(d["function"]["arguments"] for d in mine) == choice["message"]["tool_calls"][index]["function"]["arguments"]
    contents = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert not MARKUP.search(contents)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_stop_strings_cut_content_and_end_the_answer(tokenizer):
    bridge_output = ChatOutput(tokenizer, ["How"], {TURN_END})
    ids = token_ids(tokenizer, "Hello! How can I help?<turn|>", split=True)
    shown, went_on = [], True
    for token in ids:
        update, went_on = bridge_output.push(TokenStep(token))
        shown += [d["content"] for d in update.deltas]
        if not went_on:
            break
    shown += [d["content"] for d in bridge_output.finish().deltas]
    assert "".join(shown) == "Hello! " and not went_on
