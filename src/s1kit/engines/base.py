"""What every engine shares: requests, sampling parameters, completions and the engine protocol (compiling
a format + policy into forcing tokens is ``s1kit.forcing``)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

from ..budget import BudgetPolicy, FinishReason, Trace
from ..errors import require_int
from ..formats import S1, Messages, ThinkingFormat, get_format


MIN_TEMPERATURE = 1e-2  # below it sampling is argmax in all but name (vLLM raises such temperatures to 0.01)


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
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow: no distribution to sample from
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
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
    finish_reason: FinishReason  # stop | length | cancelled (compares equal to those strings)
    token_ids: list[int]
    prompt_tokens: int = 0
    request_index: int = 0
    sample_index: int = 0
    probe_tokens: int = 0  # tokens early-exit probes decoded for this sequence (compute beside it)
    early_exit: bool = False  # thinking was closed by the early-exit rule
    waits_exact: bool = True  # False: a sampled sequence's waits_used counts a wait string the model may have written

    def to_dict(self, token_ids: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (token ids only when asked)."""
        d = asdict(self)
        if not token_ids:
            d.pop("token_ids")
        return d


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
        finish_reason=trace.finish_reason or FinishReason.LENGTH,
        token_ids=list(trace.token_ids),
        prompt_tokens=prompt_tokens,
        request_index=ri,
        sample_index=si,
        probe_tokens=trace.probe_tokens,
        early_exit=trace.early_exit,
        waits_exact=trace.waits_exact,
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
                 on_complete: Callable[[Completion], None] | None = None,
                 on_error: Callable[[int, Exception], None] | None = None) -> list[Completion]:
        """Completions for ``requests``, ``n`` per request, in request order (``on_error``: requests that fail
        alone are reported there and left out, see ``EngineCore.generate``)."""
        ...


@functools.lru_cache(maxsize=None)
def _cache_name(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name the model's forward takes: ``cache`` in newer transformers,
    ``past_key_values`` in older ones (which newer ones still take, with a deprecation warning)."""
    return {_cache_name(type(model)): cache}
