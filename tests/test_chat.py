"""The chat format both ways: prompts rendered exactly, model output parsed token by token."""

from __future__ import annotations

import pytest
import torch

import gemma4
from gemma4.runtime.chat_format import CHAT_TEMPLATE, normalize_messages, render_chat
from gemma4.runtime.chat_parser import ChatResult, OutputParser, parse_call
from gemma4.runtime.tokenizer import Tokenizer

from chat_cases import CASES, WEATHER_TOOL


@pytest.fixture(scope="module")
def tokenizer(checkpoints) -> Tokenizer:
    return Tokenizer.from_folder(checkpoints("tiny-e2b"))


@pytest.mark.parametrize("case", list(CASES))
def test_renderer_equals_the_checkpoint_template(checkpoints, case):
    shipped = (checkpoints("tiny-e2b") / "chat_template.jinja").read_text()
    assert shipped == CHAT_TEMPLATE
    assert render_chat(**CASES[case]) == render_chat(**CASES[case], template=shipped)


def test_prompt_format_details():
    text = render_chat(**CASES["system and history"])
    assert text == (
        "<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert render_chat(**CASES["thinking on"]).startswith("<bos><|turn>system\n<|think|><turn|>\n")
    assert render_chat(**CASES["thinking on"]).endswith("<|turn>model\n")
    call = render_chat(**CASES["tool call and response"])
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2,' in call
    assert call.endswith('<|tool_response>response:get_weather{ok:true,sky:<|"|>clear<|"|>,temperature:21}<tool_response|><|channel>thought\n<channel|>')


def test_tool_results_fold_into_the_calling_turn():
    turns = normalize_messages(CASES["tool response then answer"]["messages"])
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["tool_responses"] == [{"name": "get_weather", "response": "sunny"}]
    assert turns[1]["content"] == "It is sunny."
    with pytest.raises(ValueError, match="must follow an assistant message with tool_calls"):
        normalize_messages([{"role": "tool", "content": "x"}])


def parse(tokenizer: Tokenizer, ids: list[int]) -> tuple[ChatResult, list]:
    parser, result, events = OutputParser(tokenizer), ChatResult(), []
    for token in ids:
        events += parser.push(token)
    events += parser.finish()
    for event in events:
        result.add(event)
    return result, events


def as_text_pieces(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode character by character: every tag arrives split over several plain-text tokens."""
    return [i for ch in text for i in tokenizer.encode(ch)]


MODEL_OUTPUT = '<|channel>thought\nThe user wants weather.<channel|>Checking.<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:3,opts:{fast:true,tags:[<|"|>a<|"|>,2.5]}}<tool_call|><turn|>trailing'


@pytest.mark.parametrize("split", [False, True])
def test_thinking_content_and_tool_calls(tokenizer, split):
    ids = as_text_pieces(tokenizer, MODEL_OUTPUT) if split else tokenizer.encode(MODEL_OUTPUT)
    result, events = parse(tokenizer, ids)
    assert result.reasoning == "The user wants weather."
    assert result.content == "Checking."
    assert [(c.name, c.arguments) for c in result.tool_calls] == [
        ("get_weather", {"city": "Paris, FR", "days": 3, "opts": {"fast": True, "tags": ["a", 2.5]}})
    ]
    assert not any("<|" in e.text or "|>" in e.text for e in events)  # no tag leaks into text


def test_streamed_events_concatenate_to_the_whole(tokenizer):
    ids = tokenizer.encode(MODEL_OUTPUT)
    _, events = parse(tokenizer, ids)
    assert sum(e.kind == "content" for e in events) >= 1
    assert "".join(e.text for e in events if e.kind == "reasoning") == "The user wants weather."


@pytest.mark.parametrize(
    "raw, name, arguments",
    [
        ('call:f{a:<|"|>x<|"|>,b:1}', "f", {"a": "x", "b": 1}),
        ("call:f(a='x', b=2)", "f", {"a": "x", "b": 2}),
        ('call:f{"a": "q\\"uote", "b": null}', "f", {"a": 'q"uote', "b": None}),
        ("call:f{a:[1,2],b:{c:false}", "f", {"a": [1, 2], "b": {"c": False}}),  # missing final brace
        ("call:f{}", "f", {}),
        ("call:f{city:Paris}", "f", {"city": "Paris"}),  # an unquoted string
    ],
)
def test_tolerant_call_parsing(raw, name, arguments):
    call = parse_call(raw)
    assert call is not None and (call.name, call.arguments) == (name, arguments)


def test_malformed_or_unclosed_calls_stay_visible(tokenizer):
    result, _ = parse(tokenizer, tokenizer.encode("Sure.<|tool_call>call:f{a:<|\"|>oops}<tool_call|>"))
    assert result.tool_calls == [] and result.content == 'Sure.<|tool_call>call:f{a:<|"|>oops}<tool_call|>'
    result, _ = parse(tokenizer, tokenizer.encode("<|tool_call>call:f{a:1}"))  # the turn ends without the closing tag
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("f", {"a": 1})]


def test_a_lone_angle_bracket_is_not_held_forever(tokenizer):
    result, _ = parse(tokenizer, tokenizer.encode("a < b and <|x"))
    assert result.content == "a < b and <|x"


def test_next_turn_reuses_the_cache_and_equals_a_fresh_run(checkpoints):
    path = checkpoints("tiny-e2b")
    model = gemma4.load(path, dtype=torch.float32, progress=False)
    for thinking in (False, True):
        model.reset_chat()
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        last_turn_start = 0
        for turn in range(3):
            answer = model.chat(messages, max_new_tokens=8, temperature=0, thinking=thinking)
            # Everything before the previous prompt's last turn is reused; only that turn (which the
            # re-rendered history spells differently) and what is new get fed.
            assert model.stats.reused_tokens >= last_turn_start > 0 or turn == 0, model.stats
            prompt = model.tokenizer.prompt_ids(render_chat(messages, enable_thinking=thinking))
            last_turn_start = max(i for i, t in enumerate(prompt) if t == model.tokenizer.token_id("<|turn>"))
            messages = messages + [{"role": "assistant", "content": answer.content}, {"role": "user", "content": f"More {turn}"}]
        fresh = gemma4.load(path, dtype=torch.float32, progress=False)
        assert model.chat(messages, max_new_tokens=8, temperature=0, thinking=thinking) == fresh.chat(
            messages, max_new_tokens=8, temperature=0, thinking=thinking
        )


def test_chat_with_tools_renders_declarations(checkpoints):
    model = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False)
    result = model.chat([{"role": "user", "content": "Weather?"}], max_new_tokens=4, temperature=0, tools=[WEATHER_TOOL])
    assert model.stats.prompt_tokens > 100  # the declaration went into the system turn
    assert isinstance(result, ChatResult)
