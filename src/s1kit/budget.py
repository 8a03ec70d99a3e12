"""Budget forcing: the validated policy and the per-sequence state machine every engine runs.

Pure Python on purpose: no torch, nothing from the rest of the package. Engines compile a
``ForcingTokens`` (token ids of the format, wait strings and answer prefix) once per tokenizer, then
drive one ``BudgetState`` per sequence, asking it each step which token to emit.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Callable, NamedTuple, Sequence


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _freeze_strings(obj: object, name: str) -> None:
    """Store a frozen dataclass's string-list field as a tuple (one string given alone becomes a 1-tuple)."""
    value = getattr(obj, name)
    object.__setattr__(obj, name, (value,) if isinstance(value, str) else tuple(value))


@dataclass(frozen=True)
class EarlyExit:
    """Stop thinking once the answer has settled (Dynasor-CoT / DEER style), checked by probes.

    A probe is a side branch that never changes the sequence: the context so far + the answer opener + the answer
    prefix, decoded greedily for up to ``probe_tokens`` tokens. Probes run after every ``every`` thinking tokens
    and/or when the model is about to start one of ``words`` (the probe then sees the thinking before the word).
    Thinking closes at that point, exactly as at a cap, once the last ``agree`` probe answers are equal (after
    normalisation) or a probe's mean token probability reaches ``confidence``. ``min_thinking_tokens`` still
    holds: no probe runs before it. Probe tokens are compute, and every completion reports them."""

    every: int | None = None
    words: tuple[str, ...] = ()
    probe_tokens: int = 16
    agree: int | None = 2
    confidence: float | None = None

    def __post_init__(self) -> None:
        _freeze_strings(self, "words")
        if self.every is not None:
            _check_int("every", self.every, 1)
        if not all(isinstance(w, str) and w.strip() for w in self.words):
            raise ValueError("words must be non-empty strings")
        if self.every is None and not self.words:
            raise ValueError("early exit needs a probe point: every (tokens) and/or words")
        _check_int("probe_tokens", self.probe_tokens, 1)
        if self.agree is not None:
            _check_int("agree", self.agree, 1)
        if self.confidence is not None and (isinstance(self.confidence, bool) or not isinstance(
                self.confidence, (int, float)) or not 0 < self.confidence <= 1):
            raise ValueError(f"confidence must be in (0, 1], got {self.confidence!r}")
        if self.agree is None and self.confidence is None:
            raise ValueError("early exit needs a rule: agree (probes) and/or confidence")

    def is_probe_point(self, thinking: int, proposed: int, tokens: ForcingTokens, min_thinking: int,
                       last_probe: int) -> bool:
        """Whether a free proposal after ``thinking`` tokens is a probe point: every ``every`` tokens or the start
        of a word, never a stop, never before ``min_thinking``, never twice at one count (``last_probe``)."""
        if proposed in tokens.stop_ids or thinking < min_thinking or thinking == last_probe:
            return False
        return bool(self.every and thinking and thinking % self.every == 0) or proposed in tokens.word_ids

    def settled(self, answers: list[str], confidence: float) -> bool:
        """Whether the rule holds after the latest probe (``answers``: every probe's normalised answer so far)."""
        if self.confidence is not None and confidence >= self.confidence:
            return True
        n = self.agree
        return n is not None and len(answers) >= n and answers[-1] != "" and len(set(answers[-n:])) == 1


@dataclass(frozen=True)
class BudgetPolicy:
    """How much a sequence may (and must) think. Immutable; invalid combinations raise ``ValueError``."""

    max_thinking_tokens: int | None = None
    min_thinking_tokens: int = 0
    num_waits: int = 0
    wait_strings: tuple[str, ...] = ("Wait",)
    answer_prefix: str = "Final Answer:"
    max_answer_tokens: int = 512
    early_exit: EarlyExit | None = None
    cap_grace: int = 0  # at the cap, think on up to this many tokens to end the sentence or line first

    def __post_init__(self) -> None:
        _freeze_strings(self, "wait_strings")
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
        if self.early_exit is not None and not isinstance(self.early_exit, EarlyExit):
            raise ValueError(f"early_exit must be an EarlyExit, got {self.early_exit!r}")
        _check_int("cap_grace", self.cap_grace, 0)

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
    word_ids: frozenset[int] = frozenset()  # first tokens of the early-exit words: a probe point when proposed
    ends_sentence: Callable[[int], bool] | None = field(default=None, compare=False)  # "." "!" "?" or a newline

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

    @property
    def max_closing_len(self) -> int:
        """The most tokens a closing takes between thinking and the sampled answer (newline, opener, prefix)."""
        return len(self.newline_ids) + len(self.opener_ids) + len(self.prefix_ids)


