"""Quality: drop questions with formatting problems a text-only model cannot work with (s1 §2.2).

The s1 paper removed questions with Asymptote figures (``[asy]``, except AIME, whose figures are
described well enough in text), image links (``![Image]``), numbered sub-problems (``p1.`` ...) and
bold-marked numbers, taking the pool from 54,116 to 51,581 questions.
"""

from __future__ import annotations

import re

import pyarrow as pa

from .pool import as_table
from .stage import StageReport, Timer, keep_rows

AIME_SOURCE = re.compile(r"(?i)aime")
# (reason, pattern, exempt sources): the first rule that matches names the drop.
RULES: tuple[tuple[str, re.Pattern, re.Pattern | None], ...] = (
    ("Asymptote figure [asy]", re.compile(r"\[asy\]", re.IGNORECASE), AIME_SOURCE),
    ("image link ![Image]", re.compile(r"!\[image\]", re.IGNORECASE), None),
    ("numbered sub-problems (p1.)", re.compile(r"(?<![\w\\])p1\."), None),
    ("bold numbers (**...**)", re.compile(r"\*\*(?=.*\d)[^\s\]]*\*\*"), None),
)


def formatting_problem(question: str, source: str = "") -> str | None:
    """The reason ``question`` fails the formatting rules, or ``None``."""
    for reason, pattern, exempt in RULES:
        if pattern.search(question) and not (exempt and exempt.search(source)):
            return reason
    return None


def quality(table: pa.Table) -> tuple[pa.Table, StageReport]:
    """Drop rows whose question has a formatting problem."""
    timer = Timer()
    table = as_table(table)
    report = StageReport("quality", "formatting problems dropped")
    questions = table.column("question").to_pylist()
    sources = table.column("source_type").to_pylist()
    kept = keep_rows(table, [formatting_problem(q, s) for q, s in zip(questions, sources)], report)
    report.seconds = timer()
    return kept, report
