"""What every curation stage returns besides the kept rows: a record of what it dropped and why."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import pyarrow as pa

EXAMPLES_PER_REASON = 3


class Timer:
    """Seconds since creation, when called."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 3)


@dataclass
class StageReport:
    """One stage's account: rows in and out, drop counts per reason (with a few examples), extra info."""

    name: str
    description: str = ""
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0

    def drop(self, reason: str, example: str = "") -> None:
        """Count one dropped row under ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if example and len(ex) < EXAMPLES_PER_REASON:
            ex.append(example[:160])

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def keep_rows(table: pa.Table, reasons: Sequence[str | None], report: StageReport) -> pa.Table:
    """The rows whose reason is ``None``; the others are counted in ``report`` (question text as example)."""
    questions = table.column("question").to_pylist() if any(reasons) else []
    keep = []
    for i, reason in enumerate(reasons):
        if reason is None:
            keep.append(i)
        else:
            report.drop(reason, questions[i])
    report.rows_in = table.num_rows
    report.rows_out = len(keep)
    return table if len(keep) == table.num_rows else table.take(pa.array(keep, type=pa.int64()))


def set_column(table: pa.Table, name: str, values: Sequence) -> pa.Table:
    """``table`` with column ``name`` replaced by ``values`` (same type)."""
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(list(values), type=table.schema.field(i).type))
