"""``s1kit eval``: a grid of thinking budgets over a benchmark, into a run directory that records what determines
its samples (a rerun resumes, extends or is refused) and has one writer at a time."""

from dataclasses import replace
from typing import List, Optional

import typer

from ..data.benchmarks import load_benchmark
from ..engines.base import SamplingParams
from ..evaluate.record import (RunDir, RunInUse, RunMismatch, RunNotResumable, RunRecord, previous_provenance,
                               provenance)
from ..evaluate.report import write_report
from ..evaluate.sweep import build_grid, check_samples, parse_early_exit, run_sweep
from . import options as opt
from .app import command
from .console import print_summary, progress_bar
from .engine import EngineChoice

# Run-record fields -> the flags that set them (the rest have no flag: max_tries, top_p, top_k).
RECORD_FLAGS = {"model": "--model", "engine": "--engine", "dtype": "--dtype (or --device)", "benchmark": "--benchmark",
                "question_field": "--question-field", "answer_field": "--answer-field", "split": "--split",
                "subset": "--subset", "format": "--format",
                "temperature": "--temperature", "seed": "--seed", "benchmark items": "--benchmark (its file)",
                "grader": "grader version (s1kit report --regrade grades its samples again)"}
HINTS = {RunInUse: "wait for it to finish, or pass another --out",
         RunNotResumable: "start a fresh run with another --out",
         RunMismatch: "rerun with the recorded values to resume, or pass another --out to start a fresh run"}


@command(name="eval", hints=HINTS,
         epilog="Example: s1kit eval --benchmark gsm8k --limit 50 --max-thinking 64,128,256 --out runs/gsm8k\n\n"
                "Early exit beside the caps: s1kit eval --benchmark gsm8k --max-thinking 128,512,2048 "
                "--early-exit every=64,agree=2 --early-exit words=Wait,agree=2 --out runs/ee\n\n"
                "Against a server: s1kit eval --engine remote --base-url http://127.0.0.1:8080/v1 "
                "--concurrency 8 --benchmark gsm8k --max-thinking 64,128 --out runs/gsm8k-remote")
