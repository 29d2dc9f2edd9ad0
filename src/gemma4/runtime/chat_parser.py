"""What the model writes in a turn -> reasoning, answer and tool calls, token by token.

One state machine does all of it. Special-token ids arrive as whole tags; text tokens are
decoded incrementally, and a tag spelled out in text (possibly split over several tokens) is
recognised too: text that could still become a tag is held back until it is decided. Nothing
is dropped: a tool call that cannot be parsed is returned as visible content."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
TURN_ENDS = ("<turn|>", "<eos>", "<|tool_response>")
TAGS = (CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE, *TURN_ENDS)
QUOTE = '<|"|>'


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_openai(self, index: int) -> dict[str, Any]:
        return {"id": f"call_{index}", "type": "function", "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}


@dataclass
class Event:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    call: ToolCall | None = None


@dataclass
class ChatResult:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, event: Event) -> None:
        if event.kind == "tool_call":
            self.tool_calls.append(event.call)  # type: ignore[arg-type]
        elif event.kind == "reasoning":
            self.reasoning += event.text
        else:
            self.content += event.text


class OutputParser:
    """Feed token ids with `push`, then `finish`; each returns the events it completed."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.special_text = {i: t for t, i in SPECIAL_TOKENS.items() if tokenizer.token_id(t) == i}
        self.decoder = StreamDecoder(tokenizer)
        self.state = "content"  # content | channel_name | thought | call | done
        self.pending = ""  # text not yet assigned (a possible tag prefix, or a channel name)
        self.call_text = ""

    def push(self, token: int) -> list[Event]:
        if token in self.special_text and self.special_text[token] != QUOTE:
            return self._feed(self.decoder.flush()) + self._feed(self.special_text[token])
        text = QUOTE if self.special_text.get(token) == QUOTE else self.decoder.push(token)
        return self._feed(text)

    def finish(self) -> list[Event]:
        events = self._feed(self.decoder.flush())
        text, self.pending = self.pending, ""
        events += self._emit(text) if self.state != "done" else []
        if self.state == "call":
            events += self._close_call(complete=False)
        self.state = "done"
        return [e for e in events if e.text or e.call]

    # --- the machine ------------------------------------------------------------------
    def _feed(self, text: str) -> list[Event]:
        if self.state == "done":  # whatever follows the end of the turn is not part of it
            return []
        events: list[Event] = []
        self.pending += text
        while self.pending and self.state != "done":
            found = [(self.pending.find(t), t) for t in TAGS if t in self.pending]
            if found:
                at, tag = min(found)
                before, self.pending = self.pending[:at], self.pending[at + len(tag) :]
                if self.state == "channel_name":  # a header closed without its newline: it was only the name
                    before, self.state = "", "thought"
                events += self._emit(before) + self._on_tag(tag)
                continue
            keep = _partial_tag_suffix(self.pending)
            if self.state == "channel_name":
                if "\n" not in self.pending:
                    break
                self.pending = self.pending.split("\n", 1)[1]  # the channel's name ("thought")
                self.state = "thought"
                continue
            text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
            events += self._emit(text)
            break
        return [e for e in events if e.text or e.call]

    def _emit(self, text: str) -> list[Event]:
        if not text:
            return []
        if self.state == "call":
            self.call_text += text
            return []
        if self.state == "channel_name":  # the turn ended inside the header: keep what was written
            self.state = "thought"
        return [Event("reasoning" if self.state == "thought" else "content", text)]

    def _on_tag(self, tag: str) -> list[Event]:
        if tag in TURN_ENDS:
            events = self._close_call(complete=False) if self.state == "call" else []
            self.state = "done"
            return events
        if tag == CHANNEL_OPEN and self.state != "call":
            self.state = "channel_name"
        elif tag == CHANNEL_CLOSE and self.state in ("thought", "channel_name", "content"):
            self.state = "content"  # a stray close (after a pre-filled empty thought) is dropped too
        elif tag == CALL_OPEN and self.state != "call":
            self.state, self.call_text = "call", ""
        elif tag == CALL_CLOSE and self.state == "call":
            return self._close_call(complete=True)
        else:  # a tag where it makes no sense: keep it visible
            return self._emit(tag)
        return []

    def _close_call(self, complete: bool) -> list[Event]:
        raw, self.state = self.call_text, "content"
        call = parse_call(raw)
        if call is None:
            return [Event("content", CALL_OPEN + raw + (CALL_CLOSE if complete else ""))]
        return [Event("tool_call", call=call)]


