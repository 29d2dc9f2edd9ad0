"""Constrained decoding: answers that always parse — JSON, JSON valid against a schema, tool
calls in Gemma's own syntax — whatever the model would have written, through llguidance.

Chosen by measurement (benchmarks/grammar.py: Gemma's 262K vocabulary, this 2-core CPU):
llguidance compiles a schema in ~1 ms and masks a token in ~40 us; xgrammar takes ~70 ms and
~20 us but needs triton (1 GB) and transformers at run time; outlines-core ~1.8 s and ~4.6 ms.
Beside a decode step (30-100 ms) the first two cost nothing; llguidance also installs in 8 MB."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import torch
from torch import Tensor

from .call_grammar import GemmaArguments, Unsupported
from .tokenizer import Tokenizer

# Compact, canonical JSON: bounded output (a model cannot wander off into whitespace).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class InvalidGrammar(ValueError):
    """A schema or tool declaration that cannot constrain output (the message says why)."""


class Constraint:
    """One answer's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> Tensor:
        """bool [vocab_size]: True where the next token keeps the answer inside the grammar."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return ((words[:, None] >> self._bits) & 1).bool().flatten()[: self.vocab_size]

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} left the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


class Grammars:
    """Grammars over one tokenizer. Its token table takes seconds to build: once, at load."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]):
        """stop_ids: the tokens that end a turn; a constrained answer ends with one of them."""
        spec = tokenizer.to_json()
        if spec is None:
            raise InvalidGrammar("this checkpoint's tokenizer (tokenizer.model) cannot drive constrained output; use one with tokenizer.json")
        self.vocab_size = vocab_size
        self._vocab = tokenizer
        self._tokenizer = llguidance.LLTokenizer(spec, n_vocab=vocab_size, eos_token=tokenizer.eos_id)
        self._ends = [f"<[{i}]>" for i in sorted(stop_ids)]

    def _token(self, tag: str) -> str:
        """A special token as Lark names it (by id)."""
        token = self._vocab.token_id(tag)
        if token is None:
            raise InvalidGrammar(f"this model's vocabulary has no {tag} token: its output cannot be constrained to that format")
        return f"<[{token}]>"

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(llguidance.LLMatcher(self._tokenizer, grammar), self.vocab_size)

    def json(self, schema: Mapping[str, Any] | None, thinking: bool) -> str:
        """An answer that is one JSON value valid against `schema` (None: any JSON object)."""
        schema = dict(schema) if schema is not None else {"type": "object"}
        body = f"body: %json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}"
        return self._checked(self._frame([body], thinking, self._ends))

    def tool_calls(self, tools: Sequence[Mapping[str, Any]], only: str | None, parallel: bool, thinking: bool) -> str:
        """An answer that is tool calls only: of `only`, or any of `tools` (several if `parallel`)."""
        functions = [t.get("function", t) for t in tools]
        if only is not None:
            functions = [f for f in functions if f.get("name") == only]
            if not functions:
                raise InvalidGrammar(f"tool_choice names {only!r}, which is not among the tools")
        rules, names = [], []
        for i, function in enumerate(functions):
            name = function.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidGrammar(f"tools[{i}] has no function name")
            names.append(f"fn_{i}")
            rules += self._arguments(f"fn_{i}", name, function.get("parameters") or {})
        call = f'call: {self._token("<|tool_call>")} "call:" ({" | ".join(names)}) {self._token("<tool_call|>")}'
        body = "body: call+" if parallel and only is None else "body: call"
        # After its calls the model ends the turn, or opens the tool response it waits for.
        return self._checked(self._frame([body, call, *rules], thinking, [self._token("<|tool_response>"), *self._ends]))

    def _arguments(self, rule: str, name: str, schema: Mapping[str, Any]) -> list[str]:
        """Rules for `NAME{arguments}`: Gemma's syntax where the schema allows, else JSON."""
        builder = GemmaArguments(self._token('<|"|>'), prefix=f"{rule}_a")
        try:
            value = builder.value({"type": "object", **schema})
            return [f"{rule}: {json.dumps(name)} {value}", *builder.rules]
        except Unsupported:
            return [f"{rule}: {json.dumps(name)} {rule}_json", f"{rule}_json: %json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}"]

    def _frame(self, rules: list[str], thinking: bool, ends: Sequence[str]) -> str:
        """Optional thought channel (when thinking is on), the body, then a token that ends the turn."""
        lines = [f"start: {'thought? ' if thinking else ''}body end", *rules, "end: " + " | ".join(ends)]
        if thinking:
            lines.append(f"thought: {self._token('<|channel>')} /(?s:.*)/ {self._token('<channel|>')}")
        return "\n".join(lines)

    def _checked(self, lark: str) -> str:
        failed, problems = llguidance.LLMatcher.validate_grammar_with_warnings(lark, self._tokenizer)
        if failed:
            raise InvalidGrammar(f"the schema cannot constrain output: {problems[0].splitlines()[0] if problems else 'invalid'}")
        return lark
