"""Budget forcing: the validated policy and the per-sequence state machine every engine runs.

Pure Python on purpose: no torch, nothing from the rest of the package. Engines compile a
``ForcingTokens`` (token ids of the format, wait strings and answer prefix) once per tokenizer, then
drive one ``BudgetState`` per sequence, asking it each step which token to emit.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class BudgetPolicy:
    """How much a sequence may (and must) think. Immutable; invalid combinations raise ``ValueError``."""

    max_thinking_tokens: int | None = None
    min_thinking_tokens: int = 0
    num_waits: int = 0
    wait_strings: tuple[str, ...] = ("Wait",)
    answer_prefix: str = "Final Answer:"
    max_answer_tokens: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.wait_strings, str):
            object.__setattr__(self, "wait_strings", (self.wait_strings,))
        else:
            object.__setattr__(self, "wait_strings", tuple(self.wait_strings))
        if self.max_thinking_tokens is not None:
            _check_int("max_thinking_tokens", self.max_thinking_tokens, 0)
        _check_int("min_thinking_tokens", self.min_thinking_tokens, 0)
        _check_int("num_waits", self.num_waits, 0)
        _check_int("max_answer_tokens", self.max_answer_tokens, 1)
        cap = self.max_thinking_tokens
        if cap is not None and self.min_thinking_tokens > cap:
            raise ValueError(
                f"min_thinking_tokens ({self.min_thinking_tokens}) exceeds max_thinking_tokens ({cap})"
            )
        if not self.wait_strings or not all(isinstance(w, str) and w for w in self.wait_strings):
            raise ValueError("wait_strings must be a non-empty list of non-empty strings")
        if not isinstance(self.answer_prefix, str):
            raise ValueError(f"answer_prefix must be a string, got {self.answer_prefix!r}")

    @property
    def forces_anything(self) -> bool:
        """True when the policy can change what the model emits (a cap, a minimum or waits)."""
        return self.max_thinking_tokens is not None or self.min_thinking_tokens > 0 or self.num_waits > 0


@dataclass(frozen=True)
class ForcingTokens:
    """Token ids the state machine needs, compiled once per (tokenizer, format, policy)."""

    stop_ids: frozenset[int]  # proposals that try to end thinking (format delimiters and EOS)
    end_ids: frozenset[int]  # tokens that end the answer (EOS, end of turn)
    opener_ids: tuple[int, ...]  # canonical answer opener, e.g. "<|im_start|>answer\n"
    newline_ids: tuple[int, ...]  # "\n", put before the opener when a capped text lacks one
    prefix_ids: tuple[int, ...]  # the answer prefix forced after a cap, e.g. "Final Answer:"
    wait_ids: tuple[tuple[int, ...], ...]  # one entry per wait string, used in turn
    ends_with_newline: Callable[[int], bool] = field(compare=False)  # does this token's text end in "\n"
    prompt_ends_with_newline: bool = True  # does the text before thinking end in "\n"

    def __post_init__(self) -> None:
        if not self.opener_ids:
            raise ValueError("the answer opener must encode to at least one token")
        if not self.stop_ids or not self.end_ids:
            raise ValueError("stop_ids and end_ids must not be empty")
        if not self.wait_ids or not all(self.wait_ids):
            raise ValueError("every wait string must encode to at least one token")

    def cap_close_ids(self, text_ends_with_newline: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(opener part, answer-prefix part) forced when the thinking cap is reached."""
        opener = self.opener_ids if text_ends_with_newline else self.newline_ids + self.opener_ids
        return opener, self.prefix_ids


class Phase(str, Enum):
    THINK = "think"
    ANSWER = "answer"
    DONE = "done"


# What an emitted token is: thinking (sampled or a forced Wait), the opener (neither), or the answer prefix.
_THINK, _OPENER, _PREFIX = "think", "opener", "prefix"


