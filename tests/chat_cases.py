"""Conversations that exercise every branch of the Gemma 4 prompt format."""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "nullable": True},
                "options": {
                    "type": "object",
                    "description": "Extras",
                    "properties": {"detail": {"type": "boolean"}},
                    "required": ["detail"],
                },
                "tags": {"type": "array", "items": {"type": "string"}},
                "points": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
            },
            "required": ["city"],
        },
        "response": {"type": "object", "description": "The forecast"},
    },
}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "Search the web.", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2, "metric": true, "extra": null, "nested": {"b": [1, 2.5], "A": "x"}}'}}

CASES = {
    "single user turn": dict(messages=[{"role": "user", "content": "  Hello there!  "}]),
    "system and history": dict(
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<|channel>thought\nplanning<channel|>Hello."},
            {"role": "user", "content": "Bye"},
        ]
    ),
    "thinking on": dict(messages=[{"role": "user", "content": "Why?"}], enable_thinking=True),
    "thinking on with system": dict(messages=[{"role": "developer", "content": "Be nice."}, {"role": "user", "content": "Why?"}], enable_thinking=True),
    "tools declared": dict(messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL, SEARCH_TOOL]),
    "tool call and response": dict(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21, "sky": "clear", "ok": true}'},
        ],
        tools=[WEATHER_TOOL],
    ),
    "tool response then answer": dict(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "Thanks"},
        ],
        tools=[WEATHER_TOOL],
        enable_thinking=True,
    ),
    "content parts": dict(messages=[{"role": "user", "content": [{"type": "text", "text": " Look: "}, {"type": "image"}, {"type": "text", "text": "and"}, {"type": "audio"}]}]),
    "untyped enum parameter": dict(
        messages=[{"role": "user", "content": "Alarm"}],
        tools=[{"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {"tone": {"enum": ["beep", "chime"]}}}}}],
    ),
    "no generation prompt": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], add_generation_prompt=False),
}
