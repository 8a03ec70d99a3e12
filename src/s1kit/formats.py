"""Thinking formats: the delimiters of thinking and answer, and prompt/example rendering.

One rendering function serves inference (``render_prompt``) and training (``render_example``), so the
text a model is trained on and the text it is prompted with can never disagree. Imports nothing else
from the package.

``auto`` (``resolve_format``) picks the format from the tokenizer and its chat template: ``r1`` where
``</think>`` is one token of the vocabulary (DeepSeek-R1 distills, QwQ, Qwen3), else ``s1`` (ChatML). Whatever the
format, a chat template that opens the thought itself (its generation prompt ends with ``<think>`` and maybe a
newline: later R1-distill revisions, QwQ) is not opened again, and one that closes it (Qwen3 with
``enable_thinking=false`` writes an empty think block) means thinking is off: the engine closes it at once
(a thinking budget of 0).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

Messages = Sequence[dict[str, str]]


@dataclass(frozen=True)
class ThinkingFormat:
    """Where thinking starts, which single tokens end it, and how the answer is opened."""

    name: str
    think_open: str  # appended after the chat template's assistant header (unless the template wrote it)
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

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the chat template (``TemplatedFormat`` has them)."""
        return {}

    @property
    def closed(self) -> bool:
        """Thinking is off: the engine closes it before the first token (``TemplatedFormat`` can be)."""
        return False


# Keys apply_chat_template sets itself: a chat_template_kwargs entry may not change them.
_RESERVED = frozenset({"self", "conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                       "return_dict", "return_tensors", "chat_template", "tools", "documents", "padding", "truncation",
                       "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask", "sanitize_control_tokens",
                       "kwargs"})