class BudgetState:
    """The budget-forcing state machine of one sequence (DESIGN.md §2).

    Call ``step(proposed)`` with the model's proposal for the next token; it returns the token to emit,
    which is the proposal unless the policy forces something else. Stop when ``done`` is true.
    """

    def __init__(self, policy: BudgetPolicy, tokens: ForcingTokens, cap: int | None = None) -> None:
        self.policy = policy
        self.tokens = tokens
        # The engine may lower the cap (context window); ``None`` means the policy's own.
        self.cap = policy.max_thinking_tokens if cap is None else cap
        self.phase = Phase.THINK
        self.thinking_ids: list[int] = []
        self.answer_ids: list[int] = []  # after the opener: forced prefix + sampled, no end token
        self.token_ids: list[int] = []  # everything emitted, end token included
        self.waits_used = 0
        self.hit_cap = False
        self.finish_reason: str | None = None
        self._sampled_answer = 0
        self._forced: deque[tuple[int, str]] = deque()
        self._ends_nl = tokens.prompt_ends_with_newline

    @property
    def done(self) -> bool:
        """True once the sequence has ended (end of turn or answer budget)."""
        return self.phase is Phase.DONE

    @property
    def next_is_forced(self) -> bool:
        """True when the next emitted token does not depend on the proposal."""
        if self._forced:
            return True
        return self.phase is Phase.THINK and self._cap_reached()

    def _cap_reached(self) -> bool:
        return self.cap is not None and len(self.thinking_ids) >= self.cap

    def peek(self, proposed: int) -> int:
        """The token ``step(proposed)`` would emit, leaving the state as it was (``step`` runs and is undone)."""
        saved, forced = self.__dict__.copy(), self._forced.copy()
        lengths = len(self.thinking_ids), len(self.answer_ids), len(self.token_ids)
        try:
            return self.step(proposed)
        finally:  # step only appends to the three lists and mutates the queue; everything else is rebound
            del self.thinking_ids[lengths[0]:], self.answer_ids[lengths[1]:], self.token_ids[lengths[2]:]
            self.__dict__.update(saved)
            self._forced = forced

    def clone(self) -> "BudgetState":
        """An independent copy of this state (policy and forcing tokens are shared: they are immutable)."""
        other = copy.copy(self)
        other.thinking_ids, other.answer_ids = list(self.thinking_ids), list(self.answer_ids)
        other.token_ids, other._forced = list(self.token_ids), self._forced.copy()
        return other

    def cancel(self) -> None:
        """End the sequence now (the caller stopped wanting it); ``finish_reason`` becomes "cancelled"."""
        self._forced.clear()
        self.phase, self.finish_reason = Phase.DONE, "cancelled"

    def step(self, proposed: int) -> int:
        """Consume the model's proposal and return the token to emit."""
        if self.phase is Phase.DONE:
            raise RuntimeError("step() called on a finished sequence")
        if self._forced and self._forced[0][1] == _THINK and self._cap_reached():
            self._forced.clear()  # the cap wins over a Wait being forced
        if self._forced:
            return self._emit(*self._forced.popleft())
        if self.phase is Phase.THINK:
            return self._think(proposed)
        return self._answer(proposed)

    def _think(self, proposed: int) -> int:
        t = self.tokens
        if self._cap_reached():
            self.hit_cap = True
            opener, prefix = t.cap_close_ids(self._ends_nl)
            self._force([(i, _OPENER) for i in opener] + [(i, _PREFIX) for i in prefix])
            return self._emit(*self._forced.popleft())
        if proposed in t.stop_ids:
            if self.waits_used < self.policy.num_waits or len(self.thinking_ids) < self.policy.min_thinking_tokens:
                wait = t.wait_ids[self.waits_used % len(t.wait_ids)]
                self.waits_used += 1
                self._force([(i, _THINK) for i in wait])
            else:
                # Accepted: a proposal equal to the opener's first token is kept and the rest forced; any
                # other stop (end of turn, EOS) is replaced by the opener. Both emit exactly the opener.
                self._force([(i, _OPENER) for i in t.opener_ids])
            return self._emit(*self._forced.popleft())
        return self._emit(proposed, _THINK)

    def _answer(self, proposed: int) -> int:
        self.token_ids.append(proposed)
        if proposed in self.tokens.end_ids:
            self.phase, self.finish_reason = Phase.DONE, "stop"
            return proposed
        self.answer_ids.append(proposed)
        self._sampled_answer += 1
        if self._sampled_answer >= self.policy.max_answer_tokens:
            self.phase, self.finish_reason = Phase.DONE, "length"
        return proposed

    def _force(self, items: list[tuple[int, str]]) -> None:
        self._forced.extend(items)
        if items and items[0][1] != _THINK:
            self.phase = Phase.ANSWER  # closing tokens are queued: thinking is over

    def _emit(self, token: int, kind: str) -> int:
        self.token_ids.append(token)
        if kind == _THINK:  # a thinking token, sampled or forced
            self.thinking_ids.append(token)
            self._ends_nl = self.tokens.ends_with_newline(token)
        elif kind == _PREFIX:
            self.answer_ids.append(token)
        return token
