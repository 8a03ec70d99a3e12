"""``s1kit generate``: budget-forced completions for prompts on the command line or in a JSONL file."""

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..budget import BudgetPolicy
from ..engines.base import Request, SamplingParams
from ..errors import S1KitError
from ..data.files import iter_jsonl
from ..evaluate.sweep import CANNOT_RUN, cannot_run, parse_early_exit
from ..formats import ThinkingFormat, as_messages, get_format
from . import options as opt
from .app import command
from .console import progress_bar
from .engine import EngineChoice


@command(epilog='Example: s1kit generate --max-thinking 64 --waits 1 "What is 17*23?"\n\n'
                'Early exit: s1kit generate --max-thinking 1024 --early-exit every=64,agree=2 "What is 17*23?"\n\n'
                'Against a server: s1kit generate --engine remote --base-url http://127.0.0.1:8080/v1 "What is 17*23?"')
def generate(
    prompts: Optional[List[str]] = typer.Argument(None, help="Prompts (user messages)."),
    model: opt.Model = "smollm2-135m",
    format: opt.Format = opt.FORMAT,
    think_open: Optional[str] = typer.Option(None, help="Custom format: text that opens thinking."),
    stop_token: Optional[List[str]] = typer.Option(None, help="Custom format: a token that ends thinking (repeatable)."),
    answer_open: Optional[str] = typer.Option(None, help="Custom format: the answer opener."),
    max_thinking: opt.MaxThinking = opt.POLICY.max_thinking_tokens,
    min_thinking: opt.MinThinking = opt.POLICY.min_thinking_tokens,
    waits: opt.Waits = opt.POLICY.num_waits,
    wait_string: opt.WaitString = None,
    answer_prefix: opt.AnswerPrefix = opt.POLICY.answer_prefix,
    max_answer: opt.MaxAnswer = opt.POLICY.max_answer_tokens,
    early_exit: opt.EarlyExitSpec = None,
    cap_grace: opt.CapGrace = opt.POLICY.cap_grace,
    temperature: opt.Temperature = opt.SAMPLING.temperature,
    top_p: float = typer.Option(opt.SAMPLING.top_p, help="Nucleus sampling mass."),
    top_k: int = typer.Option(opt.SAMPLING.top_k, help="Sample among the K likeliest tokens; 0 = all."),
    seed: Optional[int] = typer.Option(opt.SAMPLING.seed, help="Seed of sampling."),
    n: int = typer.Option(opt.SAMPLING.n, help="Samples per prompt."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    input: Optional[Path] = typer.Option(None, "--input", help="JSONL file of prompts."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per completion."),
    batch_size: opt.BatchSize = 32,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    engine_kind: opt.EngineKind = "hf",
    base_url: opt.BaseUrl = None,
    tokenizer: opt.RemoteTokenizer = None,
    concurrency: opt.Concurrency = 8,
    api_key: opt.ApiKey = None,
    vllm_plugin: opt.VllmPlugin = "auto",
) -> None:
    """Generate with budget forcing: cap thinking, force a minimum, or extend it with "Wait"."""
    policy = BudgetPolicy(max_thinking_tokens=max_thinking, min_thinking_tokens=min_thinking, num_waits=waits,
                          wait_strings=opt.wait_strings(wait_string), answer_prefix=answer_prefix,
                          max_answer_tokens=max_answer, cap_grace=cap_grace,
                          early_exit=parse_early_exit(early_exit) if early_exit else None)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, n=n)
    asked = opt.format_choice(format)
    choice = EngineChoice(model, engine_kind, base_url, tokenizer, concurrency, api_key, device, dtype, batch_size,
                          opt.plugin_choice(vllm_plugin))
    choice.check_options()
    items = [(f"prompt {i}", p) for i, p in enumerate(prompts or [], 1)] + (sourced_prompts(input) if input else [])
    if not items:
        raise S1KitError("no prompt given (pass PROMPT arguments or --input FILE.jsonl)")
    for _, p in items:
        as_messages(p, system)  # fail on empty prompts before loading a model
    engine = choice.open()
    base = opt.model_format(asked, engine.tokenizer)
    fmt = build_format(base, think_open, stop_token, answer_open)
    requests = [Request(p, policy, fmt, sampling, system) for _, p in items]
    for (where, _), r in zip(items, requests):
        try:
            engine.prepare(r)  # validates prompt and format before any decoding
        except CANNOT_RUN as e:  # too long, or a chat template that refuses the messages: name the prompt
            raise S1KitError(f"{where}: {cannot_run(e)}" if input else cannot_run(e)) from None
    opt.say_format(engine.tokenizer, fmt, asked if fmt is base else fmt)
    with progress_bar(len(requests) * n, "generating") as advance:
        completions = engine.generate(requests, on_progress=advance)
    for c in completions:
        if json_out:
            typer.echo(json.dumps(c.to_dict(), ensure_ascii=False))
        else:
            show(c)


def build_format(fmt: str | ThinkingFormat, think_open: str | None, stop_tokens: list[str] | None,
                 answer_open: str | None) -> ThinkingFormat:
    """A preset, or a custom format when any delimiter is given (the rest taken from the preset)."""
    base = get_format(fmt)
    if think_open is None and not stop_tokens and answer_open is None:
        return base
    return ThinkingFormat(
        name="custom",
        think_open=base.think_open if think_open is None else think_open,
        stop_tokens=tuple(stop_tokens) if stop_tokens else base.stop_tokens,
        answer_open=base.answer_open if answer_open is None else answer_open,
        end_tokens=base.end_tokens,
    )


def read_prompts(path: Path) -> list:
    """Prompts from a JSONL file: each line has ``prompt`` (text), ``messages`` (a list of ``{"role", "content"}``
    objects with text values), ``question`` or ``problem``; ``S1KitError`` naming the file and line otherwise."""
    return [p for _, p in sourced_prompts(path)]


def sourced_prompts(path: Path) -> list[tuple[str, str | list[dict[str, str]]]]:
    """``read_prompts`` with each prompt's ``file:line``."""
    if not path.is_file():
        raise S1KitError(f"{path}: no such file")
    prompts = []
    for n, rec, error in iter_jsonl(path):
        if error:
            raise S1KitError(f"{path}:{n}: {error}")
        if not isinstance(rec, dict):
            raise S1KitError(f"{path}:{n}: expected a JSON object, got {_kind(rec)}")
        key = next((k for k in ("messages", "prompt", "question", "problem") if k in rec), None)
        if key is None:
            raise S1KitError(f"{path}:{n}: no 'prompt', 'messages', 'question' or 'problem' field")
        prompts.append((f"{path}:{n}", _prompt(rec[key], key, f"{path}:{n}")))
    if not prompts:
        raise S1KitError(f"{path}: no prompts")
    return prompts


ROLES = ("system", "user", "assistant")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text_ok(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")  # a lone surrogate ("\ud800" in the JSON) no tokenizer takes
    except UnicodeEncodeError:
        return False
    return True


def _prompt(value: object, key: str, where: str) -> str | list[dict[str, str]]:
    """One record's prompt, checked: text, or a message list."""
    if key != "messages":
        if not _text_ok(value):
            raise S1KitError(f"{where}: {key!r} must be text, got {_kind(value)}")
        if not value.strip():
            raise S1KitError(f"{where}: {key!r} is empty")
        return value
    shape = "'messages' must be a list of {\"role\": \"system|user|assistant\", \"content\": TEXT} objects"
    if not isinstance(value, list) or not value:
        raise S1KitError(f"{where}: {shape}, got {_kind(value) if value != [] else 'an empty list'}")
    messages = []
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ROLES and _text_ok(m.get("content"))):
            raise S1KitError(f"{where}: {shape}, got an item {json.dumps(m, ensure_ascii=True)[:60]}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise S1KitError(f"{where}: 'messages' has no non-empty user message")
    return messages


def show(c) -> None:
    """One completion as a rich panel: thinking dimmed, answer bold, the counts underneath."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    body = Text()
    body.append(c.thinking.strip() or "(no thinking)", style="dim")
    body.append("\n\n")
    body.append(c.answer or "(empty answer)", style="bold")
    stats = (f"thinking {c.thinking_tokens} tok · answer {c.answer_tokens} tok · waits {c.waits_used}"
             f" · cap {'hit' if c.hit_cap else 'not hit'} · {c.finish_reason}")
    title = c.prompt if isinstance(c.prompt, str) else c.prompt[-1]["content"]
    Console().print(Panel(body, title=title[:80], subtitle=stats))
