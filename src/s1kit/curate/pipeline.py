"""The s1K pipeline end to end: load -> quality -> decontaminate -> traces -> difficulty -> domains -> select,
then the s1K JSONL and the report. Model stages cache per-row results in the work directory, so a killed
run resumes where it stopped and a finished one reruns without touching a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa

from ..budget import BudgetPolicy
from ..curation_defaults import DEFAULT_EVAL_SETS, DEFAULT_TOKENIZER, MIN_OVERLAP, REFERENCE_POLICY, TEACHER_POLICY
from ..engines.base import Engine
from ..errors import require_int
from ..formats import ThinkingFormat
from .decontaminate import decontaminate, load_eval_sets
from .difficulty import difficulty
from .distill import distill, require_traces
from .domains import DomainClassifier, classify_domains, parse_classifier
from .generation import NamedEngine, Progress, no_progress
from .pool import load_pool, write_s1k
from .quality import quality
from .report import write_report
from .select import S1_DIRECT_PICKS, DirectPick, select, select_random
from .stage import StageReport

SELECTIONS = ("s1", "random")


@dataclass
class CurationResult:
    """The selected rows, every stage's report and the report summary."""

    selected: pa.Table
    stages: list[StageReport]
    summary: dict
    out: Path


def default_workdir(out: Path) -> Path:
    """``runs/s1k.jsonl`` -> ``runs/s1k.work``."""
    return out.with_name(f"{out.stem}.work")


def curate(
    pools: str | Sequence[str],
    out: Path,
    size: int = 1000,
    seed: int = 0,
    eval_sets: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_EVAL_SETS,
    min_overlap: float = MIN_OVERLAP,
    references: Sequence[NamedEngine] = (),
    teacher: NamedEngine | None = None,
    classifier: str | DomainClassifier = "auto",
    tokenizer: Any = DEFAULT_TOKENIZER,
    workdir: Path | None = None,
    solution_traces: bool = True,
    reference_policy: BudgetPolicy = REFERENCE_POLICY,
    teacher_policy: BudgetPolicy = TEACHER_POLICY,
    fmt: ThinkingFormat | str = "s1",
    direct: Sequence[DirectPick] = S1_DIRECT_PICKS,
    make_engine: Callable[[str], Engine | Callable[[], Engine]] | None = None,
    progress: Progress = no_progress,
    selection: str = "s1",
    per_pool: int | None = None,
    question_field: str | None = None,
) -> CurationResult:
    """Run the whole pipeline and write ``out`` (s1K JSONL) plus the report beside it.

    ``selection="random"`` replaces direct picks and Algorithm 1 by a uniform draw (s1's 1K-random)."""
    require_int("size", size)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else default_workdir(out)
    if isinstance(classifier, str):
        classifier = parse_classifier(classifier, make_engine)
    if not isinstance(eval_sets, Mapping):
        eval_sets = load_eval_sets(list(eval_sets))  # a misspelt name fails before any work
    stages: list[StageReport] = []

    def run(result: tuple[pa.Table, StageReport]) -> pa.Table:
        stages.append(result[1])
        return result[0]

    table = run(load_pool(pools, per_pool, seed, question_field))
    table = run(quality(table))
    table = run(decontaminate(table, eval_sets, min_overlap=min_overlap))
    if teacher is not None:
        table = run(distill(table, teacher, teacher_policy, fmt, workdir=workdir, progress=progress))
    table = run(require_traces(table, solution_traces))
    table = run(difficulty(table, references, tokenizer=tokenizer, policy=reference_policy, fmt=fmt,
                           workdir=workdir, progress=progress))
    candidates = run(classify_domains(table, classifier, workdir, progress))
    selected = run(select(candidates, size, seed, direct) if selection == "s1" else select_random(candidates, size, seed))
    write_s1k(selected, out)
    config = {
        "pools": [pools] if isinstance(pools, str) else list(pools), "out": str(out), "size": size, "seed": seed,
        "eval_sets": list(eval_sets), "min_overlap": min_overlap, "references": [e.name for e in references],
        "teacher": teacher.name if teacher else None, "classifier": classifier.name,
        "tokenizer": tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", "?"),
        "workdir": str(workdir), "solution_traces": solution_traces, "selection": selection,
        "per_pool": per_pool, "question_field": question_field,
    }
    summary = write_report(out.parent, stages, selected, candidates, config)
    return CurationResult(selected, stages, summary, out)
