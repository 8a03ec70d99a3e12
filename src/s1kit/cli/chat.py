"""``s1kit chat``: a terminal chat with a thinking budget (``s1kit.chat``)."""

from typing import Optional

import typer

from ..budget import BudgetPolicy
from ..engines.base import SamplingParams
from . import options as opt
from .app import command
from .engine import EngineChoice


@command(epilog="Example: s1kit chat --model qwen2.5-coder-0.5b --max-thinking 256   then type a question; "
                "/budget 64, /waits 2, /format r1 between turns; Ctrl-C stops an answer, Ctrl-D leaves. "
                "--engine auto (the default) runs a bundled or .gguf model in llama.cpp on the CPU when "
                "llama-cpp-python is installed, else transformers")
def chat(
    model: opt.Model = "smollm2-135m",
    max_thinking: Optional[int] = typer.Option(256, help="Cap on thinking tokens (/budget N|none to change)."),
    min_thinking: opt.MinThinking = opt.POLICY.min_thinking_tokens,
    waits: opt.Waits = opt.POLICY.num_waits,
    max_answer: opt.MaxAnswer = opt.POLICY.max_answer_tokens,
    format: opt.Format = opt.FORMAT,
    temperature: opt.Temperature = opt.SAMPLING.temperature,
    system: Optional[str] = typer.Option(None, help="System prompt."),
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    engine_kind: str = typer.Option("auto", "--engine", help="auto, hf, llamacpp or remote (see generate --help); "
                                    "auto: llamacpp for a GGUF model on the CPU when it is installed, else hf."),
    base_url: opt.BaseUrl = None,
) -> None:
    """Chat in the terminal with a thinking budget: the thinking streams dimmed, then the answer."""
    from rich.console import Console

    from ..chat import ChatSession, run_chat

    policy = BudgetPolicy(max_thinking_tokens=max_thinking, min_thinking_tokens=min_thinking, num_waits=waits,
                          max_answer_tokens=max_answer)
    asked = opt.format_choice(format)
    sampling = SamplingParams(temperature=temperature)
    why = None
    if engine_kind == "auto":
        from .engine import auto_engine

        engine_kind, why = auto_engine(model, device, dtype)
    choice = EngineChoice(model, kind=engine_kind, base_url=base_url, device=device, dtype=dtype, batch_size=1)
    choice.check()  # a bad option is one error: line, before anything else is said
    if why is not None:
        Console(stderr=True).print(f"engine {engine_kind} (auto: {why})", style="dim", markup=False)
    Console(stderr=True).print(f"loading {model} ...", style="dim", markup=False)
    engine = choice.open()
    session_format = opt.model_format(asked, engine.tokenizer)
    opt.say_format(engine.tokenizer, session_format, asked)
    run_chat(ChatSession(engine, policy, session_format, sampling, system), Console(highlight=False))
