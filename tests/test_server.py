"""`gemma4 serve` as clients use it: a real server process on a loopback port, driven by the
official `openai` client and by raw HTTP for every error a client can cause."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from serving import Server

CONTEXT = 1024
MARKUP = re.compile(r"<\|channel>|<channel\|>|<\|tool_call>|<tool_call\|>|<\|\"\|>|<turn\|>|<\|turn>|<\|tool_response>")
ALARM_TOOL = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "description": "Set an alarm.",
        "parameters": {
            "type": "object",
            "properties": {
                "hour": {"type": "integer"},
                "label": {"type": "string", "maxLength": 8},
                "loud": {"type": "boolean"},
                "tone": {"enum": ["beep", "chime"]},
            },
            "required": ["hour", "tone"],
        },
    },
}
# Numeric bounds are beyond the Gemma-syntax translation: this one is constrained as JSON.
COUNT_TOOL = {
    "type": "function",
    "function": {
        "name": "count",
        "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"], "additionalProperties": False},
    },
}
VERDICT = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 10}, "note": {"type": "string", "maxLength": 6}},
    "required": ["answer", "score", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(checkpoints):
    # int4 weights: its kernel computes each row of a batch exactly as it computes the row alone.
    running = Server(checkpoints("tiny-e2b"), "--quant", "int4", "--context", str(CONTEXT), "--parallel", "4", "--metrics")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def name(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def chat(client, name, text: str, **options):  # noqa: ANN001, ANN201
    options = {"max_tokens": 12, "temperature": 0, **options}
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}], **options)


def test_health_and_models(server, client, name):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    (card,) = client.models.list().data
    assert card.id == name and card.max_model_len == CONTEXT
    assert client.models.retrieve(name).id == name


def test_chat_streamed_equals_whole(client, name):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content and content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert not MARKUP.search(content)


def test_text_completions_stream_echo_and_stop(client, name):
    whole = client.completions.create(model=name, prompt="Once upon a time", max_tokens=10, temperature=0)
    text = whole.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=name, prompt="Once upon a time", max_tokens=10,
                                                                         temperature=0, stream=True))
    assert streamed == text and len(text) > 6
    echoed = client.completions.create(model=name, prompt="Once upon a time", max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + text
    stop = text[3:6]
    stopped = client.completions.create(model=name, prompt="Once upon a time", max_tokens=10, temperature=0, stop=[stop, "never"])
    assert stopped.choices[0].text == text[: text.find(stop)] and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 10


def test_logprobs(client, name):
    answer = chat(client, name, "Hi", logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert entry.logprob <= 0
    text = client.completions.create(model=name, prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.token_logprobs) == 4 and all(len(t) == 2 for t in text.choices[0].logprobs.top_logprobs)


def test_sampling_options_are_honoured(server, client, name):
    extra = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}  # beyond OpenAI's own fields
    sampled = lambda seed: chat(client, name, "Hi", temperature=1.0, top_p=0.9, seed=seed, presence_penalty=0.5,  # noqa: E731
                                frequency_penalty=0.5, extra_body=extra).choices[0].message.content
    assert sampled(1) == sampled(1)
    assert len({sampled(seed) for seed in range(4)}) > 1
    # logit_bias: a token pushed up by 100 wins.
    forced = client.completions.create(model=name, prompt="x", max_tokens=1, temperature=0, logit_bias={"1000": 100})
    assert forced.choices[0].text == httpx.post(f"{server.url}/detokenize", json={"tokens": [1000]}).json()["prompt"]


def test_tool_calls_required_and_named_are_valid(client, name):
    tools = [ALARM_TOOL, COUNT_TOOL]
    messages = [{"role": "user", "content": "Wake me at seven"}]
    answer = client.chat.completions.create(model=name, messages=messages, tools=tools, tool_choice="required", parallel_tool_calls=False,
                                            max_tokens=120, temperature=0)
    (call,) = answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "tool_calls" and not answer.choices[0].message.content
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.id and call.type == "function"

    named = client.chat.completions.create(model=name, messages=messages, tools=tools, max_tokens=60, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "count"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "count"
    jsonschema.validate(json.loads(call.function.arguments), COUNT_TOOL["function"]["parameters"])

    alarm = client.chat.completions.create(model=name, messages=messages, tools=tools, max_tokens=120, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "set_alarm"}})
    whole = alarm.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(whole.function.arguments), ALARM_TOOL["function"]["parameters"])
    chunks = list(client.chat.completions.create(model=name, messages=messages, tools=tools, max_tokens=120, temperature=0, stream=True,
                                                 tool_choice={"type": "function", "function": {"name": "set_alarm"}}))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "set_alarm"
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_history_and_tool_choice_none(client, name):
    messages = [
        {"role": "user", "content": "Wake me at seven"},
        {"role": "assistant", "content": None, "reasoning_content": "The user wants an alarm.",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "set_alarm", "arguments": '{"hour": 7, "tone": "beep"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'},
    ]
    answer = client.chat.completions.create(model=name, messages=messages, tools=[ALARM_TOOL], tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"


def test_structured_output(server, client, name):
    answer = chat(client, name, "Verdict?", max_tokens=60, response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": VERDICT}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), VERDICT)
    # Any JSON object: pushed toward '}', the grammar still insists on the '{' before it.
    brace = httpx.post(f"{server.url}/tokenize", json={"prompt": "}", "add_special_tokens": False}).json()["tokens"]
    obj = chat(client, name, "JSON please", max_tokens=20, response_format={"type": "json_object"}, logit_bias={str(brace[0]): 100})
    assert json.loads(obj.choices[0].message.content) == {}


def test_thinking_switches(client, name):
    tokens = lambda **kw: chat(client, name, "Hi", max_tokens=1, **kw).usage.prompt_tokens  # noqa: E731
    off, high = tokens(reasoning_effort="none"), tokens(reasoning_effort="high")
    assert off != high
    assert tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == high
    assert tokens() == off


def test_tokenize_and_detokenize(server, name):
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": name, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["tokens"][0] == 2 and tokens["max_model_len"] == CONTEXT
    text = httpx.post(f"{server.url}/detokenize", json={"model": name, "tokens": tokens["tokens"][1:]}).json()
    assert text == {"prompt": "Hello world"}
    chat_tokens = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    assert chat_tokens[:2] == [2, 105]


def test_prefix_cache_prefills_only_what_is_new(server, client, name):
    system = {"role": "system", "content": "You answer questions about the following document. " + "The quick brown fox jumps over the lazy dog. " * 12}
    question = {"role": "user", "content": "First question?"}
    first_prompt = httpx.post(f"{server.url}/tokenize", json={"messages": [system, question]}).json()["tokens"]
    user_turn = first_prompt.index(105, 2)  # where the system turn ends and the user's opens: <|turn>
    model_turn = len(first_prompt) - 1 - first_prompt[::-1].index(105)  # where the model's turn opens
    assert user_turn > 100  # many times the tiny model's sliding window (8)
    first = client.chat.completions.create(model=name, messages=[system, question], max_tokens=4, temperature=0)
    # An agent's next turn: the whole exchange comes back (the answer re-rendered), plus a new message.
    history = [system, question, {"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=name, messages=history, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == model_turn
    # The same system prompt with a new question.
    third = client.chat.completions.create(model=name, messages=[system, {"role": "user", "content": "Another one?"}], max_tokens=4, temperature=0)
    assert third.usage.prompt_tokens_details.cached_tokens == user_turn
    # The same request again (regenerate): all but its last token.
    again = client.chat.completions.create(model=name, messages=[system, {"role": "user", "content": "Another one?"}], max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == third.usage.prompt_tokens - 1
    assert again.choices[0].message.content == third.choices[0].message.content


def test_concurrent_streams_are_complete_and_equal_to_running_alone(server, client, name):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [chat(client, name, q, max_tokens=16).choices[0].message.content for q in questions]
    results: dict[int, tuple[str, list]] = {}

    def run(i: int) -> None:
        chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": questions[i]}], max_tokens=16,
                                                     temperature=0, stream=True, stream_options={"include_usage": True}))
        results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(8))
    for i, (text, chunks) in results.items():
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage.completion_tokens == 16
        assert text == alone[i], f"stream {i} differs from the same request alone"
    metrics = httpx.get(f"{server.url}/metrics").text
    held, planned = (float(re.search(rf"^{m} (\S+)$", metrics, re.M).group(1)) for m in ("gemma4_kv_cache_bytes", "gemma4_kv_cache_planned_bytes"))
    assert 0 < held <= planned
    assert re.search(r"^gemma4_time_to_first_token_seconds_count [1-9]", metrics, re.M)
    assert re.search(r"^gemma4_requests_running 0\.0$", metrics, re.M)


ERRORS = [
    ("malformed JSON", b'{"model": "m", "messages": [', 400, "not valid JSON"),
    ("no messages", {"model": "{name}"}, 400, "messages"),
    ("ill-typed field", {"model": "{name}", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ("unknown role", {"model": "{name}", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("broken arguments", {"model": "{name}", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, 400, "arguments is not valid JSON"),
    ("invalid response schema", {"model": "{name}", "messages": [{"role": "user", "content": "x"}],
                                 "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "wizard"}}}}, 400, "schema"),
    ("invalid tool schema", {"model": "{name}", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
                             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "wizard"}}}}}]}, 400, "schema"),
    ("named tool that is not there", {"model": "{name}", "messages": [{"role": "user", "content": "x"}], "tools": [ALARM_TOOL],
                                      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "nope"),
    ("n > 1", {"model": "{name}", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n > 1"),
    ("image part", {"model": "{name}", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "no encoder for image"),
    ("bad logit_bias", {"model": "{name}", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("prompt over the context", {"model": "{name}", "messages": [{"role": "user", "content": "word " * 1100}]}, 400, "context is 1024 tokens"),
    ("max_tokens over the context", {"model": "{name}", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "5000 in max_tokens"),
    ("stream over the context", {"model": "{name}", "messages": [{"role": "user", "content": "word " * 1100}], "stream": True}, 400, "context is 1024"),
    ("unknown model", {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-17"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_openai_shaped_and_harmless(server, name, case):
    _, payload, status, words = case
    body = payload if isinstance(payload, bytes) else json.dumps(payload).replace("{name}", name).encode()
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error") or status == 404
    if "context" in case[0]:
        assert error["code"] == "context_length_exceeded" and re.search(r"needs \d+", error["message"])
    assert httpx.get(f"{server.url}/health").status_code == 200  # still serving
    assert httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_body_over_the_limit_is_413(server, name):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"x": "' + b"a" * (9 << 20) + b'"}', headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_api_key_is_checked_and_health_stays_public(checkpoints, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    secured = Server(checkpoints("tiny-e2b"), "--api-key-file", str(key), "--context", "64")
    try:
        assert httpx.get(f"{secured.url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.get(f"{secured.url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{secured.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{secured.url}/v1", api_key="s3cret").models.list().data
    finally:
        secured.stop()


def test_queue_full_and_a_client_that_leaves(checkpoints):
    small = Server(checkpoints("tiny-e2b"), "--parallel", "1", "--max-queue", "1", "--context", "512", "--metrics")
    try:
        name = httpx.get(f"{small.url}/v1/models").json()["data"][0]["id"]
        body = {"model": name, "messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 400, "temperature": 0}
        # A client that leaves mid-stream frees its slot at once: its job ends long before its 400 tokens.
        with httpx.stream("POST", f"{small.url}/v1/chat/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.time() + 10
        while "gemma4_requests_running 0.0" not in (metrics := httpx.get(f"{small.url}/metrics").text) and time.time() < deadline:
            time.sleep(0.05)
        assert 'gemma4_requests_total{finish_reason="cancelled"} 1.0' in metrics
        assert float(re.search(r"^gemma4_generation_tokens_total (\S+)$", metrics, re.M).group(1)) < 400
        # One running, one waiting: a third is refused, not queued without bound.
        statuses: list[int] = []
        runs = [threading.Thread(target=lambda: statuses.append(httpx.post(f"{small.url}/v1/chat/completions", json=body, timeout=300).status_code))
                for _ in range(3)]
        for t in runs:
            t.start()
            time.sleep(0.3)
        for t in runs:
            t.join()
        assert sorted(statuses) == [200, 200, 503]
    finally:
        small.stop()


def test_loading_is_reported_and_other_addresses_warn(checkpoints):
    exposed = Server(checkpoints("tiny-e2b"), "--host", "0.0.0.0", "--context", "64", wait=False)
    try:
        seen = set()
        deadline = time.time() + 120
        while 200 not in seen and time.time() < deadline:
            try:
                response = httpx.get(f"http://127.0.0.1:{exposed.port}/health", timeout=2)
                seen.add(response.status_code)
                if response.status_code == 503:
                    assert response.json()["error"]["code"] == "loading"
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert 200 in seen
    finally:
        err = exposed.stop()
    assert "without an API key" in err


def test_damaged_checkpoint_and_busy_port_are_one_line_errors(checkpoints, tmp_path):
    import shutil
    import subprocess
    import sys

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints("tiny-e2b"), broken)
    (broken / "config.json").write_text("{ not json")
    command = [sys.executable, "-m", "gemma4.interfaces.cli", "serve", str(broken), "--port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "config.json" in result.stderr and "Traceback" not in result.stderr
    taken = Server(checkpoints("tiny-e2b"), "--context", "64")
    try:
        result = subprocess.run([*command[:4], str(checkpoints("tiny-e2b")), "--port", str(taken.port)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "choose another --port" in result.stderr and "Traceback" not in result.stderr
    finally:
        taken.stop()
