"""The Gemma 4 prompt format: OpenAI-style messages -> prompt text.

`render` is the format in Python; `CHAT_TEMPLATE` is the same format as a Jinja template
(written for this project, following the released template's rules), which synthetic
checkpoints ship. A checkpoint's own template, when it has one, is what `render_chat` uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

QUOTE = '<|"|>'
_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


# --- message normalisation (before any renderer) -----------------------------------------
def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style messages -> the shape Gemma templates read.

    Tool calls get their JSON-string arguments parsed; `role: tool` results fold into the model
    turn that called them (as `tool_responses`), and the model's answer after them continues that
    same turn, exactly as the model produced it."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"unknown message role {role!r}; expected system, user, assistant or tool")
        if role == "tool":
            turn = out[-1] if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") else None
            if turn is None:
                raise ValueError("a 'tool' message must follow an assistant message with tool_calls")
            name = message.get("name") or _call_name(turn, message.get("tool_call_id"))
            turn.setdefault("tool_responses", []).append({"name": name, "response": _parse_json(message.get("content"))})
            continue
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [_normalize_call(c) for c in message["tool_calls"]]
        previous = out[-1] if out else None
        if role == "assistant" and previous and previous.get("tool_responses") and not previous.get("content"):
            previous["content"] = message.get("content")
            if message.get("tool_calls"):
                previous["tool_calls"] = previous["tool_calls"] + message["tool_calls"]
            continue
        out.append(message)
    return out


def _normalize_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function", call))
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        parsed = _parse_json(arguments)
        function["arguments"] = parsed if isinstance(parsed, dict) else arguments
    return {**call, "function": function}


def _call_name(turn: Mapping[str, Any], call_id: str | None) -> str:
    calls = turn["tool_calls"]
    for call in calls:
        if call_id is not None and call.get("id") == call_id:
            return call["function"]["name"]
    return calls[min(len(turn.get("tool_responses", [])), len(calls) - 1)]["function"]["name"]


def _parse_json(content: Any) -> Any:
    if isinstance(content, str):
        try:
            return json.loads(content)
        except json.JSONDecodeError:
            return content
    return content


# --- values ---------------------------------------------------------------------------------
def _sorted_items(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(mapping.items(), key=lambda kv: str(kv[0]).lower())  # Jinja's dictsort


def format_value(value: Any, quote_keys: bool = True) -> str:
    """A value in Gemma's argument syntax: strings in <|"|>, bare numbers and booleans."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        items = ((QUOTE + k + QUOTE if quote_keys else k) + ":" + format_value(v, quote_keys) for k, v in _sorted_items(value))
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v, quote_keys) for v in value) + "]"
    return str(value)


# --- tool declarations ----------------------------------------------------------------------
def _type_of(schema: Mapping[str, Any]) -> str:
    """The declared type, upper-cased; "" for a schema without one (an enum alone, say)."""
    kind = schema.get("type")
    return str(kind if isinstance(kind, str) else kind[0]).upper() if kind else ""


def _quoted_list(items: Sequence[str]) -> str:
    return ",".join(QUOTE + str(i) + QUOTE for i in items)


def _format_parameters(properties: Mapping[str, Any]) -> str:
    parts = []
    for key, schema in _sorted_items(properties):
        if key in _STANDARD_KEYS:
            continue
        text, comma = f"{key}:{{", False
        if schema.get("description"):
            text += f"description:{QUOTE}{schema['description']}{QUOTE}"
            comma = True
        if schema.get("nullable"):
            text += ("," if comma else "") + "nullable:true"
            comma = True
        kind = _type_of(schema)
        if kind == "STRING" and schema.get("enum"):
            text += ("," if comma else "") + "enum:" + format_value(schema["enum"])
            comma = True
        elif kind == "OBJECT":
            inner = schema["properties"] if isinstance(schema.get("properties"), Mapping) else schema
            text += ",properties:{" + _format_parameters(inner) + "}"
            if schema.get("required"):
                text += ",required:[" + _quoted_list(schema["required"]) + "]"
        elif kind == "ARRAY" and isinstance(schema.get("items"), Mapping) and schema["items"]:
            text += ",items:{" + _format_items(schema["items"]) + "}"
        text += (("," if comma else "") + f"type:{QUOTE}{kind}{QUOTE}" if kind else "") + "}"
        parts.append(text)
    return ",".join(parts)


