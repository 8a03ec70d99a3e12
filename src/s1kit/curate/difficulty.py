"""Difficulty: drop questions a reference model solves, then measure trace lengths (longer = harder).

s1 graded Qwen2.5-7B-Instruct and Qwen2.5-32B-Instruct against the reference solutions and kept only the
questions both got wrong (51,581 -> 24,496); trace length, counted with the Qwen tokenizer, then ranks
what is left. Here the reference models run through any engine and answers are graded by
``s1kit.data.grading`` against the gold answer; rows without a gold answer cannot be graded and stay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from ..budget import BudgetPolicy
from ..curation_defaults import DEFAULT_TOKENIZER, REFERENCE_POLICY
from ..data.grading import Grader, extract_answer
from ..engines.base import Request, SamplingParams
from ..formats import ThinkingFormat
from .generation import NamedEngine, Progress, cache_for, no_progress, run_cached
from .pool import as_table
from .stage import StageReport, Timer, keep_rows, set_column


def load_tokenizer(ref: str) -> Any:
    """Only the tokenizer of a model reference (bundled name, .gguf, directory or HF id)."""
    from ..models import resolve

    source = resolve(ref)
    if isinstance(source, Path) and (source / "tokenizer.json").is_file():
        from tokenizers import Tokenizer  # a second to load, where transformers takes several

        return Tokenizer.from_file(str(source / "tokenizer.json"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def is_numeric(gold: str) -> bool:
    """Does a gold answer look like a plain number (then the last number of an answer is taken)."""
    return bool(gold) and gold.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


def prediction(thinking: str, answer: str, gold: str) -> str:
    """The extracted answer of a completion; from the thinking when the answer part has none."""
    numeric = is_numeric(gold)
    return extract_answer(answer, numeric=numeric) or extract_answer(thinking, numeric=numeric)


def trace_lengths(traces: Sequence[Sequence[str]], tokenizer: Any, batch: int = 2048) -> list[int]:
    """Token counts of each row's first trace (the one training uses); -1 for rows without one."""
    texts = [t[0] if t else "" for t in traces]
    fast = tokenizer if hasattr(tokenizer, "encode_batch") else getattr(tokenizer, "backend_tokenizer", None)
    out: list[int] = []
    for start in range(0, len(texts), batch):
        part = texts[start : start + batch]
        if fast is not None:  # the Rust tokenizer directly: no Python-side batch objects
            out.extend(len(e.ids) for e in fast.encode_batch(part, add_special_tokens=False))
        else:
            out.extend(len(ids) for ids in tokenizer(part, add_special_tokens=False)["input_ids"])
    return [n if t else -1 for n, t in zip(out, traces)]


def difficulty(
    table: pa.Table,
    references: Sequence[NamedEngine] = (),
    grader: Grader | None = None,
    tokenizer: Any = DEFAULT_TOKENIZER,
    policy: BudgetPolicy = REFERENCE_POLICY,
    fmt: ThinkingFormat | str = "s1",
    workdir: Path | None = None,
    progress: Progress = no_progress,
) -> tuple[pa.Table, StageReport]:
    """Drop rows any reference model answers correctly; set ``trace_tokens`` with ``tokenizer`` (object or ref)."""
    timer = Timer()
    table = as_table(table)
    names = ", ".join(r.name for r in references) or "none"
    report = StageReport("difficulty", f"questions solved by a reference model ({names}) dropped")
    uids = table.column("uid").to_pylist()
    golds = table.column("answer").to_pylist()
    questions = table.column("question").to_pylist()
    gradable = [i for i, g in enumerate(golds) if g]
    reasons: list[str | None] = [None] * table.num_rows
    solved_by: dict[str, int] = {}
    own_grader = grader is None and bool(references)
    grader = grader or (Grader() if references else None)
    try:
        for ref in references:
            cache = cache_for(workdir, "difficulty", ref.name, {"policy": policy, "format": fmt})

            def record(k: int, c: Any) -> dict:
                gold = golds[gradable[k]]
                return {"prediction": prediction(c.thinking, c.answer, gold), "thinking_tokens": c.thinking_tokens}

            results = run_cached(ref, [uids[i] for i in gradable],
                                 [Request(questions[i], policy, fmt, SamplingParams()) for i in gradable],
                                 record, cache, progress, "grading difficulty")
            preds = [results[uids[i]]["prediction"] for i in gradable]
            correct = grader.grade_many(preds, [golds[i] for i in gradable], ["math"] * len(gradable))
            solved_by[ref.name] = sum(correct)
            for i, ok in zip(gradable, correct):
                if ok and reasons[i] is None:
                    reasons[i] = f"solved by {ref.name}"
    finally:
        if own_grader:
            grader.close()
    ungraded = table.num_rows - len(gradable) if references else 0
    table = keep_rows(table, reasons, report)
    report.info = {"references": [r.name for r in references], "graded": len(gradable) if references else 0,
                   "ungraded_no_gold": ungraded,
                   "solved_by": solved_by}
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        lengths = trace_lengths(table.column("thinking_trajectories").to_pylist(), tok)
        table = set_column(table, "trace_tokens", lengths)
        report.info["tokenizer"] = tokenizer if isinstance(tokenizer, str) else getattr(tok, "name_or_path", "?")
    report.seconds = timer()
    return table, report
