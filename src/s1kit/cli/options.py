"""Options shared by several commands, declared once: one flag name, one help text, and defaults taken from the
library (``BudgetPolicy()``, ``SamplingParams()``) so that the command line and the Python API cannot drift."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from ..budget import BudgetPolicy
from ..engines.base import SamplingParams
from ..formats import ThinkingFormat, describe_format, get_format, resolve_format

POLICY = BudgetPolicy()  # default budget fields of generate and eval
SAMPLING = SamplingParams()  # default sampling fields


class Grid(list):
    """A comma-separated list of budgets, ``none`` meaning no cap: ``"256,512,none"`` -> ``[256, 512, None]``."""


def parse_grid(text: str | Grid) -> Grid:
    """Parse a grid option; a part that is not an integer (or none) is a usage error."""
    if isinstance(text, Grid):
        return text
    out = Grid()
    for part in str(text).split(","):
        part = part.strip().lower()
        if part in ("none", "inf", "unlimited"):
            out.append(None)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not an integer (use e.g. 256,512,none)") from None
    return out


def grid_option(help: str, flag: str) -> typer.models.OptionInfo:
    """A comma-separated grid option."""
    return typer.Option(flag, parser=parse_grid, metavar="N[,N...]", help=help)


Model = Annotated[str, typer.Option(help="Bundled name, .gguf file, model dir or HF id.")]
Format = Annotated[str, typer.Option("--format", help="Thinking format: auto (from the model's tokenizer and chat "
                                                     "template: r1 where </think> is a token, else s1), s1 or r1.")]
FORMAT = "auto"  # the default --format of every command that decodes
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... [default: cuda if present]")]
Dtype = Annotated[Optional[str], typer.Option(help="float32, bfloat16 ... [default: bfloat16 on a GPU and on CPUs "
                                                   "with native bfloat16 (AVX512-BF16, AMX), else float32]")]
BatchSize = Annotated[int, typer.Option(help="Sequences decoded together.")]
EngineKind = Annotated[str, typer.Option("--engine", help="hf (transformers in this process), llamacpp (a GGUF in this "
                                         "process through llama.cpp, CPU) or remote (an OpenAI-compatible server).")]
BaseUrl = Annotated[Optional[str], typer.Option(help="Server URL for --engine remote, e.g. http://127.0.0.1:8080/v1")]
RemoteTokenizer = Annotated[Optional[str], typer.Option(
    help="Tokenizer for --engine remote (bundled name, dir, .gguf). [default: --model]")]
Concurrency = Annotated[int, typer.Option(help="Requests in flight with --engine remote.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="S1KIT_API_KEY", help="Bearer token for --engine remote.")]
VllmPlugin = Annotated[str, typer.Option(
    help="--engine remote on vLLM: on (require s1kit's logits processor: one request per sample), off (the "
         "stop-and-continue loop), auto (the processor when a probe finds it). See docs/scale-out.md.")]

# Budget forcing, one policy (generate) ...
MaxThinking = Annotated[Optional[int], typer.Option(help="Cap on thinking tokens. [default: no cap]")]
MinThinking = Annotated[int, typer.Option(help="Suppress stops before this many thinking tokens.")]
Waits = Annotated[int, typer.Option(help="Suppress the first K stops, appending a wait string.")]
# ... or a grid of policies (eval): the same flags, comma-separated
MaxThinkingGrid = Annotated[Grid, grid_option("Comma-separated thinking caps; none = no cap.", "--max-thinking")]
MinThinkingGrid = Annotated[Grid, grid_option("Comma-separated minimum thinking budgets.", "--min-thinking")]
WaitsGrid = Annotated[Grid, grid_option("Comma-separated numbers of forced Waits.", "--waits")]
WaitString = Annotated[Optional[List[str]], typer.Option(
    help=f"Wait string (repeatable, used in turn). [default: {', '.join(POLICY.wait_strings)}]")]
AnswerPrefix = Annotated[str, typer.Option(help="Forced after the answer opener at the cap.")]
MaxAnswer = Annotated[int, typer.Option(help="Token budget of the answer.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy.")]

QuestionField = Annotated[Optional[str], typer.Option(help="Question field of a local file. [default: detected]")]
AnswerField = Annotated[Optional[str], typer.Option(
    help="Answer field of a local file; a list-valued field gives several acceptable answers. [default: detected]")]
RunOut = Annotated[Path, typer.Option("--out", file_okay=False, help="Run directory (resumable; one writer at a time).")]


EarlyExitSpec = Annotated[Optional[str], typer.Option(
    "--early-exit", help="Stop thinking once probed answers settle: key=value pairs, every=N (probe every N thinking "
                         "tokens), words=Wait|Hmm (probe before these words), agree=N (exit when the last N probe "
                         "answers agree; default 2), confidence=T (or when a probe is this confident), probe=N "
                         "(probe answer tokens; default 16). E.g. every=64,agree=2")]
EarlyExitGrid = Annotated[Optional[List[str]], typer.Option(
    "--early-exit", help="An early-exit setting, repeatable (the early-exit method): key=value pairs as in "
                         "s1kit generate --early-exit, e.g. every=64,agree=2; capped at the largest --max-thinking.")]
CapGrace = Annotated[int, typer.Option(help="At the cap, think on up to N tokens to end the sentence or line first.")]


def plugin_choice(value: str) -> bool | None:
    """``--vllm-plugin`` as the remote engine's ``plugin`` argument."""
    choices = {"auto": None, "on": True, "off": False}
    if value not in choices:
        raise typer.BadParameter(f"--vllm-plugin must be auto, on or off, got {value!r}")
    return choices[value]


def wait_strings(given: list[str] | None) -> tuple[str, ...]:
    """The repeatable --wait-string, or the library's default."""
    return tuple(given) if given else POLICY.wait_strings


def format_choice(name: str) -> ThinkingFormat:
    """``--format`` as a format (``auto`` still to resolve against the model's tokenizer); an unknown name fails now,
    before a model loads."""
    return get_format(name)


def model_format(asked: ThinkingFormat, tokenizer: Any) -> ThinkingFormat:
    """The format the model runs in: ``auto`` resolved against its tokenizer and chat template."""
    return resolve_format(tokenizer, asked)


def say_format(tokenizer: Any, fmt: ThinkingFormat, asked: ThinkingFormat) -> None:
    """One line on stderr: the format that runs, and why (once per command, when it is about to run)."""
    typer.echo(describe_format(tokenizer, fmt, asked), err=True)