def _format_items(items: Mapping[str, Any]) -> str:
    parts = []
    for key, value in _sorted_items(items):
        if value is None:
            continue
        if key == "properties":
            parts.append("properties:{" + (_format_parameters(value) if isinstance(value, Mapping) else "") + "}")
        elif key == "required":
            parts.append("required:[" + _quoted_list(value) + "]")
        elif key == "type":
            parts.append("type:" + format_value(value.upper() if isinstance(value, str) else [v.upper() for v in value]))
        else:
            parts.append(f"{key}:{format_value(value)}")
    return ",".join(parts)


def format_declaration(tool: Mapping[str, Any]) -> str:
    function = tool.get("function", tool)
    text = f"declaration:{function['name']}{{description:{QUOTE}{function.get('description', '')}{QUOTE}"
    params = function.get("parameters")
    if params:
        text += ",parameters:{"
        if params.get("properties"):
            text += "properties:{" + _format_parameters(params["properties"]) + "},"
        if params.get("required"):
            text += "required:[" + _quoted_list(params["required"]) + "],"
        if params.get("type"):
            text += f"type:{QUOTE}{str(params['type']).upper()}{QUOTE}}}"
    if "response" in function:
        response = function["response"]
        text += ",response:{"
        if response.get("description"):
            text += f"description:{QUOTE}{response['description']}{QUOTE},"
        if str(response.get("type", "")).upper() == "OBJECT":
            text += f"type:{QUOTE}OBJECT{QUOTE}}}"
    return (text + "}").strip()


# --- turns ----------------------------------------------------------------------------------
def strip_thinking(text: str) -> str:
    """Earlier answers go back without their thought channel."""
    kept = [part.split("<|channel>")[0] if "<|channel>" in part else part for part in text.split("<channel|>")]
    return "".join(kept).strip()


def _render_content(content: Any, role: str) -> tuple[str, str | None]:
    """-> (text, kind of the last media item or None)."""
    clean = strip_thinking if role == "model" else str.strip
    if isinstance(content, str):
        return clean(content), None
    text, kind = "", None
    for item in content or []:
        if item.get("type") == "text":
            text += clean(item["text"])
        elif item.get("type") in ("image", "audio", "video"):
            kind = item["type"]
            text += {"image": "\n\n<|image|>\n\n", "audio": "<|audio|>", "video": "\n\n<|video|>\n\n"}[kind]
    return text, kind


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool = False,
    add_generation_prompt: bool = True,
    bos_token: str = "<bos>",
) -> str:
    """Normalized messages -> the prompt text, BOS included."""
    text = bos_token
    messages = list(messages)
    last_kind = None
    if enable_thinking or tools or (messages and messages[0]["role"] in ("system", "developer")):
        text += "<|turn>system\n" + ("<|think|>" if enable_thinking else "")
        if messages and messages[0]["role"] in ("system", "developer"):
            text += str(messages.pop(0)["content"]).strip()
        for tool in tools or []:
            text += "<|tool>" + format_declaration(tool) + "<tool|>"
        text += "<turn|>\n"
    for message in messages:
        last_kind = None
        role = "model" if message["role"] == "assistant" else message["role"]
        text += f"<|turn>{role}\n"
        for call in message.get("tool_calls") or []:
            function = call["function"]
            arguments = function.get("arguments")
            if isinstance(arguments, Mapping):
                arguments = ",".join(f"{k}:{format_value(v, quote_keys=False)}" for k, v in _sorted_items(arguments))
            text += f"<|tool_call>call:{function['name']}{{{arguments if isinstance(arguments, str) else ''}}}<tool_call|>"
            last_kind = "tool_call"
        for result in message.get("tool_responses") or []:
            response, name = result["response"], result.get("name") or "unknown"
            if isinstance(response, Mapping):
                body = ",".join(f"{k}:{format_value(v, quote_keys=False)}" for k, v in _sorted_items(response))
            else:
                body = "value:" + format_value(response, quote_keys=False)
            text += f"<|tool_response>response:{name}{{{body}}}<tool_response|>"
            last_kind = "tool_response"
        content, kind = _render_content(message.get("content"), role)
        text += content
        last_kind = kind or last_kind
        if not (message.get("tool_responses") and not message.get("content")):
            text += "<turn|>\n"
    if add_generation_prompt:
        if last_kind != "tool_response":
            text += "<|turn>model\n"
        if not enable_thinking:
            text += "<|channel>thought\n<channel|>"
    return text


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool = False,
    template: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render with the checkpoint's own Jinja template when it ships one, else with `render`."""
    normalized = normalize_messages(messages)
    if template is None:
        return render(normalized, tools, enable_thinking, add_generation_prompt)
    import jinja2.sandbox

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(
        messages=normalized,
        tools=tools,
        enable_thinking=enable_thinking,
        add_generation_prompt=add_generation_prompt,
        bos_token="<bos>",
    )


