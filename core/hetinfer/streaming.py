"""Turning a stream of token ids into text as it comes, with stop strings: text that
could be the start of a stop string is held back until it is known not to be."""

from __future__ import annotations

from typing import Iterator


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        from .tokenizer import StreamDecoder
        self.decoder = StreamDecoder(tokenizer)
        self.stop = list(stop or [])
        self.pending = ""      # decoded, not yet emitted
        self.text = ""         # everything emitted
        self.tokens: list[int] = []   # every token followed, stop token included
        self.stopped = False   # ended by a stop string

    def follow(self, tokens, stop_ids=()) -> Iterator[str]:
        """Yield the text of a token stream as it becomes safe to show, until a token of
        stop_ids (not shown) or a stop string; what was held back comes last."""
        for t in tokens:
            self.tokens.append(t)
            if t in stop_ids:
                break
            piece = self.push(t)
            if piece:
                yield piece
            if self.stopped:
                break
        tail = self.flush()
        if tail:
            yield tail

    def push(self, token: int) -> str:
        """Feed one token; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token)
        for s in self.stop:
            at = self.pending.find(s)
            if at >= 0:
                self.stopped = True
                return self._emit(self.pending[:at])
        keep = 0                    # the longest tail that starts some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return self._emit(self.pending[:len(self.pending) - keep], rest=self.pending[len(self.pending) - keep:])

    def flush(self) -> str:
        """At the end of generation: whatever is held back is text after all."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        for s in self.stop:
            at = self.pending.find(s)
            if at >= 0:
                self.stopped = True
                return self._emit(self.pending[:at])
        return self._emit(self.pending)

    def _emit(self, text: str, rest: str = "") -> str:
        self.text += text
        self.pending = rest
        return text