class Phase(str, Enum):
    THINK = "think"
    ANSWER = "answer"
    DONE = "done"


class FinishReason(str, Enum):
    """How a sequence ended: an end token (or an answer cut at a stop string), a length limit (answer budget,
    context), the caller ended it, or its request failed. Compares and serialises as its value."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"

    __str__ = str.__str__  # "stop", not "FinishReason.STOP", in text and f-strings
    __format__ = str.__format__


class Counts(NamedTuple):
    """A sequence's counters besides its tokens, as a backend's budget machine knows them."""

    waits_used: int = 0
    hit_cap: bool = False
    early_exit: bool = False
    probe_tokens: int = 0
    waits_exact: bool = True  # False: a Wait may have been written by the model itself (the tokens cannot tell)


class Kind(IntEnum):
    """What an emitted token is, in every engine: thinking (sampled or a forced Wait), the opener (counted
    nowhere), the forced answer prefix, a sampled answer token, the end of the turn, or nothing (a row that
    emitted nothing this step). The fast path records these per step; the values are its tensor codes."""

    THINK = 0
    OPENER = 1
    PREFIX = 2
    ANSWER = 3
    END = 4
    NONE = 5


_KINDS = tuple(Kind)  # code -> Kind (the codes are 0..5): cheaper than Kind(code) per token


@dataclass(eq=False)
class Trace:
    """What one sequence emitted so far, and how it ended: the one record every engine fills (``BudgetState`` is
    one; the fast path fills one from its device records) and every ``Completion`` is built from."""

    thinking_ids: list[int] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)  # after the opener: forced prefix + sampled, no end token
    token_ids: list[int] = field(default_factory=list)  # everything emitted, end token included
    kinds: list[Kind] = field(default_factory=list)  # what each of token_ids is
    waits_used: int = 0
    hit_cap: bool = False
    finish_reason: FinishReason | None = None  # set once ended
    early_exit: bool = False  # closed by the early-exit rule
    probe_answers: list[str] = field(default_factory=list)  # each probe's normalised answer, in order
    probe_tokens: int = 0  # tokens decoded by probes (compute, not part of the sequence)
    waits_exact: bool = True  # False where waits_used had to be guessed (see ``Counts``)

    def record(self, tokens: Sequence[int], kinds: Sequence[int]) -> None:
        """Append emitted tokens by their kinds: thinking to ``thinking_ids``, the forced prefix and sampled answer
        to ``answer_ids``, every token (the opener and the end token too) to ``token_ids``."""
        for token, kind in zip(tokens, kinds):
            self._record(token, _KINDS[kind])

    def _record(self, token: int, kind: Kind) -> None:
        self.token_ids.append(token)
        self.kinds.append(kind)
        if kind is Kind.THINK:
            self.thinking_ids.append(token)
        elif kind is Kind.PREFIX or kind is Kind.ANSWER:
            self.answer_ids.append(token)

    @property
    def counts(self) -> Counts:
        """The counters besides the tokens."""
        return Counts(self.waits_used, self.hit_cap, self.early_exit, self.probe_tokens, self.waits_exact)

    def set_counts(self, counts: Counts) -> None:
        """Take a backend's counters."""
        self.waits_used, self.hit_cap, self.early_exit, self.probe_tokens, self.waits_exact = counts

    def record_probe(self, rule: EarlyExit, answer: str, confidence: float, tokens: int) -> bool:
        """Add a probe (normalised answer, mean token probability, tokens it decoded); True (and ``early_exit``
        set) once ``rule`` holds."""
        self.probe_tokens += tokens
        self.probe_answers.append(answer)
        self.early_exit = rule.settled(self.probe_answers, confidence)
        return self.early_exit