def _partial_tag_suffix(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some tag."""
    for n in range(min(len(text), max(map(len, TAGS)) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in TAGS):
            return n
    return 0


# --- tool-call arguments --------------------------------------------------------------------
_NAME = re.compile(r"\s*(?:call:)?\s*([A-Za-z_][\w.\-]*)\s*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_BARE = re.compile(r"[^,{}\[\]()]+")
_LITERALS = {"true": True, "false": False, "null": None, "none": None}


def parse_call(raw: str) -> ToolCall | None:
    """`call:NAME{key:value,...}` as Gemma writes it; also tolerates `NAME(key=value)`, JSON or
    single-quoted strings, and a missing closing brace at the very end."""
    match = _NAME.match(raw)
    if not match:
        return None
    rest = raw[match.end() :].strip()
    if not rest:
        return ToolCall(match.group(1), {})
    closing = {"{": "}", "(": ")"}.get(rest[0])
    if closing is None:
        return None
    for body in (rest, rest + closing):  # the model may stop before the last brace
        parser = _ArgParser(body[1:], closing)
        try:
            arguments = parser.object()
        except ValueError:
            continue
        if not parser.text[parser.at :].strip():
            return ToolCall(match.group(1), arguments)
    return None


class _ArgParser:
    def __init__(self, text: str, closing: str):
        self.text, self.at, self.closing = text, 0, closing

    def _skip(self) -> None:
        while self.at < len(self.text) and self.text[self.at].isspace():
            self.at += 1

    def _peek(self, s: str) -> bool:
        self._skip()
        return self.text.startswith(s, self.at)

    def _take(self, s: str) -> None:
        if not self._peek(s):
            raise ValueError(f"expected {s!r} at {self.at}")
        self.at += len(s)

    def object(self, closing: str | None = None) -> dict[str, Any]:
        closing = closing or self.closing
        out: dict[str, Any] = {}
        while not self._peek(closing):
            key = self.string() if self._peek(QUOTE) or self._peek('"') or self._peek("'") else self._bare_key()
            self._skip()
            if self._peek(":") or self._peek("="):
                self.at += 1
            else:
                raise ValueError("expected ':'")
            out[key] = self.value()
            if not self._peek(closing):
                self._take(",")
        self._take(closing)
        return out

    def _bare_key(self) -> str:
        match = re.compile(r"[^:=,{}\s]+").match(self.text, self.at)
        if not match:
            raise ValueError("expected a key")
        self.at = match.end()
        return match.group(0)

    def string(self) -> str:
        for quote in (QUOTE, '"', "'"):
            if self._peek(quote):
                end = self.text.find(quote, self.at + len(quote))
                while quote == '"' and end > 0 and self.text[end - 1] == "\\":
                    end = self.text.find(quote, end + 1)
                if end < 0:
                    raise ValueError("unterminated string")
                body = self.text[self.at + len(quote) : end]
                self.at = end + len(quote)
                return json.loads(f'"{body}"') if quote == '"' else body
        raise ValueError("expected a string")

    def value(self) -> Any:
        self._skip()
        if self._peek("{"):
            self.at += 1
            return self.object("}")
        if self._peek("["):
            self.at += 1
            items = []
            while not self._peek("]"):
                items.append(self.value())
                if not self._peek("]"):
                    self._take(",")
            self._take("]")
            return items
        if self._peek(QUOTE) or self._peek('"') or self._peek("'"):
            return self.string()
        number = _NUMBER.match(self.text, self.at)
        bare = _BARE.match(self.text, self.at)
        if bare is None:
            raise ValueError("expected a value")
        word = bare.group(0).strip()
        if number and number.end() - self.at == len(bare.group(0).rstrip()):
            self.at = number.end()
            return json.loads(number.group(0))
        self.at = bare.end()
        return _LITERALS.get(word.lower(), word)  # an unquoted word is taken as a string
