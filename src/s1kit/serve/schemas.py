"""Request bodies of the OpenAI-compatible server, validated by pydantic, plus the thinking-budget extension.

A request's thinking budget comes from ``thinking_budget`` (an object, or an integer meaning ``max_tokens``),
vLLM's ``thinking_token_budget`` (the cap) or the ``reasoning_effort`` shorthand; with none of them thinking has no
cap (the server's ``--default-thinking-budget`` aside) and the context window bounds it. ``max_tokens`` /
``max_completion_tokens`` bound thinking and answer together, as OpenAI defines completion tokens. Fields the
``openai`` client sends through ``extra_body`` arrive at the top level; a literal ``extra_body`` object (as some HTTP
clients send it) is merged in too. Anything invalid becomes an HTTP 422; a valid option this server's engines
cannot honour (``min_p``, penalties, ``logprobs``, ...) a 400 naming it (``refusal``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from ..budget import BudgetPolicy, EarlyExit
from ..engines.base import SamplingParams
from ..formats import ThinkingFormat, resolve_format, template_kwargs

# reasoning_effort -> thinking cap (tokens). Documented in docs/serving.md. "none" is no thinking at all (the answer
# opener is forced at once, as with chat_template_kwargs {"enable_thinking": false}).
EFFORT_BUDGETS = {"none": 0, "minimal": 64, "low": 256, "medium": 1024, "high": 4096}
Effort = Literal["none", "minimal", "low", "medium", "high"]
MAX_STOP_STRINGS = 16
DEFAULT_MAX_ANSWER_TOKENS = BudgetPolicy().max_answer_tokens  # one default for the library, the CLI and the server


class FieldError(ValueError):
    """A ``ValueError`` of a validator that checks several fields, naming the one at fault (the error's ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _utf8(text: str) -> str:
    """Reject text that cannot be UTF-8 (a lone surrogate escape such as "\\ud800" in the JSON): the tokenizer
    would fail on it after the request was accepted."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text must be valid Unicode (a lone surrogate at character {e.start})") from None
    return text


Count = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[int, Field(strict=True, ge=1)]
Text = Annotated[str, AfterValidator(_utf8)]
# torch generators take 64-bit seeds; an engine adds the sample index (n <= 64) to the request's seed
Seed = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]


class EarlyExitSpec(BaseModel):
    """``thinking_budget.early_exit``: stop thinking once probed answers settle (``budget.EarlyExit``)."""

    model_config = ConfigDict(extra="forbid")

    every: Optional[Positive] = None  # probe after every N thinking tokens
    words: Union[Text, list[Text]] = []  # probe before the model starts one of these words ("Wait", "Hmm")
    probe_tokens: Positive = 16  # answer tokens a probe decodes, greedily
    agree: Optional[Positive] = 2  # exit when the last N probe answers are equal
    confidence: Optional[Annotated[float, Field(gt=0, le=1)]] = None  # exit when a probe is this confident

    def rule(self) -> EarlyExit:
        """This spec as an ``EarlyExit``."""
        return EarlyExit(every=self.every, words=self.words, probe_tokens=self.probe_tokens, agree=self.agree,
                         confidence=self.confidence)


class ThinkingBudget(BaseModel):
    """The ``thinking_budget`` extension: s1-style budget forcing per request."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: Optional[Count] = None  # cap on thinking tokens; null = no cap (the context window still bounds it)
    min_tokens: Count = 0  # below it, stopping to answer is suppressed (a wait string is appended)
    num_waits: Count = 0  # suppress the first N stops, appending a wait string each time
    wait_strings: Optional[Union[Text, list[Text]]] = None  # default ["Wait"]
    answer_prefix: Optional[Text] = None  # forced after the answer opener at the cap; default "Final Answer:"
    grace_tokens: Count = 0  # at the cap, think on up to N tokens to end the sentence or line first
    early_exit: Optional[EarlyExitSpec] = None  # stop once the probed answer has settled

    @model_validator(mode="after")
    def _check(self) -> "ThinkingBudget":
        try:
            self.policy(DEFAULT_MAX_ANSWER_TOKENS)
        except ValueError as e:  # BudgetPolicy's message, in this API's field names
            raise ValueError(str(e).replace("max_thinking_tokens", "max_tokens").replace(
                "min_thinking_tokens", "min_tokens").replace("cap_grace", "grace_tokens")) from None
        return self

    def policy(self, max_answer_tokens: int) -> BudgetPolicy:
        """This budget as a ``BudgetPolicy``."""
        extra: dict[str, Any] = {}
        if self.wait_strings is not None:
            extra["wait_strings"] = self.wait_strings
        if self.answer_prefix is not None:
            extra["answer_prefix"] = self.answer_prefix
        return BudgetPolicy(max_thinking_tokens=self.max_tokens, min_thinking_tokens=self.min_tokens,
                            num_waits=self.num_waits, max_answer_tokens=max_answer_tokens, cap_grace=self.grace_tokens,
                            early_exit=self.early_exit.rule() if self.early_exit is not None else None, **extra)


class TextPart(BaseModel):
    """One text part of a multi-part message content."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: Union[Text, list[TextPart]]
    name: Optional[str] = None

    def as_dict(self) -> dict[str, str]:
        """The message as the chat template takes it."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        role = getattr(self, "role")
        return {"role": "system" if role == "developer" else role, "content": text}


class SystemMessage(_Message):
    """A system message; ``developer`` (OpenAI's newer name) counts as ``system``."""

    role: Literal["system", "developer"]


class UserMessage(_Message):
    """A user message."""

    role: Literal["user"]


class AssistantMessage(_Message):
    """An earlier assistant turn. Its thinking, echoed back as ``reasoning`` (vLLM, OpenRouter) or
    ``reasoning_content`` (older vLLM, DeepSeek), is taken and left out of the prompt, as reasoning models' chat
    templates leave earlier thinking out."""

    role: Literal["assistant"]
    reasoning: Optional[Text] = None
    reasoning_content: Optional[Text] = None
    # what an assistant message echoed by the openai client may carry with nothing in it
    tool_calls: Optional[Annotated[list[Any], Field(max_length=0)]] = None
    refusal: None = None


ChatMessage = Annotated[Union[SystemMessage, UserMessage, AssistantMessage], Field(discriminator="role")]


class StreamOptions(BaseModel):
    """``stream_options``: a last chunk with ``usage`` when ``include_usage`` is true."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


def _neutral(value: Any, *neutral: Any) -> bool:
    """Whether an option is absent or one of its neutral values (``True`` is not ``1``, ``False`` is ``0`` only
    where ``0`` is listed)."""
    return value is None or any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


class _GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    # Unknown fields are errors: a misspelt "thinking_budget" must not silently run without a budget.
    model_config = ConfigDict(extra="forbid")

    model: str
    n: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0  # OpenAI's default; pass 0 for greedy decoding
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(strict=True, ge=-1)] = 0  # 0 or -1 (vLLM's "off"): no top-k
    seed: Optional[Seed] = None
    # completion tokens (thinking, answer opener, answer, end of turn) as OpenAI counts them; exact
    max_tokens: Optional[Positive] = None
    max_completion_tokens: Optional[Positive] = None  # same meaning, the newer OpenAI name
    max_answer_tokens: Optional[Positive] = None  # s1kit's answer budget: sampled answer tokens (after the prefix)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    thinking_budget: Optional[ThinkingBudget] = None  # or an integer: the thinking cap
    thinking_token_budget: Optional[Count] = None  # vLLM's field: the thinking cap
    reasoning_effort: Optional[Effort] = None
    include_reasoning: StrictBool = True  # vLLM's field: false leaves the thinking out of the response
    user: Optional[str] = None
    # extra arguments of the model's chat template, as vLLM and SGLang take them: {"enable_thinking": false} turns a
    # Qwen3-style model's thinking off (thinking budget 0)
    chat_template_kwargs: Optional[dict[str, Union[bool, int, float, Text, None]]] = None
    # the answer is cut at the first of these (not the thinking); the row ends there
    stop: Optional[Union[Text, Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)]]] = None
    include_stop_str_in_output: StrictBool = False  # vLLM's field: keep the stop string at the end of the answer
    # Sampling options the engines do not have: only their neutral values (a 400 naming the field otherwise, see
    # refusal), so that a client sending its defaults works and nothing is silently ignored.
    min_p: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0, le=2)]] = None
    presence_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    logprobs: Optional[Union[bool, Annotated[int, Field(strict=True, ge=0, le=20)]]] = None
    top_logprobs: Optional[Annotated[int, Field(strict=True, ge=0, le=20)]] = None
    logit_bias: Optional[dict[str, float]] = None

    @model_validator(mode="before")
    @classmethod
    def _merge_extra_body(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "extra_body" not in data:
            return data
        data = dict(data)
        extra = data.pop("extra_body")
        if extra is None:
            return data
        if not isinstance(extra, dict):
            raise FieldError("extra_body", "extra_body must be an object")
        for key, value in extra.items():
            if key in data and data[key] != value:
                raise FieldError(key, f"{key} is given both in the body and in extra_body")
            data[key] = value
        return data

    @field_validator("temperature")
    @classmethod
    def _sampleable(cls, value: float) -> float:
        SamplingParams(temperature=value)  # a temperature too small to sample with (0 is greedy): named here
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value: Optional[dict]) -> Optional[dict]:
        if value is not None:
            template_kwargs(value)  # names, JSON scalars, nothing s1kit sets itself
            if value.get("enable_thinking") not in (None, True, False):
                raise ValueError("chat_template_kwargs.enable_thinking must be true or false")
        return value

    @field_validator("thinking_budget", mode="before")
    @classmethod
    def _budget_shorthand(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"max_tokens": value}
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        if value is not None and any(s == "" for s in ([value] if isinstance(value, str) else value)):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> "_GenerationRequest":
        given = [k for k in ("thinking_budget", "thinking_token_budget", "reasoning_effort")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise FieldError(given[1], f"give either thinking_budget or reasoning_effort or thinking_token_budget (one "
                                       f"thinking budget), not several: got {' and '.join(given)}")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise FieldError("max_completion_tokens", "max_tokens and max_completion_tokens disagree; give one")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed with stream: true")
        self.sampling()
        budget = self.thinking_budget
        if (self.chat_template_kwargs or {}).get("enable_thinking") is False and budget is not None \
                and (budget.min_tokens or budget.num_waits):
            raise FieldError("chat_template_kwargs.enable_thinking", "chat_template_kwargs.enable_thinking is false "
                                                                     "(no thinking), but thinking_budget asks for "
                                                                     "min_tokens or num_waits")
        limit = self.completion_limit
        if budget is not None and limit is not None and budget.min_tokens >= limit:
            name = "max_tokens" if self.max_tokens is not None else "max_completion_tokens"
            raise FieldError("thinking_budget.min_tokens",
                             f"thinking_budget.min_tokens ({budget.min_tokens}) leaves no room for an answer in "
                             f"{name} ({limit}), which bounds thinking and answer together (OpenAI's completion "
                             f"tokens): raise {name} above min_tokens")
        return self

    @property
    def completion_limit(self) -> int | None:
        """``max_tokens`` / ``max_completion_tokens``: the most completion tokens (thinking included), or None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings (none when ``stop`` is absent)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(dict.fromkeys(self.stop))

    def thinking_format(self, fmt: ThinkingFormat, tokenizer: Any) -> ThinkingFormat:
        """The server's format with this request's ``chat_template_kwargs`` (``ValueError`` where the chat template
        refuses them)."""
        if not self.chat_template_kwargs:
            return fmt
        try:
            return resolve_format(tokenizer, fmt, self.chat_template_kwargs)
        except Exception as e:  # jinja2's TemplateError: the template raised on these arguments
            if isinstance(e, (ValueError, TypeError)) or type(e).__name__ == "TemplateError":
                raise ValueError(f"chat_template_kwargs: {e}") from None
            raise

    def refusal(self, max_context: int | None = None) -> tuple[str, str] | None:
        """``(param, message)`` when this valid request still cannot run on this server (an HTTP 400, before it is
        queued): a sampling option the engines do not have, set to anything but its neutral value; early-exit probes
        as long as the model's context."""
        unsupported = [("min_p", _neutral(self.min_p, 0), "0"),
                       ("repetition_penalty", _neutral(self.repetition_penalty, 1), "1"),
                       ("presence_penalty", _neutral(self.presence_penalty, 0), "0"),
                       ("frequency_penalty", _neutral(self.frequency_penalty, 0), "0"),
                       ("logprobs", _neutral(self.logprobs, False, 0), "false"),
                       ("top_logprobs", _neutral(self.top_logprobs, 0), "0"),
                       ("logit_bias", not self.logit_bias, "{}")]
        for name, neutral, value in unsupported:
            if not neutral:
                return (name, f"{name} is not supported by this server's engine (it samples with temperature, top_p, "
                              f"top_k and seed only); leave it out or send {value}")
        rule = self.thinking_budget.early_exit if self.thinking_budget is not None else None
        if rule is not None and max_context is not None and rule.probe_tokens >= max_context:
            return ("thinking_budget.early_exit.probe_tokens",
                    f"probe_tokens ({rule.probe_tokens}) must be less than the model's context ({max_context} tokens)")
        return None

    def policy(self, default_thinking: int | None = None) -> BudgetPolicy:
        """The ``BudgetPolicy`` this request asks for; ``default_thinking`` caps thinking when the request names no
        thinking budget (the server's ``--default-thinking-budget``). Its answer budget is ``max_answer_tokens``, else
        ``max_tokens``, else 512; the server lowers it to what ``max_tokens`` and the context leave (see
        ``worker.EngineWorker._prepare``)."""
        max_answer = self.max_answer_tokens or self.completion_limit or DEFAULT_MAX_ANSWER_TOKENS
        if self.thinking_budget is not None:
            return self.thinking_budget.policy(max_answer)
        if self.thinking_token_budget is not None:
            cap: int | None = self.thinking_token_budget
        elif self.reasoning_effort is not None:
            cap = EFFORT_BUDGETS[self.reasoning_effort]
        else:
            cap = default_thinking
        return BudgetPolicy(max_thinking_tokens=cap, max_answer_tokens=max_answer)

    def sampling(self) -> SamplingParams:
        """The ``SamplingParams`` of this request."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), seed=self.seed,
                              n=self.n)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]

    @model_validator(mode="after")
    def _check_messages(self) -> "ChatCompletionRequest":
        if self.messages[-1].role == "assistant":
            raise FieldError("messages", "the last message must not be from the assistant (continuing a turn is not "
                                         "supported)")
        if not any(m.as_dict()["content"].strip() for m in self.messages if m.role == "user"):
            raise FieldError("messages", "messages need a non-empty user message")
        return self

    def prompts(self) -> list[list[dict[str, str]]]:
        """One prompt: the message list."""
        return [[m.as_dict() for m in self.messages]]


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: each prompt is sent as a user message through the chat template."""

    prompt: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=64)]]

    @model_validator(mode="after")
    def _check_prompt(self) -> "CompletionRequest":
        if any(not p.strip() for p in self.prompts()):
            raise FieldError("prompt", "prompt must not be empty")
        return self

    def prompts(self) -> list[str]:
        """The prompt strings."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