# The same format as a Jinja template (whitespace handled with explicit '-' markers).
CHAT_TEMPLATE = r"""
{%- macro value(v, quote_keys=true) -%}
{%- if v is string -%}<|"|>{{ v }}<|"|>
{%- elif v is boolean -%}{{ 'true' if v else 'false' }}
{%- elif v is mapping -%}{ {%- for k, x in v | dictsort -%}{{ ',' if not loop.first }}{{ '<|"|>' ~ k ~ '<|"|>' if quote_keys else k }}:{{ value(x, quote_keys) }}{%- endfor -%} }
{%- elif v is sequence -%}[ {%- for x in v -%}{{ ',' if not loop.first }}{{ value(x, quote_keys) }}{%- endfor -%} ]
{%- else -%}{{ v }}
{%- endif -%}
{%- endmacro -%}
{%- macro quoted(items) -%}{%- for i in items -%}{{ ',' if not loop.first }}<|"|>{{ i }}<|"|>{%- endfor -%}{%- endmacro -%}
{%- macro kind_of(s) -%}{%- if s['type'] -%}{{ (s['type'] if s['type'] is string else s['type'][0]) | upper }}{%- endif -%}{%- endmacro -%}
{%- macro parameters(props) -%}
{%- set ns = namespace(first=true) -%}
{%- for key, s in props | dictsort -%}
{%- if key not in ['description', 'type', 'properties', 'required', 'nullable'] -%}
{{ '' if ns.first else ',' }}{%- set ns.first = false -%}
{%- set c = namespace(comma=false) -%}
{{ key }}:{
{%- if s['description'] -%}description:<|"|>{{ s['description'] }}<|"|>{%- set c.comma = true -%}{%- endif -%}
{%- if s['nullable'] -%}{{ ',' if c.comma }}nullable:true{%- set c.comma = true -%}{%- endif -%}
{%- set k = kind_of(s) -%}
{%- if k == 'STRING' and s['enum'] -%}{{ ',' if c.comma }}enum:{{ value(s['enum']) }}{%- set c.comma = true -%}
{%- elif k == 'OBJECT' -%},properties:{ {{- parameters(s['properties'] if s['properties'] is mapping else s) -}} }
{%- if s['required'] -%},required:[{{ quoted(s['required']) }}]{%- endif -%}
{%- elif k == 'ARRAY' and s['items'] is mapping and s['items'] -%},items:{ {{- items(s['items']) -}} }
{%- endif -%}
{%- if k -%}{{ ',' if c.comma }}type:<|"|>{{ k }}<|"|>{%- endif -%}}
{%- endif -%}
{%- endfor -%}
{%- endmacro -%}
{%- macro items(it) -%}
{%- set ns = namespace(first=true) -%}
{%- for key, v in it | dictsort -%}
{%- if v is not none -%}
{{ '' if ns.first else ',' }}{%- set ns.first = false -%}
{%- if key == 'properties' -%}properties:{ {{- parameters(v) if v is mapping -}} }
{%- elif key == 'required' -%}required:[{{ quoted(v) }}]
{%- elif key == 'type' -%}type:{{ value(v | upper if v is string else v | map('upper') | list) }}
{%- else -%}{{ key }}:{{ value(v) }}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- endmacro -%}
{%- macro declaration(tool) -%}
{%- set f = tool['function'] if tool['function'] is defined else tool -%}
declaration:{{ f['name'] }}{description:<|"|>{{ f['description'] | default('') }}<|"|>
{%- set p = f['parameters'] -%}
{%- if p -%},parameters:{
{%- if p['properties'] -%}properties:{ {{- parameters(p['properties']) -}} },{%- endif -%}
{%- if p['required'] -%}required:[{{ quoted(p['required']) }}],{%- endif -%}
{%- if p['type'] -%}type:<|"|>{{ p['type'] | upper }}<|"|>}{%- endif -%}
{%- endif -%}
{%- if 'response' in f -%},response:{
{%- if f['response']['description'] -%}description:<|"|>{{ f['response']['description'] }}<|"|>,{%- endif -%}
{%- if (f['response']['type'] | default('') | upper) == 'OBJECT' -%}type:<|"|>OBJECT<|"|>}{%- endif -%}
{%- endif -%}
}
{%- endmacro -%}
{%- macro clean(text, role) -%}
{%- if role == 'model' -%}
{%- set ns = namespace(out='') -%}
{%- for part in text.split('<channel|>') -%}{%- set ns.out = ns.out ~ (part.split('<|channel>')[0] if '<|channel>' in part else part) -%}{%- endfor -%}
{{ ns.out | trim }}
{%- else -%}{{ text | trim }}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set ns = namespace(last=none, rest=messages) -%}
{%- if enable_thinking or tools or (messages and messages[0]['role'] in ['system', 'developer']) -%}
<|turn>system{{ '\n' }}{{ '<|think|>' if enable_thinking }}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}{{ messages[0]['content'] | trim }}{%- set ns.rest = messages[1:] -%}{%- endif -%}
{%- for tool in tools or [] -%}<|tool>{{ declaration(tool) | trim }}<tool|>{%- endfor -%}
<turn|>{{ '\n' }}
{%- endif -%}
{%- for m in ns.rest -%}
{%- set ns.last = none -%}
{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
<|turn>{{ role }}{{ '\n' }}
{%- for call in m['tool_calls'] or [] -%}
<|tool_call>call:{{ call['function']['name'] }}{
{%- set a = call['function']['arguments'] -%}
{%- if a is mapping -%}{%- for k, v in a | dictsort -%}{{ ',' if not loop.first }}{{ k }}:{{ value(v, false) }}{%- endfor -%}
{%- elif a is string -%}{{ a }}
{%- endif -%}
}<tool_call|>{%- set ns.last = 'tool_call' -%}
{%- endfor -%}
{%- for r in m['tool_responses'] or [] -%}
<|tool_response>response:{{ r['name'] or 'unknown' }}{
{%- if r['response'] is mapping -%}{%- for k, v in r['response'] | dictsort -%}{{ ',' if not loop.first }}{{ k }}:{{ value(v, false) }}{%- endfor -%}
{%- else -%}value:{{ value(r['response'], false) }}
{%- endif -%}
}<tool_response|>{%- set ns.last = 'tool_response' -%}
{%- endfor -%}
{%- if m['content'] is string -%}{{ clean(m['content'], role) }}
{%- elif m['content'] -%}
{%- for item in m['content'] -%}
{%- if item['type'] == 'text' -%}{{ clean(item['text'], role) }}
{%- elif item['type'] == 'image' -%}{{ '\n\n<|image|>\n\n' }}{%- set ns.last = 'image' -%}
{%- elif item['type'] == 'audio' -%}<|audio|>{%- set ns.last = 'audio' -%}
{%- elif item['type'] == 'video' -%}{{ '\n\n<|video|>\n\n' }}{%- set ns.last = 'video' -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- if not (m['tool_responses'] and not m['content']) -%}<turn|>{{ '\n' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{%- if ns.last != 'tool_response' -%}<|turn>model{{ '\n' }}{%- endif -%}
{%- if not enable_thinking -%}<|channel>thought{{ '\n' }}<channel|>{%- endif -%}
{%- endif -%}
"""
