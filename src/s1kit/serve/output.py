"""What a client sees of one choice: its thinking and answer, cut at the request's completion-token limit and at the
first stop string, streamed without ever sending text that a cut later takes back.

The engine decodes a row under a static budget (a thinking cap and an answer budget that fit the context). Two
bounds of the OpenAI API are not of that kind: ``max_tokens`` counts thinking, the answer opener, the answer and the
end of turn together, and ``stop`` ends the answer at a string. ``ChoiceText`` applies both to the row's tokens as
they arrive: it says when the row must end (the worker then aborts it, so its compute stops: at the next step, or a
chunk later on the GPU fast path) and rewrites the finished ``Completion`` to the cut, so that the counts are exact
whatever the engine decoded past it.

A row's ``Trace`` holds its tokens in order: thinking (``thinking_ids``), the answer opener (counted nowhere), the
answer (``answer_ids``: forced prefix, then sampled) and, when the model ended the turn, the end token.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from ..engines.base import Completion
from ..streaming import TextDeltas

log = logging.getLogger("s1kit.serve")


class AnswerText:
    """An answer's text as its tokens arrive (decoding a short window at a time, holding back incomplete UTF-8), and
    where the first stop string appears in it.

    Stop strings are matched in the answer as the client sees it (``Completion.answer``: leading whitespace
    dropped), the forced answer prefix included. ``stop_at`` is then ``(answer tokens up to the one that completed
    the stop string, its position in that text, the stop string)``."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), include_stop: bool = False) -> None:
        self.tokenizer, self.stops, self.include_stop = tokenizer, tuple(stops), include_stop
        self.longest = max((len(s) for s in self.stops), default=0)
        self.start = self.read = 0  # the window [start, read) was decoded last
        self.seen = 0  # tokens looked at
        self.raw = ""  # text of the first ``read`` tokens
        self.scanned = 0  # characters of the visible text searched for stop strings
        self.stop_at: tuple[int, int, str] | None = None

    @property
    def visible(self) -> str:
        """The text so far as the answer shows it (leading whitespace dropped)."""
        return self.raw.lstrip()

    def feed(self, ids: Sequence[int]) -> None:
        """Take the answer's token ids (the list only grows); with stop strings, token by token until one appears."""
        if self.stop_at is not None or len(ids) <= self.seen:
            return
        if not self.stops:
            self._extend(ids, len(ids))
            return
        for end in range(self.seen + 1, len(ids) + 1):
            self._extend(ids, end)
            if self._scan(end):
                return

    def _extend(self, ids: Sequence[int], end: int) -> None:
        self.seen = end
        decode = self.tokenizer.decode
        before = decode(list(ids[self.start : self.read]), skip_special_tokens=True)
        after = decode(list(ids[self.start : end]), skip_special_tokens=True)
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of the character.
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.raw += after[len(before) :]
            self.start, self.read = self.read, end

    def _scan(self, tokens: int) -> bool:
        text = self.visible
        if len(text) <= self.scanned:
            return False
        since = max(0, self.scanned - self.longest + 1)  # a stop string may begin in text searched before
        self.scanned = len(text)
        found = [(pos, s) for s in self.stops if (pos := text.find(s, since)) >= 0]
        if not found:
            return False
        pos, stop = min(found, key=lambda f: (f[0], -len(f[1])))
        self.stop_at = (tokens, pos, stop)
        return True

    def cut_text(self) -> str:
        """The answer up to the first stop string (which is kept only with ``include_stop``), trimmed."""
        assert self.stop_at is not None
        _, pos, stop = self.stop_at
        return (self.visible[:pos] + (stop if self.include_stop else "")).strip()

    def safe_text(self) -> str:
        """What may be streamed now: the text cut at the stop string once one appeared; before that, all but a tail
        that could still become a stop string, and trailing whitespace (held until more text follows it)."""
        if self.stop_at is not None:
            return self.cut_text()
        text = self.visible
        hold = 0
        for s in self.stops:
            for j in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:j]):
                    hold = j
                    break
        return text[: len(text) - hold].rstrip()


