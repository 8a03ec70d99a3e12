"""What commands print: progress bars on a terminal and the sweep summary table (rich)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


LOG_EVERY_S = 30.0  # without a terminal: a progress line at least this often (and at every 10%)


@contextmanager
def progress_bar(total: int, label: str) -> Iterator:
    """A rich progress bar on a terminal (stderr); elsewhere (nohup, SLURM, CI logs) a plain progress line on stderr
    every 10% or 30 s, so a long job is never silent."""
    if total <= 1:
        yield lambda n, description=None: None
        return
    if not sys.stderr.isatty():
        yield ProgressLog(total, label)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)

        def advance(n: int, description: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": description} if description else {}))

        yield advance


class ProgressLog:
    """``advance(n)`` that writes "label: done/total (pct%) elapsed, eta" to stderr at every 10% and every 30 s."""

    def __init__(self, total: int, label: str, every_s: float = LOG_EVERY_S, clock=time.monotonic) -> None:
        self.total, self.label, self.every_s, self.clock = total, label, every_s, clock
        self.done, self.start = 0, clock()
        self.last_t, self.last_decile = self.start, 0

    def __call__(self, n: int, description: str | None = None) -> None:
        self.done += n
        if description:
            self.label = description
        now, decile = self.clock(), self.done * 10 // self.total
        if decile > self.last_decile or now - self.last_t >= self.every_s or self.done >= self.total:
            self.last_t, self.last_decile = now, decile
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            print(f"{self.label}: {self.done}/{self.total} ({self.done / self.total:.0%}) "
                  f"elapsed {_clock(elapsed)}, eta {_clock(eta)}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def print_summary(summary: dict, out: Path) -> None:
    """The per-setting table and per-method Control / Scaling / Performance of a sweep's summary."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("setting", "accuracy", "95% CI", "mean thinking", "control", "n",
                  title=escape(f"{summary.get('model')} on {summary.get('benchmark')}"))
    for r in summary["settings"]:
        table.add_row(escape(r["setting"]), f"{r['accuracy']:.1%}", f"{r['ci_low']:.1%}–{r['ci_high']:.1%}",
                      f"{r['mean_thinking_tokens']:.1f}", f"{r['control']:.0%}", str(r["n"]))
    console = Console()
    console.print(table)
    for m, v in summary["methods"].items():
        sc = "–" if v["scaling"] is None else f"{v['scaling']:.2e}"
        console.print(f"{m}: Control {v['control']:.0%} · Scaling {sc} /thinking token · Performance {v['performance']:.1%}")
    errors = summary.get("errors") or []
    if errors:
        console.print(f"{len(errors)} sample(s) could not run (left out of accuracy; listed in report.md):",
                      style="yellow", markup=False, highlight=False)
        for e in errors[:5]:
            console.print(f"  item {e['item_id']} ({e['setting']}): {e['error']}", markup=False, highlight=False)
        if len(errors) > 5:
            console.print(f"  ... and {len(errors) - 5} more", markup=False, highlight=False)
    for name in ("summary.json", "scaling.png", "report.md"):
        console.print(f"wrote {out / name}", highlight=False)