def template_kwargs(kwargs: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Chat-template arguments as a sorted tuple of pairs; ``ValueError`` for a key that is not a name, a value that
    is not a JSON scalar (bool, number, string, null) or a key that ``apply_chat_template`` sets itself."""
    if kwargs is None:
        return ()
    if isinstance(kwargs, Mapping):
        items = list(kwargs.items())
    elif isinstance(kwargs, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in kwargs):
        items = [tuple(p) for p in kwargs]
    else:
        raise ValueError(f"chat_template_kwargs must be an object of names to values, got {type(kwargs).__name__}")
    for key, value in items:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"chat_template_kwargs: {key!r} is not a name")
        if key in _RESERVED:
            raise ValueError(f"chat_template_kwargs may not set {key!r} (s1kit sets it)")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"chat_template_kwargs: {key!r} must be a boolean, number, string or null, "
                             f"got {type(value).__name__}")
    if len({k for k, _ in items}) != len(items):
        raise ValueError("chat_template_kwargs names a key twice")
    return tuple(sorted(items))


@dataclass(frozen=True)
class TemplatedFormat(ThinkingFormat):
    """A format rendered with chat-template arguments, and maybe with thinking off (``closed``): what
    ``resolve_format`` returns where a template argument or the template itself changes the prompt."""

    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    closed: bool = False  # type: ignore[assignment]  # thinking off: the engine closes it at once

    def __post_init__(self) -> None:
        super().__post_init__()
        kwargs = template_kwargs(self.chat_template_kwargs)
        object.__setattr__(self, "chat_template_kwargs", kwargs)
        switch = dict(kwargs).get("enable_thinking")
        if switch is not None and not isinstance(switch, bool):
            raise ValueError(f"chat_template_kwargs: 'enable_thinking' must be true or false, got {switch!r}")
        if switch is False:
            object.__setattr__(self, "closed", True)
        elif switch is True and self.closed:
            raise ValueError("chat_template_kwargs enable_thinking=true, but the format has thinking off")

    @property
    def template_kwargs(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.chat_template_kwargs)


S1 = ThinkingFormat(
    name="s1",
    think_open="<|im_start|>think\n",
    stop_tokens=("<|im_start|>", "<|im_end|>"),
    answer_open="<|im_start|>answer\n",
    end_tokens=("<|im_end|>",),
)
R1 = ThinkingFormat(name="r1", think_open="<think>\n", stop_tokens=("</think>",), answer_open="</think>\n\n")
# A placeholder: rendering and compiling resolve it against the tokenizer at hand (``resolve_format``); its own
# delimiters are never used. Its opener ends in a newline as both presets' do (what the forcing compiler reads).
AUTO = ThinkingFormat(name="auto", think_open="\n", stop_tokens=("<auto>",), answer_open="<auto>")
FORMATS = {"auto": AUTO, "s1": S1, "r1": R1}


def get_format(fmt: str | ThinkingFormat) -> ThinkingFormat:
    """Resolve a preset name (``auto``, ``s1``, ``r1``) or pass a ``ThinkingFormat`` through."""
    if isinstance(fmt, ThinkingFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown thinking format {fmt!r}; choose one of: {', '.join(FORMATS)}") from None


THINK_END = "</think>"


def _is_token(tokenizer: Any, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


_PROBE = [{"role": "user", "content": "1+1?"}]
_resolved: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def resolve_format(tokenizer: Any, fmt: str | ThinkingFormat = "auto",
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> ThinkingFormat:
    """The format a model runs in: ``auto`` picks ``r1`` where ``</think>`` is one token of the vocabulary, else
    ``s1`` (``ValueError`` where neither's delimiters are tokens); a preset or custom format stays itself. With
    ``chat_template_kwargs`` (merged over the format's own), or where the chat template closes the thought by
    itself, the result is a ``TemplatedFormat``; ``enable_thinking=false`` (or such a template) gives thinking off."""
    base = get_format(fmt)
    kwargs = {**base.template_kwargs, **dict(template_kwargs(chat_template_kwargs))}
    template = getattr(tokenizer, "chat_template", None)
    key = (base, tuple(sorted(kwargs.items())), template if isinstance(template, str) else repr(template))
    try:
        cache = _resolved.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that takes no weak reference: resolve every time
        cache = {}
    hit = cache.get(key)
    if hit is not None:
        return hit
    if base.name == AUTO.name:
        if _is_token(tokenizer, THINK_END):
            base = R1
        elif all(_is_token(tokenizer, t) for t in S1.stop_tokens):
            base = S1
        else:
            raise ValueError(f"format 'auto': this vocabulary has neither {THINK_END!r} (format r1) nor ChatML's "
                             f"{S1.stop_tokens[0]!r} (format s1) as a token; name the delimiters of a custom format")
    plain = {k: v for k, v in asdict(base).items() if k in ThinkingFormat.__dataclass_fields__}
    fmt_out = ThinkingFormat(**plain)
    if FORMATS.get(fmt_out.name) == fmt_out:
        fmt_out = FORMATS[fmt_out.name]  # the preset itself (sent by name to a server's processor)
    closed = bool(kwargs) and kwargs.get("enable_thinking") is False
    if not closed and _closing_block(_chat_prefix(tokenizer, list(_PROBE), kwargs), fmt_out) is not None:
        closed = True  # the template turns thinking off by itself
    if kwargs or closed:
        fmt_out = TemplatedFormat(**plain, chat_template_kwargs=tuple(sorted(kwargs.items())), closed=closed)
    cache[key] = fmt_out
    return fmt_out


def opens_thought(tokenizer: Any, fmt: ThinkingFormat) -> bool:
    """Whether the chat template's generation prompt already opens the thought (ends with the format's opening
    tag and maybe a newline), so ``render_prompt`` adds nothing (or only the newline)."""
    fmt = resolve_format(tokenizer, fmt) if fmt.name == AUTO.name else fmt
    tag = fmt.think_open.rstrip("\n")
    prefix = _chat_prefix(tokenizer, list(_PROBE), fmt.template_kwargs)
    return bool(tag) and prefix.rstrip("\n").endswith(tag) and _closing_block(prefix, fmt) is None


def describe_format(tokenizer: Any, fmt: ThinkingFormat, asked: str | ThinkingFormat = "auto") -> str:
    """One line saying which format runs and why (what the command line prints)."""
    why = []
    if get_format(asked).name == AUTO.name:
        why.append(f"auto: {THINK_END!r} is one token of this vocabulary" if fmt.name == R1.name
                   else f"auto: no {THINK_END!r} token in this vocabulary" if fmt.name == S1.name else "auto")
    if fmt.closed:
        why.append("thinking off: thinking budget 0")
    elif opens_thought(tokenizer, fmt):
        why.append("the chat template opens the thought itself")
    if fmt.template_kwargs:
        why.append("chat template arguments " + ", ".join(f"{k}={v!r}" for k, v in fmt.template_kwargs.items()))
    return f"format {fmt.name}" + (f" ({'; '.join(why)})" if why else "")


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
            f"(--format auto picks r1 or s1 from the vocabulary) or add them as special tokens before fine-tuning"
        )
    return ids[0]


def eos_ids(tokenizer: Any, extra: Sequence[int] = ()) -> set[int]:
    """EOS ids of a tokenizer plus any ``extra`` (e.g. from a generation config)."""
    ids = {int(i) for i in extra}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def format_tokens(tokenizer: Any, fmt: ThinkingFormat, extra_eos: Sequence[int] = ()) -> FormatTokens:
    """Compile ``fmt`` against ``tokenizer`` (``auto`` resolved first); raise ``ValueError`` if a delimiter is not
    one token."""
    if fmt.name == AUTO.name:
        fmt = resolve_format(tokenizer, fmt)
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


def _chat_prefix(tokenizer: Any, messages: list[dict[str, str]], kwargs: Mapping[str, Any] | None = None) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(kwargs or {}))
    # No chat template (a base model): plain text turns.
    return "".join(f"{m['content']}\n\n" for m in messages)


def _closing_block(prefix: str, fmt: ThinkingFormat) -> re.Match | None:
    """Where ``prefix`` ends in an empty thought the template closed (Qwen3's ``<think>\\n\\n</think>\\n\\n``): the
    match's group 1 ends where the closing tag starts."""
    tag = fmt.think_open.rstrip("\n")
    if not tag.strip():
        return None
    stops = "|".join(re.escape(t) for t in fmt.stop_tokens)
    return re.search(rf"({re.escape(tag)}\s*)(?:{stops})\s*\Z", prefix)


def _open_thought(prefix: str, fmt: ThinkingFormat) -> str:
    """The generation prompt with the thought open exactly once: the opener appended, unless the template opened it
    (then only a missing newline is added); with thinking off, a thought the template closed is left open at its
    opening (the engine closes it at once with the canonical answer opener)."""
    block = _closing_block(prefix, fmt)
    if block is not None:
        if not fmt.closed:
            raise ValueError(
                f"the chat template closes the thought itself (its generation prompt ends in an empty "
                f"{fmt.think_open.strip()!r} block), but format {fmt.name!r} thinks: resolve the format against the "
                "tokenizer (format auto), or pass chat_template_kwargs that turn thinking on (enable_thinking=true)")
        return prefix[: block.end(1)]
    tag = fmt.think_open.rstrip("\n")
    body = prefix.rstrip("\n")
    if tag.strip() and body.endswith(tag):
        return prefix if prefix != body else body + fmt.think_open[len(tag):]
    return prefix + fmt.think_open


def render_prompt(tokenizer: Any, prompt: str | Messages, fmt: ThinkingFormat, system: str | None = None,
                  chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The text fed to the model: the chat template's generation prompt (``chat_template_kwargs``, merged over the
    format's own, go to ``apply_chat_template``: Qwen3's ``enable_thinking``), then the think opener unless the
    template opened the thought. ``auto`` is resolved against ``tokenizer``."""
    messages = as_messages(prompt, system)
    fmt = _runtime_format(tokenizer, fmt, chat_template_kwargs)
    return _open_thought(_chat_prefix(tokenizer, messages, fmt.template_kwargs), fmt)


def _runtime_format(tokenizer: Any, fmt: ThinkingFormat, chat_template_kwargs: Mapping[str, Any] | None) -> ThinkingFormat:
    """``fmt`` with ``chat_template_kwargs``, ``auto`` resolved."""
    if fmt.name != AUTO.name and not chat_template_kwargs:
        return fmt
    resolved = resolve_format(tokenizer, fmt, chat_template_kwargs)
    if fmt.name == AUTO.name and resolved.closed and not chat_template_kwargs:
        # An engine given "auto" caps thinking by the request's format, which does not say that thinking is off.
        raise ValueError(f"{describe_format(tokenizer, resolved)}: resolve the format first (resolve_format) and "
                         "send requests in the resolved format, or pass chat_template_kwargs that turn thinking on")
    return resolved


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
    fmt = _runtime_format(tokenizer, fmt, None)
    if fmt.closed:
        raise ValueError(f"format {fmt.name!r} has thinking off: a training example needs a thought")
    prompt_text = _open_thought(_chat_prefix(tokenizer, messages, fmt.template_kwargs), fmt)
    body = thinking if thinking.endswith("\n") else thinking + "\n"
    body += fmt.answer_open + answer
    if not getattr(tokenizer, "chat_template", None):
        eos = tokenizer.eos_token or ""
        return prompt_text, body + eos
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": fmt.think_open + body}], tokenize=False, **fmt.template_kwargs
    )
    if not full.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the assistant turn differently from the generation prompt "
            f"(format {fmt.name!r}); training and inference would disagree"
        )
    return prompt_text, full[len(prompt_text) :]
