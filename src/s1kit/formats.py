"""Thinking formats: the delimiters of thinking and answer, and prompt/example rendering.

One rendering function serves inference (``render_prompt``) and training (``render_example``), so the
text a model is trained on and the text it is prompted with can never disagree. Imports nothing else
from the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

Messages = Sequence[dict[str, str]]


@dataclass(frozen=True)
class ThinkingFormat:
    """Where thinking starts, which single tokens end it, and how the answer is opened."""

    name: str
    think_open: str  # appended after the chat template's assistant header
    stop_tokens: tuple[str, ...]  # each must be a single token of the vocabulary
    answer_open: str  # canonical answer opener, forced when thinking ends
    end_tokens: tuple[str, ...] = ()  # end-of-turn tokens besides EOS (used where the vocabulary has them)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))
        object.__setattr__(self, "end_tokens", tuple(self.end_tokens))
        if not self.stop_tokens or not all(isinstance(s, str) and s for s in self.stop_tokens):
            raise ValueError(f"format {self.name!r}: stop_tokens must be a non-empty list of non-empty strings")
        if not self.answer_open:
            raise ValueError(f"format {self.name!r}: answer_open must not be empty")


S1 = ThinkingFormat(
    name="s1",
    think_open="<|im_start|>think\n",
    stop_tokens=("<|im_start|>", "<|im_end|>"),
    answer_open="<|im_start|>answer\n",
    end_tokens=("<|im_end|>",),
)
R1 = ThinkingFormat(name="r1", think_open="<think>\n", stop_tokens=("</think>",), answer_open="</think>\n\n")
FORMATS = {"s1": S1, "r1": R1}


def get_format(fmt: str | ThinkingFormat) -> ThinkingFormat:
    """Resolve a preset name (``s1``, ``r1``) or pass a ``ThinkingFormat`` through."""
    if isinstance(fmt, ThinkingFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown thinking format {fmt!r}; choose one of: {', '.join(FORMATS)}") from None


@dataclass(frozen=True)
class FormatTokens:
    """A format's delimiters as token ids of one tokenizer."""

    stop_ids: frozenset[int]
    end_ids: frozenset[int]
    opener_ids: tuple[int, ...]


def _single_token_id(tokenizer: Any, fmt: ThinkingFormat, text: str, role: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"format {fmt.name!r}: {role} {text!r} is not a single token of this model's vocabulary "
            f"(it encodes to {len(ids)} tokens); use a format whose delimiters the model knows "
            f"(e.g. --format s1 for ChatML models) or add them as special tokens before fine-tuning"
        )
    return ids[0]


def eos_ids(tokenizer: Any, extra: Sequence[int] = ()) -> set[int]:
    """EOS ids of a tokenizer plus any ``extra`` (e.g. from a generation config)."""
    ids = {int(i) for i in extra}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def format_tokens(tokenizer: Any, fmt: ThinkingFormat, extra_eos: Sequence[int] = ()) -> FormatTokens:
    """Compile ``fmt`` against ``tokenizer``; raise ``ValueError`` if a delimiter is not one token."""
    stops = {_single_token_id(tokenizer, fmt, s, "stop token") for s in fmt.stop_tokens}
    eos = eos_ids(tokenizer, extra_eos)
    ends = set(eos)
    for s in fmt.end_tokens:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1:
            ends.add(ids[0])
    if not ends:
        raise ValueError("the tokenizer has no EOS token and the format names no end-of-turn token")
    opener = tuple(tokenizer.encode(fmt.answer_open, add_special_tokens=False))
    return FormatTokens(stop_ids=frozenset(stops | eos), end_ids=frozenset(ends), opener_ids=opener)


def as_messages(prompt: str | Messages, system: str | None = None) -> list[dict[str, str]]:
    """A user prompt (or a message list) as chat messages, with an optional system prompt first."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        if not messages:
            raise ValueError("empty message list")
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ValueError(f"message {i} needs 'role' and 'content' keys, got {sorted(m)}")
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    return messages


def _chat_prefix(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No chat template (a base model): plain text turns.
    return "".join(f"{m['content']}\n\n" for m in messages)


def render_prompt(tokenizer: Any, prompt: str | Messages, fmt: ThinkingFormat, system: str | None = None) -> str:
    """The text fed to the model: chat template with the assistant header, then the think opener."""
    return _chat_prefix(tokenizer, as_messages(prompt, system)) + fmt.think_open


def render_example(
    tokenizer: Any,
    prompt: str | Messages,
    fmt: ThinkingFormat,
    thinking: str,
    answer: str,
    system: str | None = None,
) -> tuple[str, str]:
    """A training example as (prompt text, completion text); the prompt equals ``render_prompt``'s.

    The completion is the thinking, a newline if it lacks one, the answer opener, the answer and the
    chat template's end of turn.
    """
    messages = as_messages(prompt, system)
    prompt_text = _chat_prefix(tokenizer, messages) + fmt.think_open
    body = thinking if thinking.endswith("\n") else thinking + "\n"
    body += fmt.answer_open + answer
    if not getattr(tokenizer, "chat_template", None):
        eos = tokenizer.eos_token or ""
        return prompt_text, body + eos
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": fmt.think_open + body}], tokenize=False
    )
    if not full.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the assistant turn differently from the generation prompt "
            f"(format {fmt.name!r}); training and inference would disagree"
        )
    return prompt_text, full[len(prompt_text) :]
