"""Streaming text out of growing token lists: what the server and the chat show as each row publishes tokens."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("s1kit")


class TextDeltas:
    """Turns a growing list of token ids into text deltas, decoding only a short window each time.

    With ``strip`` the deltas add up to the stripped text (as ``Completion.answer`` is): leading
    whitespace is dropped and trailing whitespace held back until more text follows it.
    """

    def __init__(self, tokenizer: Any, strip: bool) -> None:
        self.tokenizer, self.strip = tokenizer, strip
        self.start = self.read = 0  # the window [start, read) was decoded last time
        self.raw = ""  # text of ids[:read]
        self.sent = ""  # what the deltas so far add up to

    def update(self, ids: list[int]) -> str:
        """The delta after the ids grew."""
        if len(ids) > self.read:
            decode = self.tokenizer.decode
            before = decode(ids[self.start : self.read], skip_special_tokens=True)
            after = decode(ids[self.start :], skip_special_tokens=True)
            # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of the character.
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.raw += after[len(before) :]
                self.start, self.read = self.read, len(ids)
        return self._take(self.raw.strip() if self.strip else self.raw)

    def finish(self, text: str) -> str:
        """The rest of the engine's final text."""
        if not text.startswith(self.sent):
            log.warning("streamed text diverged from the final text; the stream may differ from it")
            return ""
        return self._take(text)

    def _take(self, visible: str) -> str:
        delta = visible[len(self.sent) :]
        self.sent = visible if delta else self.sent
        return delta