def eval_(
    model: opt.Model = "smollm2-135m",
    benchmark: str = typer.Option("gsm8k", help="math500, math, gsm8k, champ, aime24, aime25, gpqa-diamond, "
                                                "math500-hf, gsm8k-hf, a .jsonl/.json/.csv/.parquet file, or a "
                                                "Hugging Face dataset id (ORG/NAME, e.g. HuggingFaceH4/MATH-500; "
                                                "needs the datasets package and the hub)."),
    split: Optional[str] = typer.Option(None, help="Split of a Hugging Face dataset. [default: test]"),
    subset: Optional[str] = typer.Option(None, help="Subset (config) of a Hugging Face dataset, e.g. main for "
                                                    "openai/gsm8k."),
    limit: Optional[int] = typer.Option(None, help="Use the first N items (a larger N extends a run). [default: all]"),
    max_thinking: opt.MaxThinkingGrid = "none",
    min_thinking: opt.MinThinkingGrid = str(opt.POLICY.min_thinking_tokens),
    waits: opt.WaitsGrid = str(opt.POLICY.num_waits),
    wait_string: opt.WaitString = None,
    method: Optional[List[str]] = typer.Option(None, help="budget, token-conditional, step-conditional, "
                                                          "class-conditional, rejection, early-exit (repeatable). "
                                                          "[default: budget; early-exit too with --early-exit]"),
    early_exit: opt.EarlyExitGrid = None,
    cap_grace: opt.CapGrace = opt.POLICY.cap_grace,
    samples: int = typer.Option(1, help="Samples per item (majority vote); needs --temperature > 0."),
    temperature: opt.Temperature = opt.SAMPLING.temperature,
    seed: int = typer.Option(0, help="Seed for sampling and multiple-choice shuffles."),
    max_answer: opt.MaxAnswer = opt.POLICY.max_answer_tokens,
    answer_prefix: opt.AnswerPrefix = opt.POLICY.answer_prefix,
    format: opt.Format = opt.FORMAT,
    question_field: opt.QuestionField = None,
    answer_field: opt.AnswerField = None,
    batch_size: opt.BatchSize = 16,
    out: opt.RunOut = "runs/eval",
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    engine_kind: opt.EngineKind = "hf",
    base_url: opt.BaseUrl = None,
    tokenizer: opt.RemoteTokenizer = None,
    concurrency: opt.Concurrency = 8,
    api_key: opt.ApiKey = None,
    vllm_plugin: opt.VllmPlugin = "auto",
) -> None:
    """Sweep thinking budgets over a benchmark: grade, then write summary.json, scaling.png and report.md.

    Resumable: every graded sample goes to OUT/samples.jsonl, and a rerun computes only the rest. OUT/config.json
    records everything that determines the samples: a rerun that asks for more items, samples or budgets extends
    the run; one that changes anything else (model, answer budget, format, sampling ...) is refused. The summary
    covers exactly the items and settings this command asks for."""
    methods = list(method or ["budget"])
    if early_exit and "early-exit" not in methods:
        methods.append("early-exit")
    settings = build_grid(methods=tuple(methods), max_thinking=max_thinking,
                          min_thinking=[m or 0 for m in min_thinking], waits=[w or 0 for w in waits],
                          wait_strings=opt.wait_strings(wait_string), answer_prefix=answer_prefix, max_answer=max_answer,
                          early_exit=[parse_early_exit(e) for e in early_exit or []], cap_grace=cap_grace)
    sampling = SamplingParams(temperature=temperature, seed=seed)
    check_samples(samples, sampling)
    asked_format = fmt = opt.format_choice(format)  # auto: resolved below, against the model's tokenizer
    engine = EngineChoice(model, engine_kind, base_url, tokenizer, concurrency, api_key, device, dtype, batch_size,
                          opt.plugin_choice(vllm_plugin))
    engine.check_options()
    whole = load_benchmark(benchmark, None, question_field, answer_field, seed, split, subset)
    bench = whole.first(limit)
    asked = RunRecord.create(model, benchmark, whole.items, settings, limit, samples=samples, engine=engine_kind,
                             dtype=engine.precision(), question_field=question_field, answer_field=answer_field,
                             split=split, subset=subset, format=fmt.name, sampling=sampling)
    with RunDir(out).writer() as run:
        def extend(asked: RunRecord) -> RunRecord:
            try:
                return run.extend(asked, whole.items)
            except RunMismatch as e:
                raise RunMismatch(e.path, [(RECORD_FLAGS.get(k, k), old, new) for k, old, new in e.differences]) from None

        if fmt.name == "auto":  # every other field first: a run of another model is refused as such
            try:
                extend(asked)
            except RunMismatch as e:
                if any(k != "--format" for k, _, _ in e.differences):
                    raise
            engine.check_model()
            from ..engines.remote import load_tokenizer  # the tokenizer alone: the model loads only if samples are due

            fmt = opt.model_format(fmt, load_tokenizer(tokenizer if tokenizer is not None else model))
            asked = replace(asked, format=fmt.name)
        record = extend(asked)  # with the format that runs, not "auto"
        engine.check_model()  # after the record: a run of another model is refused as such
        said: list = []

        def open_engine():  # only when samples are missing; the record is saved once a model is ready
            loaded = engine.open()
            run.write(record)
            opt.say_format(loaded.tokenizer, fmt, asked_format)
            said.append(loaded)
            return loaded

        # Several batches per engine call: the fast path refills finished slots from the rest.
        chunk = concurrency * 2 if engine_kind == "remote" else batch_size * 4
        tally = {"n": 0, "ok": 0}
        with progress_bar(len(settings) * len(bench.items) * samples, "evaluating") as advance:
            def on_sample(rec: dict) -> None:
                if "error" in rec:  # an item that cannot run: stored as such, not graded
                    advance(1)
                    return
                tally["n"] += 1
                tally["ok"] += rec["correct"]
                advance(1, f"evaluating · acc {tally['ok'] / tally['n']:.1%}")

            run_sweep(open_engine, bench, settings, run.path, fmt, samples, sampling, chunk=chunk, on_sample=on_sample)
        run.write(record)
        if not said:
            typer.echo(f"format {fmt.name}", err=True)
        made = provenance(model, said[0] if said else None, previous_provenance(run.path))
        summary = write_report(run.path, settings, {"model": model, "benchmark": bench.name, "items": len(bench.items),
                                                    "samples": samples, "provenance": made},
                               [it.id for it in bench.items], samples)
    print_summary(summary, run.path)

