"""``s1kit curate``: an s1K-style training set from question pools (docs/curation.md)."""

from pathlib import Path
from typing import List, Optional

import typer

from ..budget import BudgetPolicy
from ..curation_defaults import DEFAULT_EVAL_SETS, DEFAULT_TOKENIZER, MIN_OVERLAP, REFERENCE_POLICY, TEACHER_POLICY
from ..formats import get_format
from . import options as opt
from .app import command, require_extra
from .console import progress_bar
from .engine import EngineChoice


@command(epilog="Example: s1kit curate --pool math-train --size 100 --seed 0 --out runs/s1k/s1k.jsonl "
                "--domain-classifier field:type")
def curate(
    pool: List[str] = typer.Option(..., help="Pool: .jsonl/.json/.csv/.parquet file, HF id (org/name[:split]), "
                                             "or offline math-train / gsm8k-train (repeatable)."),
    out: Path = typer.Option(..., help="Output JSONL in the s1K schema; the report goes beside it."),
    question_field: Optional[str] = typer.Option(None, help="Field of a pool row that holds the question. "
                                                            "[default: question|problem|Question|Problem]"),
    pool_sample: Optional[int] = typer.Option(None, help="Keep N random rows of each pool (seeded by --seed), "
                                                          "for small-scale runs."),
    size: int = typer.Option(1000, help="Rows to select."),
    seed: int = typer.Option(0, help="Seed of the diversity sampling."),
    selection: str = typer.Option("s1", help="s1 (direct picks, then Algorithm 1's diversity sampling) or random "
                                             "(uniform, s1's 1K-random ablation)."),
    decontaminate: str = typer.Option(",".join(DEFAULT_EVAL_SETS), help="Evaluation sets to decontaminate against "
                                      "(benchmark names or files, comma-separated; 'none')."),
    min_overlap: float = typer.Option(MIN_OVERLAP, help="Share of an evaluation question's 8-grams a pool question "
                                                        "must repeat to count; 0 = s1's any-overlap rule."),
    reference_model: Optional[List[str]] = typer.Option(None, help="Drop questions this model solves (repeatable)."),
    reference_max_thinking: int = typer.Option(REFERENCE_POLICY.max_thinking_tokens, min=0,
                                               help="Thinking cap of the reference models."),
    teacher: Optional[str] = typer.Option(None, help="Model that writes traces for rows without one."),
    teacher_max_thinking: int = typer.Option(TEACHER_POLICY.max_thinking_tokens, min=0,
                                             help="Thinking cap of the teacher."),
    teacher_max_answer: int = typer.Option(TEACHER_POLICY.max_answer_tokens, min=1, help="Answer budget of the teacher."),
    domain_classifier: str = typer.Option("auto", help="auto (subject/type field, else keywords), keyword, "
                                                       "field:NAME or llm:MODEL."),
    trace_tokenizer: str = typer.Option(DEFAULT_TOKENIZER, help="Tokenizer that measures trace lengths."),
    solution_traces: bool = typer.Option(True, help="Use a row's solution as its trace when it has none "
                                                    "(and no teacher gave one)."),
    workdir: Optional[Path] = typer.Option(None, help="Cache of model results (resumable). [default: OUT.work]"),
    format: str = typer.Option(opt.FORMAT, "--format", help="Thinking format of the model stages: auto (each model's "
                                                           "own, from its tokenizer and chat template), s1 or r1."),
    engine_kind: opt.EngineKind = "hf",
    base_url: opt.BaseUrl = None,
    batch_size: opt.BatchSize = 16,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
) -> None:
    """Curate an s1K-style training set: quality, decontamination, difficulty, domains, diversity sampling.

    Writes OUT (s1K schema), curation_report.md/.json, domains.png and trace_lengths.png. Model stages
    cache every result in the work directory, so a killed run resumes and a rerun loads no model."""
    require_extra("curate", "pyarrow", "datasets")
    from ..curate import NamedEngine
    from ..curate import curate as run_curation

    EngineChoice("", engine_kind, base_url, dtype=dtype).check_options()  # before any stage runs
    eval_sets = [] if decontaminate.strip().lower() == "none" else [
        s.strip() for s in decontaminate.split(",") if s.strip()]
    fmt = get_format(format)
    ref_policy = BudgetPolicy(max_thinking_tokens=reference_max_thinking,
                              max_answer_tokens=REFERENCE_POLICY.max_answer_tokens)
    teacher_policy = BudgetPolicy(max_thinking_tokens=teacher_max_thinking, max_answer_tokens=teacher_max_answer)

    def engine(name: str):  # loaded on first use: a fully cached run loads no model
        choice = EngineChoice(name, engine_kind, base_url, device=device, dtype=dtype, batch_size=batch_size)
        choice.check()
        return choice.open

    chunk = max(64, 4 * batch_size)  # requests per engine call: keeps refilled batches full
    result = run_curation(
        pool, out, size=size, seed=seed, eval_sets=eval_sets, min_overlap=min_overlap,
        references=[NamedEngine(m, engine(m), chunk) for m in reference_model or []],
        teacher=NamedEngine(teacher, engine(teacher), chunk) if teacher else None, classifier=domain_classifier,
        tokenizer=trace_tokenizer, workdir=workdir, solution_traces=solution_traces,
        reference_policy=ref_policy, teacher_policy=teacher_policy, fmt=fmt, make_engine=engine,
        progress=progress_bar, selection=selection, per_pool=pool_sample, question_field=question_field)
    show_stages(result, pool, out)


def show_stages(result, pools: list[str], out: Path) -> None:
    """The rows each stage kept and dropped (with why), and the files written."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("stage", "rows in", "rows out", "dropped (why)", title=escape(f"curation of {', '.join(pools)}"))
    for s in result.stages:
        why = "; ".join(f"{r}: {n}" for r, n in sorted(s.dropped.items(), key=lambda kv: -kv[1]))
        table.add_row(s.name, f"{s.rows_in:,}", f"{s.rows_out:,}", escape(why) or "–")
    console = Console()
    console.print(table)
    for name in (out.name, "curation_report.md", "curation_report.json", "domains.png", "trace_lengths.png"):
        console.print(f"wrote {out.parent / name}", highlight=False)
