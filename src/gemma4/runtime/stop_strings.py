"""Stop strings over streamed text: text that could still become a stop string is held back
until it is decided, so no part of a stop string is ever shown."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to show. After a hit, nothing more."""
        if self.hit:
            return ""
        self.pending += text
        found = [self.pending.find(s) for s in self.stops if s in self.pending]
        if found:
            self.hit = True
            out, self.pending = self.pending[: min(found)], ""
            return out
        hold = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        """The text held back, once no more will come."""
        out, self.pending = ("" if self.hit else self.pending), ""
        return out
