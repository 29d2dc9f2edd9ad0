"""OpenAI requests -> engine jobs: the prompt, its limits, sampling and constraints, every
problem refused here with a 400 that names the field — before anything is queued or streamed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...errors import Gemma4Error
from ...runtime.constrained import InvalidGrammar
from ...runtime.engine import Model
from ...runtime.generate import Prompt, turn_marks
from ...runtime.scheduler import Job, Usage
from .outputs import Bridge, ChatOutput, TextOutput
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, Message, Sampling
from .served import ServedModel

MAX_STOP_STRINGS = 16
MEDIA_PARTS = ("image_url", "input_audio", "video_url")


@dataclass
class Prepared:
    job: Job
    bridge: Bridge
    model_name: str


def check_model(served: ServedModel, name: str | None) -> None:
    if name is not None and name != served.name:
        raise APIError(404, f"the model {name!r} does not exist here: this server serves {served.name!r} (GET /v1/models)",
                       param="model", code="model_not_found")


def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Pydantic messages -> the dicts the chat renderer reads; arguments must be JSON objects."""
    out = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True, exclude={"reasoning_content", "reasoning"})
        if isinstance(message.content, list):
            for part in message.content:
                if part.type not in ("text", *MEDIA_PARTS):
                    raise APIError(400, f"messages[{i}].content has a {part.type!r} part: expected text, {', '.join(MEDIA_PARTS)}",
                                   param=f"messages[{i}].content")
        for j, call in enumerate(message.tool_calls or []):
            arguments = call.function.arguments
            try:
                parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
            except json.JSONDecodeError as e:
                raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({e.msg})",
                               param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
            if not isinstance(parsed, dict):
                raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object",
                               param=f"messages[{i}].tool_calls[{j}].function.arguments")
        out.append(item)
    return out


def _limits(model: Model, prompt: Prompt, asked: int | None) -> int:
    """The answer's token budget; a prompt or budget beyond the context is refused, never cut."""
    room = model.context - len(prompt)
    if room <= 0 or (asked is not None and asked > room):
        wanted = f"{len(prompt)} in the prompt" + (f" + {asked} in max_tokens" if asked is not None else "")
        raise APIError(400, f"this model's context is {model.context} tokens, but the request needs {len(prompt) + (asked or 1)} "
                       f"({wanted}): shorten the prompt or lower max_tokens", param="messages", code="context_length_exceeded")
    return asked or room


def _sampling(model: Model, request: Sampling):  # noqa: ANN202 - SamplingParams
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < model.config.vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0..{model.config.vocab_size - 1})", param="logit_bias")
        bias[int(key)] = max(-100.0, min(100.0, value))
    options = {k: getattr(request, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")}
    options |= {"presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty, "logit_bias": bias}
    try:
        return model.sampling(**options)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _stops(request: Sampling) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    return stops


def _one_choice(request: Sampling) -> None:
    if request.n != 1:
        raise APIError(400, "n > 1 is not supported: send n requests instead (they run in parallel)", param="n")


def prepare_chat(served: ServedModel, request: ChatCompletionRequest, loop: asyncio.AbstractEventLoop, on_end: Callable[[str, Usage], None] | None = None) -> Prepared:
    model = served.ready
    check_model(served, request.model)
    _one_choice(request)
    messages = chat_messages(request.messages)
    thinking = request.reasoning_effort not in (None, "none")
    if request.chat_template_kwargs and "enable_thinking" in request.chat_template_kwargs:
        thinking = bool(request.chat_template_kwargs["enable_thinking"])
    tools = [t.model_dump(exclude_none=True) for t in request.tools or []]
    choice = request.tool_choice or "auto"
    if choice != "auto" and choice != "none" and not tools:
        raise APIError(400, "tool_choice asks for a tool call but the request has no tools", param="tool_choice")
    try:
        prompt = model.chat_prompt(messages, tools or None, thinking)
    except Gemma4Error as e:
        raise APIError(400, str(e), param="messages") from None
    banned = set(model.banned_ids)
    if choice == "none":
        banned |= model.tokenizer.ids_of(["<|tool_call>"])  # type: ignore[union-attr]
    constraint = None
    try:
        if choice not in ("auto", "none"):
            only = None if choice == "required" else choice.function.name  # type: ignore[union-attr]
            constraint = served.grammars_or_error().tool_calls(tools, only, request.parallel_tool_calls, thinking)
        elif request.response_format is not None and request.response_format.type != "text":
            schema = None
            if request.response_format.type == "json_schema":
                if request.response_format.json_schema is None or request.response_format.json_schema.schema_ is None:
                    raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
                schema = request.response_format.json_schema.schema_
            constraint = served.grammars_or_error().json(schema, thinking)
    except InvalidGrammar as e:
        raise APIError(400, str(e), param="tools" if choice not in ("auto", "none") else "response_format") from None
    budget = _limits(model, prompt, request.max_completion_tokens or request.max_tokens)
    bridge = Bridge(ChatOutput(model.tokenizer, _stops(request), model.chat_stop_ids), loop, on_end)  # type: ignore[arg-type]
    job = Job(
        prompt, budget, _sampling(model, request), model.chat_stop_ids, bridge,
        marks=turn_marks(prompt.ids, model.tokenizer.token_id("<|turn>")),  # type: ignore[union-attr]
        banned_ids=banned,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        constraint=None if constraint is None else served.grammars.constraint(constraint),  # type: ignore[union-attr]
    )
    return Prepared(job, bridge, served.name)


def completion_prompt(model: Model, prompt: Any) -> Prompt:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request: send several requests instead (they run in parallel)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer: send token ids as the prompt", param="prompt")
        return Prompt(model.tokenizer.prompt_ids(prompt))
    if not prompt or any(not 0 <= t < model.config.vocab_size for t in prompt):
        raise APIError(400, f"prompt token ids must be 0..{model.config.vocab_size - 1}, at least one", param="prompt")
    return Prompt(model.one_bos(prompt))


def prepare_completion(served: ServedModel, request: CompletionRequest, loop: asyncio.AbstractEventLoop, on_end: Callable[[str, Usage], None] | None = None) -> Prepared:
    model = served.ready
    check_model(served, request.model)
    _one_choice(request)
    if model.tokenizer is None:
        raise APIError(400, "this checkpoint has no tokenizer: the server needs one to answer in text")
    prompt = completion_prompt(model, request.prompt)
    budget = _limits(model, prompt, request.max_tokens)
    bridge = Bridge(TextOutput(model.tokenizer, _stops(request), model.stop_ids), loop, on_end)
    job = Job(prompt, budget, _sampling(model, request), model.stop_ids, bridge, marks=(len(prompt) - 1,),
              banned_ids=model.banned_ids, logprobs=request.logprobs)
    return Prepared(job, bridge, served.name)
