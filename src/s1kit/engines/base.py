"""What every engine shares: requests, sampling parameters, completions, and compiling a format + policy
into the token ids the budget state machine runs on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

from ..budget import BudgetPolicy, ForcingTokens
from ..errors import S1KitError, require_int
from ..formats import S1, Messages, ThinkingFormat, format_tokens, get_format


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; ``temperature == 0`` is greedy. ``n`` samples per request."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        require_int("top_k", self.top_k, 0)
        require_int("n", self.n)

    @property
    def greedy(self) -> bool:
        """True for argmax decoding."""
        return self.temperature == 0


@dataclass(frozen=True)
class Request:
    """One prompt (user text or chat messages) with its format, budget policy and sampling."""

    prompt: str | Messages
    policy: BudgetPolicy = field(default_factory=BudgetPolicy)
    format: ThinkingFormat | str = S1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", get_format(self.format))


@dataclass
class Completion:
    """One finished sequence: thinking and answer texts, token counts and how it ended."""

    prompt: str | list
    thinking: str
    answer: str
    thinking_tokens: int
    answer_tokens: int
    waits_used: int
    hit_cap: bool
    finish_reason: str  # "stop" | "length" | "cancelled"
    token_ids: list[int]
    prompt_tokens: int = 0
    request_index: int = 0
    sample_index: int = 0
    probe_tokens: int = 0  # tokens early-exit probes decoded for this sequence (compute beside it)
    early_exit: bool = False  # thinking was closed by the early-exit rule

    def to_dict(self, token_ids: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (token ids only when asked)."""
        d = asdict(self)
        if not token_ids:
            d.pop("token_ids")
        return d


class Trace(Protocol):
    """What an engine's per-sequence run leaves behind (``BudgetState`` and the reference loop's result)."""

    thinking_ids: list[int]
    answer_ids: list[int]
    token_ids: list[int]
    waits_used: int
    hit_cap: bool
    finish_reason: str | None


def make_completion(trace: Trace, tokenizer: Any, request: Request, prompt_tokens: int, ri: int, si: int) -> Completion:
    """Build a ``Completion`` from a finished trace."""
    return Completion(
        prompt=request.prompt if isinstance(request.prompt, str) else list(request.prompt),
        thinking=tokenizer.decode(trace.thinking_ids, skip_special_tokens=True),
        answer=tokenizer.decode(trace.answer_ids, skip_special_tokens=True).strip(),
        thinking_tokens=len(trace.thinking_ids),
        answer_tokens=len(trace.answer_ids),
        waits_used=trace.waits_used,
        hit_cap=trace.hit_cap,
        finish_reason=trace.finish_reason or "length",
        token_ids=list(trace.token_ids),
        prompt_tokens=prompt_tokens,
        request_index=ri,
        sample_index=si,
        probe_tokens=getattr(trace, "probe_tokens", 0),
        early_exit=getattr(trace, "early_exit", False),
    )


class Engine(Protocol):
    """What every engine offers: an engine core (``core.EngineCore``) that decodes requests with budget forcing.

    ``add`` queues a request and returns a handle, ``step`` advances every active sequence and publishes what it
    emitted, ``abort`` / ``stop_thinking`` act on a running request, and ``generate`` is a loop over them."""

    tokenizer: Any

    def prepare(self, request: Request) -> Any:
        """(prompt ids, forcing tokens, effective cap); ``S1KitError``/``ValueError`` if the request cannot run."""
        ...

    def add(self, request: Request, on_update: Callable[[Any], None] | None = None, request_index: int = 0,
            prepared: Any = None) -> Any:
        """Queue ``request``; ``on_update(row)`` runs as each of its rows publishes tokens or ends."""
        ...

    def step(self) -> None:
        """Advance every active sequence and publish what each emitted."""
        ...

    def abort(self, handle: Any) -> None:
        """End a request now; its places are freed."""
        ...

    def stop_thinking(self, handle: Any) -> None:
        """Close a request's thinking at its next step, as at the cap."""
        ...

    @property
    def has_work(self) -> bool:
        """True while anything is queued or decoding."""
        ...

    def generate(self, requests: Sequence[Request], on_progress: Callable[[int], None] | None = None,
                 on_complete: Callable[[Completion], None] | None = None) -> list[Completion]:
        """Completions for ``requests``, ``n`` per request, in request order."""
        ...


