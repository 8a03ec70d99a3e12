"""Decontamination: drop pool questions that repeat another pool question or overlap an evaluation set.

As in s1, candidates are pool questions that share a lower-cased word 8-gram with an evaluation question.
s1 dropped every candidate; on MATH that also drops 12% of the train split for stock phrases such as
"where m and n are relatively prime positive integers" against MATH-500. So by default a candidate counts
only when the shared 8-grams cover half of the evaluation question's 8-grams (the confirm-after-n-gram
step of Phi-1 style decontamination); ``min_overlap=0`` restores s1's rule. Words are runs of letters and
digits, so LaTeX spacing and punctuation do not hide a copy; questions shorter than 8 words are compared
whole. Exact duplicates inside the pool keep their first row.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import pyarrow as pa

from ..curation_defaults import MIN_OVERLAP, NGRAM
from ..errors import S1KitError
from .pool import as_table
from .stage import StageReport, Timer, keep_rows

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits."""
    return _WORD.findall(text.lower())


def ngrams(ws: Sequence[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    """The word ``n``-grams of ``ws``."""
    return set(zip(*(ws[i:] for i in range(n))))


def load_eval_sets(names: Sequence[str]) -> dict[str, list[str]]:
    """Questions of evaluation sets by benchmark name (``math500``, ``gsm8k`` ...) or local file."""
    from ..data.benchmarks import load_benchmark

    out = {}
    for name in names:
        try:
            out[name] = [it.question for it in load_benchmark(name).items]
        except S1KitError as e:
            raise S1KitError(f"eval_sets {name}: {e}") from None
    return out


class EvalIndex:
    """All 8-grams (and short questions whole) of some evaluation sets, each pointing to its questions."""

    def __init__(self, eval_sets: Mapping[str, Sequence[str]], n: int = NGRAM, min_overlap: float = MIN_OVERLAP) -> None:
        if not 0 <= min_overlap <= 1:
            raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
        self.n = n
        self.min_overlap = min_overlap
        self.sizes = {name: len(qs) for name, qs in eval_sets.items()}
        self.questions: list[tuple[str, int, int]] = []  # (set name, index, number of n-grams)
        self.grams: dict[tuple[str, ...], list[int]] = {}
        self.whole: dict[tuple[str, ...], int] = {}
        for name, questions in eval_sets.items():
            for i, q in enumerate(questions):
                ws = words(q)
                gid = len(self.questions)
                grams = ngrams(ws, n)
                self.questions.append((name, i, len(grams)))
                self.whole.setdefault(tuple(ws), gid)
                for g in grams:
                    self.grams.setdefault(g, []).append(gid)

    def match(self, ws: Sequence[str]) -> tuple[str, tuple[str, int], bool] | None:
        """``(kind, (set name, index), contaminated)`` for the evaluation question ``ws`` overlaps most, if any.

        A shared n-gram makes a candidate; it counts as contaminated when the shared n-grams cover at least
        ``min_overlap`` of that evaluation question's n-grams."""
        gid = self.whole.get(tuple(ws))
        if gid is not None:
            return "exact copy", self.questions[gid][:2], True
        shared: dict[int, int] = {}
        for g in ngrams(ws, self.n):
            for gid in self.grams.get(g, ()):
                shared[gid] = shared.get(gid, 0) + 1
        if not shared:
            return None
        gid, count = max(shared.items(), key=lambda kv: (kv[1] / self.questions[kv[0]][2], -kv[0]))
        coverage = count / self.questions[gid][2]
        return f"{self.n}-gram overlap", self.questions[gid][:2], coverage >= self.min_overlap


def decontaminate(
    table: pa.Table, eval_sets: Mapping[str, Sequence[str]] | Sequence[str] = (), n: int = NGRAM,
    min_overlap: float = MIN_OVERLAP,
) -> tuple[pa.Table, StageReport]:
    """Drop exact duplicates in the pool and questions overlapping ``eval_sets`` (names or name -> questions).

    ``min_overlap=0`` is s1's rule (any shared n-gram); the default also asks that the shared n-grams cover
    half of the evaluation question, so stock phrases ("express your answer as a common fraction") do not count."""
    timer = Timer()
    table = as_table(table)
    if not isinstance(eval_sets, Mapping):
        eval_sets = load_eval_sets(list(eval_sets))
    index = EvalIndex(eval_sets, n, min_overlap)
    report = StageReport("decontaminate", f"pool duplicates and {n}-gram overlaps with evaluation sets dropped")
    seen: set[tuple[str, ...]] = set()
    hits: dict[str, set[int]] = {name: set() for name in eval_sets}
    candidates = 0
    reasons: list[str | None] = []
    for q in table.column("question").to_pylist():
        ws = tuple(words(q))
        if ws in seen:
            reasons.append("exact duplicate in pool")
            continue
        seen.add(ws)
        m = index.match(ws)
        candidates += m is not None
        if m is None or not m[2]:
            reasons.append(None)
        else:
            kind, (name, i), _ = m
            hits[name].add(i)
            reasons.append(f"{kind} with {name}")
    kept = keep_rows(table, reasons, report)
    report.info["min_overlap"] = min_overlap
    report.info["rows_sharing_an_ngram"] = candidates  # what s1's any-overlap rule would drop
    report.info["eval_sets"] = {
        name: {"questions": index.sizes[name], "questions_found_in_pool": len(hits[name]),
               "pool_rows_dropped": sum(c for r, c in report.dropped.items() if r.endswith(f" with {name}"))}
        for name in eval_sets
    }
    report.seconds = timer()
    return kept, report