class BudgetState(Trace):
    """The budget-forcing state machine of one sequence (DESIGN.md §2), and its ``Trace``.

    Call ``step(proposed)`` with the model's proposal for the next token; it returns the token to emit,
    which is the proposal unless the policy forces something else. Stop when ``done`` is true.
    """

    def __init__(self, policy: BudgetPolicy, tokens: ForcingTokens, cap: int | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.tokens = tokens
        # The engine may lower the cap (context window); ``None`` means the policy's own.
        self.cap = policy.max_thinking_tokens if cap is None else cap
        self.phase = Phase.THINK
        self._sampled_answer = 0
        self._forced: deque[tuple[int, Kind]] = deque()
        self._ends_nl = tokens.prompt_ends_with_newline
        self._at_boundary = tokens.prompt_ends_with_newline  # thinking so far ends a sentence or line
        self._probed_at = -1

    @property
    def done(self) -> bool:
        """True once the sequence has ended (end of turn or answer budget)."""
        return self.phase is Phase.DONE

    @property
    def next_is_forced(self) -> bool:
        """True when the next emitted token does not depend on the proposal."""
        if self._forced and not self._wait_cut_by_cap():
            return True
        return self.phase is Phase.THINK and self._closing_due()

    def _wait_cut_by_cap(self) -> bool:
        return self._forced[0][1] is Kind.THINK and self._past_cap()

    def free_proposals(self) -> int | None:
        """How many proposals in a row the machine may still take as they are before it must act (the cap and its
        grace window, or the answer budget); None while thinking has no cap. A backend that decodes ahead of the
        machine (a server call) asks for at most this many tokens."""
        if self.phase is Phase.THINK:
            return None if self.cap is None else max(self.cap + self.policy.cap_grace - len(self.thinking_ids), 0)
        return max(self.policy.max_answer_tokens - self._sampled_answer, 0)

    def _past_cap(self) -> bool:
        return self.cap is not None and len(self.thinking_ids) >= self.cap

    def _closing_due(self) -> bool:
        """At the cap: close now, unless a grace window lets the sentence or line end first."""
        if self.early_exit:
            return True
        if not self._past_cap():
            return False
        grace = self.policy.cap_grace
        return grace == 0 or self._at_boundary or len(self.thinking_ids) >= self.cap + grace

    # -- early exit: the engine asks before each free thinking step, probes, and reports back -------------

    def probe_due(self, proposed: int) -> bool:
        """Whether the engine must probe before emitting ``proposed`` (an early-exit probe point)."""
        ee = self.policy.early_exit
        if ee is None or self.phase is not Phase.THINK or self._forced or self._closing_due():
            return False
        return ee.is_probe_point(len(self.thinking_ids), proposed, self.tokens, self.policy.min_thinking_tokens,
                                 self._probed_at)

    def probe_suffix(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """What a probe appends to the context so far: (the answer opener, the answer prefix), as a cap would
        force them after this thinking."""
        return self.tokens.cap_close_ids(self._ends_nl)

    def observe_probe(self, answer: str, confidence: float, tokens: int) -> bool:
        """Record a probe (normalised answer, mean token probability, tokens it decoded); True if thinking now
        closes: the opener and prefix are forced at the next step, and ``early_exit`` is set."""
        self._probed_at = len(self.thinking_ids)
        if self.record_probe(self.policy.early_exit, answer, confidence, tokens):
            self.cap = len(self.thinking_ids)
            return True
        return False

    def stop_thinking(self) -> None:
        """Close thinking at the next step exactly as the cap does (the cap becomes the thinking so far)."""
        if self.phase is Phase.THINK:
            self.cap = len(self.thinking_ids) if self.cap is None else min(self.cap, len(self.thinking_ids))

    def peek(self, proposed: int) -> int:
        """The token ``step(proposed)`` would emit, leaving the state as it was (``step`` runs and is undone)."""
        saved, forced = self.__dict__.copy(), self._forced.copy()
        lengths = len(self.thinking_ids), len(self.answer_ids), len(self.token_ids)
        try:
            return self.step(proposed)
        finally:  # step only appends to the four lists and mutates the queue; everything else is rebound
            del self.thinking_ids[lengths[0]:], self.answer_ids[lengths[1]:], self.token_ids[lengths[2]:]
            del self.kinds[lengths[2]:]
            self.__dict__.update(saved)
            self._forced = forced

    def clone(self) -> "BudgetState":
        """An independent copy of this state (policy and forcing tokens are shared: they are immutable)."""
        other = copy.copy(self)
        other.thinking_ids, other.answer_ids = list(self.thinking_ids), list(self.answer_ids)
        other.token_ids, other.kinds, other._forced = list(self.token_ids), list(self.kinds), self._forced.copy()
        other.probe_answers = list(self.probe_answers)
        return other

    def cancel(self) -> None:
        """End the sequence now (the caller stopped wanting it); ``finish_reason`` becomes "cancelled"."""
        self.end(FinishReason.CANCELLED)

    def end(self, reason: FinishReason | str) -> None:
        """End the sequence now with ``reason`` (e.g. "length": the backend can decode no further)."""
        self._forced.clear()
        self.phase, self.finish_reason = Phase.DONE, FinishReason(reason)

    def step(self, proposed: int) -> int:
        """Consume the model's proposal and return the token to emit."""
        if self.phase is Phase.DONE:
            raise RuntimeError("step() called on a finished sequence")
        if self._forced and self._wait_cut_by_cap():
            self._forced.clear()  # the cap wins over a Wait being forced
        if self._forced:
            return self._emit(*self._forced.popleft())
        if self.phase is Phase.THINK:
            return self._think(proposed)
        return self._answer(proposed)

    def _think(self, proposed: int) -> int:
        t = self.tokens
        if self._closing_due():
            self.hit_cap = not self.early_exit
            opener, prefix = t.cap_close_ids(self._ends_nl)
            self._force([(i, Kind.OPENER) for i in opener] + [(i, Kind.PREFIX) for i in prefix])
            return self._emit(*self._forced.popleft())
        if proposed in t.stop_ids:
            extend = self.waits_used < self.policy.num_waits or len(self.thinking_ids) < self.policy.min_thinking_tokens
            if extend and not self._past_cap():  # in a cap's grace window a stop is accepted
                wait = t.wait_ids[self.waits_used % len(t.wait_ids)]
                self.waits_used += 1
                self._force([(i, Kind.THINK) for i in wait])
            else:
                # Accepted: a proposal equal to the opener's first token is kept and the rest forced; any
                # other stop (end of turn, EOS) is replaced by the opener. Both emit exactly the opener.
                self._force([(i, Kind.OPENER) for i in t.opener_ids])
            return self._emit(*self._forced.popleft())
        return self._emit(proposed, Kind.THINK)

    def _answer(self, proposed: int) -> int:
        if proposed in self.tokens.end_ids:
            self._record(proposed, Kind.END)
            self.phase, self.finish_reason = Phase.DONE, FinishReason.STOP
            return proposed
        self._record(proposed, Kind.ANSWER)
        self._sampled_answer += 1
        if self._sampled_answer >= self.policy.max_answer_tokens:
            self.phase, self.finish_reason = Phase.DONE, FinishReason.LENGTH
        return proposed

    def _force(self, items: list[tuple[int, Kind]]) -> None:
        self._forced.extend(items)
        if items and items[0][1] is not Kind.THINK:
            self.phase = Phase.ANSWER  # closing tokens are queued: thinking is over

    def _emit(self, token: int, kind: Kind) -> int:
        self._record(token, kind)
        if kind is Kind.THINK:  # a thinking token, sampled or forced
            self._ends_nl = self.tokens.ends_with_newline(token)
            ends = self.tokens.ends_sentence
            self._at_boundary = self._ends_nl or (ends is not None and ends(token))
        return token