class ForcingCompiler:
    """Compiles (format, policy) into ``ForcingTokens`` for one tokenizer, caching the results."""

    def __init__(self, tokenizer: Any, extra_eos: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.extra_eos = tuple(extra_eos)
        self._cache: dict[tuple, ForcingTokens] = {}
        self._nl: dict[int, bool] = {}
        self._sentence: dict[int, bool] = {}

    def _ends_with_newline(self, token: int) -> bool:
        v = self._nl.get(token)
        if v is None:
            v = self._nl[token] = self.tokenizer.decode([token]).endswith("\n")
        return v

    def _ends_sentence(self, token: int) -> bool:
        v = self._sentence.get(token)
        if v is None:
            v = self._sentence[token] = ends_sentence(self.tokenizer.decode([token]))
        return v

    def word_ids(self, words: Sequence[str]) -> frozenset[int]:
        """First tokens of each word, written alone or after a space: where the model starts one of them."""
        enc = self.tokenizer.encode
        return frozenset(ids[0] for w in words for ids in (enc(w, add_special_tokens=False),
                                                            enc(" " + w, add_special_tokens=False)) if ids)

    def __call__(self, fmt: ThinkingFormat, policy: BudgetPolicy) -> ForcingTokens:
        """The ``ForcingTokens`` of ``fmt`` and ``policy``; ``ValueError`` if a delimiter is unknown."""
        words = policy.early_exit.words if policy.early_exit is not None else ()
        key = (fmt, policy.wait_strings, policy.answer_prefix, words)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        enc = self.tokenizer.encode
        ft = format_tokens(self.tokenizer, fmt, self.extra_eos)
        tokens = ForcingTokens(
            stop_ids=ft.stop_ids,
            end_ids=ft.end_ids,
            opener_ids=ft.opener_ids,
            newline_ids=tuple(enc("\n", add_special_tokens=False)),
            prefix_ids=tuple(enc(policy.answer_prefix, add_special_tokens=False)) if policy.answer_prefix else (),
            wait_ids=tuple(tuple(enc(w, add_special_tokens=False)) for w in policy.wait_strings),
            ends_with_newline=self._ends_with_newline,
            prompt_ends_with_newline=fmt.think_open.endswith("\n"),
            word_ids=self.word_ids(words),
            ends_sentence=self._ends_sentence,
        )
        self._cache[key] = tokens
        return tokens


def ends_sentence(text: str) -> bool:
    """Whether a token's text ends a sentence or a line (a graceful cap closes there): ".", "!", "?", maybe
    followed by a closing quote or bracket, or a newline."""
    t = text.rstrip(" \t\"')]*")
    return text.endswith("\n") or (bool(t) and t[-1] in ".!?" and not t.endswith(".."))


def context_cap(policy: BudgetPolicy, tokens: ForcingTokens, prompt_len: int, max_context: int | None) -> int | None:
    """The thinking cap after leaving room in the context window for closing and answering."""
    if max_context is None:
        return policy.max_thinking_tokens
    room = max_context - prompt_len - policy.max_answer_tokens - len(tokens.newline_ids + tokens.opener_ids + tokens.prefix_ids)
    if room < 0:
        raise S1KitError(
            f"prompt of {prompt_len} tokens plus max_answer_tokens={policy.max_answer_tokens} "
            f"does not fit the model's context of {max_context} tokens"
        )
    cap = policy.max_thinking_tokens
    return room if cap is None else min(cap, room)
