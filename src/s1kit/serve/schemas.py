"""Request bodies of the OpenAI-compatible server, validated by pydantic, plus the thinking-budget extension.

A request's budget comes from ``thinking_budget`` (an object, or an integer meaning ``max_tokens``) or from
the ``reasoning_effort`` shorthand; with neither, ``medium`` applies, as with OpenAI's reasoning models.
Fields the ``openai`` client sends through ``extra_body`` arrive at the top level; a literal ``extra_body``
object (as some HTTP clients send it) is merged in too. Anything invalid becomes an HTTP 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..budget import BudgetPolicy, EarlyExit
from ..engines.base import SamplingParams
from ..formats import ThinkingFormat, resolve_format, template_kwargs

# reasoning_effort -> thinking cap (tokens). Documented in docs/serving.md.
EFFORT_BUDGETS = {"low": 256, "medium": 1024, "high": 4096}
DEFAULT_EFFORT = "medium"
DEFAULT_MAX_ANSWER_TOKENS = BudgetPolicy().max_answer_tokens  # one default for the library, the CLI and the server


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


class ChatMessage(BaseModel):
    """A chat message; ``developer`` counts as ``system``, an echoed ``reasoning_content`` is dropped."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart]]
    name: Optional[str] = None
    reasoning_content: Optional[str] = None

    def as_dict(self) -> dict[str, str]:
        """The message as the chat template takes it."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    """``stream_options``: a last chunk with ``usage`` when ``include_usage`` is true."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


def _reject_if_set(data: dict, name: str, default: Any, reason: str) -> None:
    if data.get(name) not in (None, default):
        raise ValueError(f"{name} is not supported: {reason}")


class _GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    # Unknown fields are errors: a misspelt "thinking_budget" must not silently run without a budget.
    model_config = ConfigDict(extra="forbid")

    model: str
    n: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0  # OpenAI's default; pass 0 for greedy decoding
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Count = 0
    seed: Optional[Seed] = None
    max_tokens: Optional[Positive] = None  # bounds the answer (content) tokens; thinking has its own budget
    max_completion_tokens: Optional[Positive] = None  # same meaning, the newer OpenAI name
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    thinking_budget: Optional[ThinkingBudget] = None  # or an integer: the thinking cap
    reasoning_effort: Optional[Literal["low", "medium", "high"]] = None
    user: Optional[str] = None
    # extra arguments of the model's chat template, as vLLM and SGLang take them: {"enable_thinking": false} turns a
    # Qwen3-style model's thinking off (thinking budget 0)
    chat_template_kwargs: Optional[dict[str, Union[bool, int, float, Text, None]]] = None
    # Accepted for compatibility; only their neutral values (checked below).
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[Union[bool, int]] = None
    stop: Optional[Union[str, list[str]]] = None

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
            raise ValueError("extra_body must be an object")
        for key, value in extra.items():
            if key in data and data[key] != value:
                raise ValueError(f"{key} is given both in the body and in extra_body")
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

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _reject_if_set(data, "presence_penalty", 0, "use the default 0")
            _reject_if_set(data, "frequency_penalty", 0, "use the default 0")
            _reject_if_set(data, "logprobs", False, "log probabilities are not returned")
            if data.get("stop"):
                raise ValueError("stop is not supported: thinking and answer end by the budget and end of turn")
        return data

    @model_validator(mode="after")
    def _check(self) -> "_GenerationRequest":
        if self.thinking_budget is not None and self.reasoning_effort is not None:
            raise ValueError("give either thinking_budget or reasoning_effort, not both")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; give one")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        self.sampling()
        budget = self.thinking_budget
        if (self.chat_template_kwargs or {}).get("enable_thinking") is False and budget is not None \
                and (budget.min_tokens or budget.num_waits):
            raise ValueError("chat_template_kwargs.enable_thinking is false (no thinking), but thinking_budget asks "
                             "for min_tokens or num_waits")
        return self

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
        """``(param, message)`` when this valid request still cannot run on this model (an HTTP 400, before it is
        queued): early-exit probes as long as the model's context."""
        rule = self.thinking_budget.early_exit if self.thinking_budget is not None else None
        if rule is not None and max_context is not None and rule.probe_tokens >= max_context:
            return ("thinking_budget.early_exit.probe_tokens",
                    f"probe_tokens ({rule.probe_tokens}) must be less than the model's context ({max_context} tokens)")
        return None

    def policy(self) -> BudgetPolicy:
        """The ``BudgetPolicy`` this request asks for."""
        max_answer = self.max_tokens or self.max_completion_tokens or DEFAULT_MAX_ANSWER_TOKENS
        if self.thinking_budget is not None:
            return self.thinking_budget.policy(max_answer)
        cap = EFFORT_BUDGETS[self.reasoning_effort or DEFAULT_EFFORT]
        return BudgetPolicy(max_thinking_tokens=cap, max_answer_tokens=max_answer)

    def sampling(self) -> SamplingParams:
        """The ``SamplingParams`` of this request."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
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
            raise ValueError("the last message must not be from the assistant (continuing a turn is not supported)")
        if not any(m.as_dict()["content"].strip() for m in self.messages if m.role == "user"):
            raise ValueError("messages need a non-empty user message")
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
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str]:
        """The prompt strings."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