class ChoiceText:
    """One choice (one row) as the client sees it; see the module docstring.

    ``update(row)`` after each of the row's publications returns the ``(thinking, answer)`` text to stream now (empty
    unless ``stream``) and sets ``ending`` when the server must end the row (a stop string appeared, or the row holds
    ``limit`` completion tokens and goes on); ``completion(row)`` gives the finished row's ``Completion``, cut."""

    def __init__(self, tokenizer: Any, index: int, request_index: int, sample_index: int, limit: int | None = None,
                 stops: Sequence[str] = (), include_stop: bool = False, stream: bool = False) -> None:
        self.tokenizer, self.index = tokenizer, index
        self.request_index, self.sample_index = request_index, sample_index
        self.limit, self.stops, self.stream = limit, tuple(stops), stream
        self.answer = AnswerText(tokenizer, stops, include_stop)
        self.thinking = TextDeltas(tokenizer, False)
        self.sent = ""  # answer text streamed so far
        self.cut: str | None = None  # "stop" or "length" once the server decided to end the row
        self.ending = False  # the row must be ended (aborted) now
        self.handle: Any = None  # the engine handle of this choice's row

    def _layout(self, row: Any) -> tuple[list[int], list[int], int]:
        """(thinking ids, answer ids, tokens before the answer) of the row, within ``limit``."""
        t = row.trace
        n_think, n_answer, n_all = len(t.thinking_ids), len(t.answer_ids), len(t.token_ids)
        ended_turn = row.done and t.finish_reason == "stop" and n_all > n_think + n_answer \
            and t.token_ids[-1] in row.handle.prepared.tokens.end_ids
        before_answer = n_all - n_answer - int(ended_turn)  # thinking and the answer opener
        if self.limit is None:
            return t.thinking_ids, t.answer_ids, before_answer
        room = max(0, self.limit - before_answer)
        return t.thinking_ids[: self.limit], t.answer_ids[:room], before_answer

    def update(self, row: Any) -> tuple[str, str]:
        """Take the row's latest tokens (see the class)."""
        thinking_ids, answer_ids, _ = self._layout(row)
        if self.stops or self.stream:
            self.answer.feed(answer_ids)
        if self.cut is None:
            n_all = len(row.trace.token_ids)
            if self.answer.stop_at is not None:
                self.cut = "stop"
            elif self.limit is not None and n_all >= self.limit and not (row.done and n_all <= self.limit):
                self.cut = "length"
        self.ending = self.cut is not None and not row.done
        if not self.stream:
            return "", ""
        if row.done:
            c = self.completion(row)
            return self.thinking.finish(c.thinking), self._take(c.answer, final=True)
        return self.thinking.update(thinking_ids), self._take(self.answer.safe_text())

    def _take(self, text: str, final: bool = False) -> str:
        if not text.startswith(self.sent):
            if final:
                log.warning("streamed text diverged from the final text; the stream may differ from it")
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def completion(self, row: Any) -> Completion:
        """The finished row's completion, cut at the stop string or the completion-token limit."""
        c = row.completion
        t = row.trace
        thinking_ids, answer_ids, before_answer = self._layout(row)
        changes: dict[str, Any] = {"request_index": self.request_index, "sample_index": self.sample_index}
        if self.cut == "stop":
            kept = self.answer.stop_at[0]
            changes.update(answer=self.answer.cut_text(), answer_tokens=kept, finish_reason="stop",
                           token_ids=list(t.token_ids[: before_answer + kept]))
        elif self.cut == "length":
            changes.update(finish_reason="length", token_ids=list(t.token_ids[: self.limit]))
            if len(answer_ids) < len(t.answer_ids):
                changes.update(answer=self._decode(answer_ids).strip(), answer_tokens=len(answer_ids))
        if len(thinking_ids) < len(t.thinking_ids):  # the limit fell inside the thinking: it never closed
            changes.update(thinking=self._decode(thinking_ids), thinking_tokens=len(thinking_ids), hit_cap=False,
                           early_exit=False)
        return dataclasses.replace(c, **changes)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
