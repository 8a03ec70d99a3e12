"""Selection: direct picks, then s1's Algorithm 1 (diversity sampling favouring long traces) up to ``size``.

s1 first took a few groups whole (AIME and GPQA questions whose teacher attempt grades correct, MATH
questions with traces over 5,600 tokens), then repeated until 1,000: pick a domain uniformly at random,
rank its questions by trace length (longest first), draw one with weight 2^(-rank), remove it, and
drop domains that run empty. Everything here is seeded: the same table and seed give the same rows.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from ..data.grading import grade
from ..errors import require_int
from .difficulty import prediction
from .pool import as_table
from .stage import StageReport, Timer


@dataclass(frozen=True)
class DirectPick:
    """Rows from sources matching ``source`` that are taken whole, if graded correct and/or long enough."""

    name: str
    source: str  # regex over source_type
    graded_correct: bool = False  # the attempt must grade correct against the gold answer
    min_trace_tokens: int | None = None  # the trace must be longer than this

    def matches(self, source: str, attempt: str, gold: str, trace_tokens: int) -> bool:
        """Does a row qualify?"""
        if not re.search(self.source, source):
            return False
        if self.min_trace_tokens is not None and trace_tokens <= self.min_trace_tokens:
            return False
        if self.graded_correct:
            return bool(gold) and grade(prediction("", attempt, gold), gold)
        return True


MATH_SOURCE = r"(?i)(^|[/_-])(math|openaimath|competition_math)([/_-]|$)"
S1_DIRECT_PICKS = (
    DirectPick("graded-correct AIME/GPQA", r"(?i)aime|gpqa", graded_correct=True),
    DirectPick("MATH traces > 5,600 tokens", MATH_SOURCE, min_trace_tokens=5600),
)


def geometric_rank(rng: random.Random, n: int) -> int:
    """A rank in ``[0, n)`` drawn with weight 2^(-rank), exactly, by inverting the truncated geometric CDF."""
    total = 2.0 * (1.0 - 2.0 ** -n)  # sum of 2^-r for r < n
    u = rng.random() * total
    # The CDF up to rank r is 2(1 - 2^-(r+1)); the draw is the first rank where it exceeds u.
    return min(int(math.floor(-math.log2(1.0 - u / 2.0))), n - 1)


def diversity_sample(domains: Sequence[str], lengths: Sequence[int], keys: Sequence[str], k: int,
                     rng: random.Random) -> list[int]:
    """Algorithm 1 of s1: ``k`` row indices, drawn domain-uniformly, longest traces favoured."""
    buckets: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        buckets.setdefault(d, []).append(i)
    for rows in buckets.values():  # longest first; ties by key so input order never matters
        rows.sort(key=lambda i: (-lengths[i], keys[i]))
    live = sorted(buckets)
    picked: list[int] = []
    while len(picked) < k and live:
        d = rng.choice(live)
        rows = buckets[d]
        picked.append(rows.pop(geometric_rank(rng, len(rows))))
        if not rows:
            live.remove(d)
    return picked


def select(
    table: pa.Table, size: int = 1000, seed: int = 0, direct: Sequence[DirectPick] = S1_DIRECT_PICKS
) -> tuple[pa.Table, StageReport]:
    """``size`` rows: the direct picks (longest first if they alone exceed ``size``), then Algorithm 1."""
    require_int("size", size)
    timer = Timer()
    table = as_table(table)
    report = StageReport("select", f"direct picks, then diversity sampling to {size}")
    cols = {c: table.column(c).to_pylist() for c in ("uid", "domain", "trace_tokens", "source_type", "attempt", "answer")}
    if any(not d for d in cols["domain"]):
        raise ValueError("select needs a domain for every row: run classify_domains first")
    lengths = cols["trace_tokens"]
    chosen: list[int] = []
    per_rule: dict[str, int] = {}
    taken: set[int] = set()
    for rule in direct:
        hits = [i for i in range(table.num_rows) if i not in taken and
                rule.matches(cols["source_type"][i], cols["attempt"][i], cols["answer"][i], lengths[i])]
        per_rule[rule.name] = len(hits)
        chosen += hits
        taken.update(hits)
    if len(chosen) > size:
        chosen = sorted(chosen, key=lambda i: (-lengths[i], cols["uid"][i]))[:size]
    n_direct = len(chosen)
    rest = [i for i in range(table.num_rows) if i not in taken]
    drawn = diversity_sample([cols["domain"][i] for i in rest], [lengths[i] for i in rest],
                             [cols["uid"][i] for i in rest], size - n_direct, random.Random(seed))
    chosen += [rest[j] for j in drawn]
    if table.num_rows > len(chosen):
        report.dropped["not selected"] = table.num_rows - len(chosen)
    report.rows_in, report.rows_out = table.num_rows, len(chosen)
    report.info = {"size": size, "seed": seed, "direct_picks": n_direct, "direct_rules": per_rule,
                   "diversity_sampled": len(chosen) - n_direct}
    report.seconds = timer()
    return table.take(pa.array(chosen, type=pa.int64())), report


def select_random(table: pa.Table, size: int = 1000, seed: int = 0) -> tuple[pa.Table, StageReport]:
    """``size`` rows uniformly at random (s1's 1K-random ablation), seeded and independent of row order."""
    require_int("size", size)
    timer = Timer()
    table = as_table(table)
    report = StageReport("select", f"{size} rows uniformly at random")
    uids = table.column("uid").to_pylist()
    order = sorted(range(table.num_rows), key=lambda i: uids[i])  # input order never matters
    chosen = random.Random(seed).sample(order, min(size, len(order)))
    if table.num_rows > len(chosen):
        report.dropped["not selected"] = table.num_rows - len(chosen)
    report.rows_in, report.rows_out = table.num_rows, len(chosen)
    report.info = {"size": size, "seed": seed, "random": len(chosen)}
    report.seconds = timer()
    return table.take(pa.array(chosen, type=pa.int64())), report
