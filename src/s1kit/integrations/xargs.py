"""The request fields of s1kit's vLLM logits processor: one budget policy and thinking format per request.

They travel in vLLM's ``vllm_xargs`` (HTTP) or ``SamplingParams.extra_args`` (Python), whose values may be
strings, numbers or lists of them, so no field needs JSON inside JSON. Every field starts with ``s1_``; a
request with none of them is left alone, and an unknown ``s1_`` field or a bad value is a ``ValueError``
(vLLM answers HTTP 400), never a silently ignored budget. Both directions live here so that the remote
engine and the processor can never disagree on a name.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..budget import BudgetPolicy
from ..formats import FORMATS, ThinkingFormat

PREFIX = "s1_"
# policy fields: the name in vllm_xargs -> the BudgetPolicy field
POLICY_FIELDS = {
    "s1_max_thinking_tokens": "max_thinking_tokens",
    "s1_min_thinking_tokens": "min_thinking_tokens",
    "s1_num_waits": "num_waits",
    "s1_wait_strings": "wait_strings",
    "s1_answer_prefix": "answer_prefix",
    "s1_max_answer_tokens": "max_answer_tokens",
}
# a custom thinking format (with s1_format = "custom"): the name in vllm_xargs -> the ThinkingFormat field
FORMAT_FIELDS = {
    "s1_think_open": "think_open",
    "s1_stop_tokens": "stop_tokens",
    "s1_answer_open": "answer_open",
    "s1_end_tokens": "end_tokens",
}
FIELDS = frozenset({"s1_format", *POLICY_FIELDS, *FORMAT_FIELDS})
_LISTS = frozenset({"s1_wait_strings", "s1_stop_tokens", "s1_end_tokens"})
_STRINGS = frozenset({"s1_answer_prefix", "s1_think_open", "s1_answer_open", "s1_format"})


def wants_forcing(args: Mapping[str, Any] | None) -> bool:
    """True when a request's extra arguments carry any ``s1_`` field."""
    return bool(args) and any(k.startswith(PREFIX) for k in args)


def to_xargs(policy: BudgetPolicy, fmt: ThinkingFormat) -> dict[str, Any]:
    """The ``vllm_xargs`` that ask the processor for ``policy`` in ``fmt`` (preset formats go by name)."""
    args: dict[str, Any] = {"s1_format": fmt.name if FORMATS.get(fmt.name) == fmt else "custom"}
    if args["s1_format"] == "custom":
        args.update({key: list(v) if isinstance(v, tuple) else v
                     for key, name in FORMAT_FIELDS.items() if (v := getattr(fmt, name)) != ()})
    for key, name in POLICY_FIELDS.items():
        value = getattr(policy, name)
        if value is not None:  # no cap: the field is left out (vllm_xargs has no null)
            args[key] = list(value) if isinstance(value, tuple) else value
    return args


def _check_type(key: str, value: Any) -> Any:
    if key in _LISTS:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        raise ValueError(f"{key} must be a non-empty string or a list of them, got {value!r}")
    if key in _STRINGS:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def from_xargs(args: Mapping[str, Any]) -> tuple[BudgetPolicy, ThinkingFormat]:
    """The policy and format a request asks for; ``ValueError`` naming the field on anything unknown or bad."""
    mine = {k: v for k, v in args.items() if k.startswith(PREFIX)}
    unknown = sorted(set(mine) - FIELDS)
    if unknown:
        raise ValueError(f"unknown s1kit budget field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    values = {k: _check_type(k, v) for k, v in mine.items()}
    name = values.pop("s1_format", "s1")
    custom = {FORMAT_FIELDS[k]: values.pop(k) for k in list(values) if k in FORMAT_FIELDS}
    if name == "custom":
        missing = [k for k in ("s1_think_open", "s1_stop_tokens", "s1_answer_open") if FORMAT_FIELDS[k] not in custom]
        if missing:
            raise ValueError(f"s1_format 'custom' needs {', '.join(missing)}")
        fmt = ThinkingFormat("custom", **custom)
    elif name in FORMATS:
        if custom:
            raise ValueError(f"{', '.join(sorted(custom))} only go with s1_format 'custom', not {name!r}")
        fmt = FORMATS[name]
    else:
        raise ValueError(f"s1_format must be one of {', '.join([*FORMATS, 'custom'])}, got {name!r}")
    policy = BudgetPolicy(**{POLICY_FIELDS[k]: v for k, v in values.items()})  # validates the combination
    return policy, fmt
