"""The Python entry points: one call from prompts to budget-forced completions."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

from .budget import BudgetPolicy
from .engines.base import Completion, Engine, Request, SamplingParams
from .formats import Messages, ThinkingFormat


ENGINES = ("hf", "llamacpp", "remote")


def check_engine(engine: str, base_url: str | None = None, **remote_options: Any) -> None:
    """``ValueError`` unless ``engine`` is one of ``ENGINES`` and the options given belong to it: a remote engine
    needs ``base_url``; an in-process one (hf, llamacpp) takes neither it nor remote options."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use hf, llamacpp or remote")
    if engine == "remote" and not base_url:
        raise ValueError("the remote engine needs base_url (e.g. http://127.0.0.1:8080/v1)")
    if engine != "remote" and base_url is not None:
        raise ValueError("base_url is only used with the remote engine")
    if engine != "remote" and remote_options:
        raise ValueError(f"{' and '.join(sorted(remote_options))} is only used with the remote engine")


def make_engine(
    model: str = "smollm2-135m",
    engine: str = "hf",
    base_url: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 32,
    max_model_len: int | None = None,
    **remote_options: Any,
) -> Engine:
    """An engine by kind: ``"hf"`` (in-process transformers), ``"llamacpp"`` (a GGUF in-process through llama.cpp,
    on the CPU) or ``"remote"`` (an OpenAI-compatible server).

    ``max_model_len`` fixes the hf fast path's cache length (a server) and bounds each llama.cpp sequence.
    ``remote_options`` (``api_key``, ``tokenizer``, ``concurrency``, ``timeout`` ...) go to ``RemoteEngine``.
    """
    check_engine(engine, base_url, **remote_options)
    if engine == "llamacpp":
        from .engines.llamacpp import LlamaCppEngine

        if device not in (None, "cpu"):
            raise ValueError(f"the llamacpp engine runs on the CPU, not {device!r}")
        if dtype is not None:
            raise ValueError("dtype is only used with the hf engine (llama.cpp computes in the GGUF's own types)")
        return LlamaCppEngine.load(model, batch_size=batch_size, max_model_len=max_model_len)
    if engine == "hf":
        from .engines.hf import HFEngine

        return HFEngine.load(model, device=device, dtype=dtype, batch_size=batch_size, max_model_len=max_model_len)
    from .engines.remote import RemoteEngine

    return RemoteEngine(base_url, model, **remote_options)


@lru_cache(maxsize=4)
def get_engine(model: str = "smollm2-135m", device: str | None = None, dtype: str | None = None,
               batch_size: int = 32) -> Engine:
    """An in-process engine for a model reference, loaded once per process."""
    from .engines.hf import HFEngine

    return HFEngine.load(model, device=device, dtype=dtype, batch_size=batch_size)


def generate(
    prompts: str | Messages | Sequence[str | Messages],
    model: str | Engine = "smollm2-135m",
    policy: BudgetPolicy | None = None,
    format: str | ThinkingFormat = "s1",
    sampling: SamplingParams | None = None,
    system: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    **policy_fields: Any,
) -> list[Completion]:
    """Budget-forced completions for one prompt or many (``n`` per prompt, in order).

    ``policy_fields`` build a ``BudgetPolicy`` when ``policy`` is not given, e.g.
    ``generate("What is 17*23?", max_thinking_tokens=64, num_waits=1)``.
    """
    if policy is None:
        policy = BudgetPolicy(**policy_fields)
    elif policy_fields:
        raise ValueError("pass either policy or policy fields, not both")
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]  # one prompt: text or a message list
    sampling = sampling or SamplingParams()
    requests = [Request(p, policy, format, sampling, system) for p in prompts]
    engine = get_engine(model) if isinstance(model, str) else model
    return engine.generate(requests, on_progress=on_progress)
