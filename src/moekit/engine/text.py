"""Incremental detokenization with stop strings, for streaming.

Each update re-decodes all generated ids (exact for byte-level BPE, whose text of a prefix is
a prefix of the text) and cuts the text before the earliest stop string. What is streamed
holds back the last len(longest stop) - 1 characters (the start of a stop string must never
reach the client) and a trailing U+FFFD (an incomplete multi-byte character).
"""

from __future__ import annotations

from typing import List, Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of `text` already handed out

    def update(self, ids: List[int]) -> bool:
        """Re-decode `ids`; True when a stop string appeared (the text is then cut before it)."""
        self.text = self.tokenizer.decode(ids)
        if self.stop:
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return True
        return False

    def delta(self, final: bool = False) -> str:
        """New text that is safe to hand out (everything when `final`)."""
        end = len(self.text)
        if not final:
            end -= self.hold
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out
