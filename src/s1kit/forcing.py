"""What every engine needs to force text: compiling a format + policy into ``ForcingTokens`` for a tokenizer,
where a sentence ends (graceful caps), and the thinking cap that fits a context window.

Engines (``engines/``) and the in-engine integrations (``integrations/``, the vLLM processor) both stand on
this module, ``budget`` and ``formats``; neither of those two folders imports the other's internals.
"""

from __future__ import annotations

from typing import Any, Sequence

from .budget import BudgetPolicy, ForcingTokens, Kind
from .errors import S1KitError
from .formats import ThinkingFormat, format_tokens

__all__ = ["ForcingCompiler", "Kind", "context_cap", "ends_sentence"]


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
    """The thinking cap after leaving room in the context window for a cap's grace window, closing and answering."""
    if max_context is None:
        return policy.max_thinking_tokens
    room = max_context - prompt_len - policy.max_answer_tokens - tokens.max_closing_len - policy.cap_grace
    if room < 0:
        raise S1KitError(
            f"prompt of {prompt_len} tokens plus max_answer_tokens={policy.max_answer_tokens} "
            f"does not fit the model's context of {max_context} tokens"
        )
    cap = policy.max_thinking_tokens
    return room if cap is None else min(cap, room)
