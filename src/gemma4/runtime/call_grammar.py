"""A JSON schema as a grammar for Gemma's own argument syntax, in llguidance's Lark dialect.

Gemma 4 writes tool-call arguments as `{city:<|"|>Paris<|"|>,days:3}`: bare keys, strings
between `<|"|>` tokens, bare numbers, booleans and null (chat_format.format_value writes it,
chat_parser.parse_call reads it). Constraining a call to this syntax keeps a real model on the
format it was trained on. Keys come in sorted order, as the chat template renders them. What
this translation does not cover (numeric bounds, patterns, $ref, ...) raises `Unsupported`, and
the caller constrains that tool's arguments as plain JSON instead, which the parser also reads."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .chat_format import QUOTE, format_value

KEY = re.compile(r"[A-Za-z_][\w.\-]*")
# Strings may hold anything but the start of a special tag ("<|"): the quote token closes them.
STRING = r"/([^<]|<[^|])*/"
INTEGER = r"/-?(0|[1-9][0-9]{0,17})/"
NUMBER = r"/-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][-+]?[0-9]{1,3})?/"
# Keywords that only describe (or that any output of ours satisfies): no constraint needed.
NEUTRAL = {"description", "title", "examples", "default", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly",
           "additionalProperties", "format"}


class Unsupported(Exception):
    """A schema keyword the Gemma-syntax translation does not enforce."""


class GemmaArguments:
    """Builds Lark rules; `value(schema)` returns the expression of one value."""

    def __init__(self, quote: str, prefix: str):
        self.quote, self.prefix = quote, prefix  # quote: the `<|"|>` token as Lark writes it (`<[52]>`)
        self.rules: list[str] = []
        self._any: str | None = None

    def rule(self, body: str) -> str:
        name = f"{self.prefix}_{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def literal(self, value: Any) -> str:
        """A fixed value, as format_value writes it, with the quote token in place."""
        pieces = []
        for i, part in enumerate(format_value(value, quote_keys=False).split(QUOTE)):
            pieces += ([self.quote] if i else []) + ([json.dumps(part, ensure_ascii=False)] if part else [])
        return " ".join(pieces) or '""'

    def value(self, schema: Any) -> str:
        if schema is True or schema == {}:
            return self.any_value()
        if not isinstance(schema, Mapping):
            raise Unsupported(f"schema {schema!r}")
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            return self.rule(" | ".join(self.literal(v) for v in values))
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                rest = {k: v for k, v in schema.items() if k != combinator}
                return self.rule(" | ".join(self.value({**rest, **option}) for option in schema[combinator]))
        kinds = schema.get("type")
        if kinds is None:
            return self.any_value() if not set(schema) - NEUTRAL else self._unsupported(schema, set(schema) - NEUTRAL)
        kinds = list(kinds) if isinstance(kinds, list) else [kinds]
        if schema.get("nullable") and "null" not in kinds:
            kinds.append("null")
        return self.rule(" | ".join(self._typed(kind, schema) for kind in kinds))

    def _typed(self, kind: str, schema: Mapping[str, Any]) -> str:
        allowed = NEUTRAL | {"type", "nullable"} | {
            "string": {"maxLength", "minLength"}, "object": {"properties", "required"}, "array": {"items"},
        }.get(kind, set())
        self._unsupported(schema, set(schema) - allowed)
        if kind == "string":
            low, high = schema.get("minLength", 0), schema.get("maxLength")
            body = STRING if (low, high) == (0, None) else f"/[^<]{{{low},{'' if high is None else high}}}/"
            return f"{self.quote} {body} {self.quote}"
        if kind in ("integer", "number"):
            return INTEGER if kind == "integer" else NUMBER
        if kind == "boolean":
            return '"true" | "false"'
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = self.value(schema.get("items", True))
            return f'"[" ({item} ("," {item})*)? "]"'
        if kind == "object":
            return self._object(schema)
        raise Unsupported(f"type {kind!r}")

    def _object(self, schema: Mapping[str, Any]) -> str:
        properties = schema.get("properties")
        if not properties:
            return self._any_object()
        required = set(schema.get("required", []))
        if unknown := required - set(properties):
            raise Unsupported(f"required {sorted(unknown)} without properties")
        names = sorted(properties)
        if bad := [n for n in names if not KEY.fullmatch(n)]:
            raise Unsupported(f"key {bad[0]!r}")
        members = [f'"{name}:" {self.value(properties[name])}' for name in names]
        # first[i]: members i.. with none written yet; rest[i]: members i.. after one (each needs a comma).
        first, rest = ['""'], ['""']
        for i in range(len(names) - 1, -1, -1):
            later_first, later_rest = first[0], rest[0]
            if names[i] in required:
                first.insert(0, self.rule(f"{members[i]} {later_rest}"))
                rest.insert(0, self.rule(f'"," {members[i]} {later_rest}'))
            else:
                first.insert(0, self.rule(f"{members[i]} {later_rest} | {later_first}"))
                rest.insert(0, self.rule(f'"," {members[i]} {later_rest} | {later_rest}'))
        return f'"{{" {first[0]} "}}"'

    def any_value(self) -> str:
        """Any value in Gemma's syntax (a schema that says nothing)."""
        if self._any is None:
            self._any = f"{self.prefix}_any"
            obj = self._any_object()
            self.rules.append(
                f'{self._any}: {self.quote} {STRING} {self.quote} | {NUMBER} | "true" | "false" | "null" | {obj}'
                f' | "[" ({self._any} ("," {self._any})*)? "]"'
            )
        return self._any

    def _any_object(self) -> str:
        member = f"/{KEY.pattern}/ \":\" {self.any_value()}"
        return f'"{{" ({member} ("," {member})*)? "}}"'

    @staticmethod
    def _unsupported(schema: Mapping[str, Any], keys: set[str]) -> str:
        if keys:
            raise Unsupported(f"keyword {sorted(keys)[0]!r}")
        return ""
