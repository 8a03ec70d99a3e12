"""``s1kit report``: rebuild a run's summary from its stored samples, everything read from its run record."""

from pathlib import Path

import typer

from ..data.benchmarks import is_hub_id
from ..evaluate.record import RunDir, RunInUse, previous_provenance, regrade_run
from ..evaluate.report import write_report
from .app import command
from .console import print_summary


@command(hints={RunInUse: "wait for the eval writing there to finish"},
         epilog="Example: s1kit report runs/gsm8k      or, after a grading fix: s1kit report --regrade runs/gsm8k")
def report(
    out: Path = typer.Argument(..., file_okay=False, help="A run directory written by s1kit eval."),
    regrade: bool = typer.Option(False, help="Extract and grade the stored generations again first, against the "
                                             "benchmark as the run recorded it (nothing is generated; "
                                             "samples.jsonl is rewritten)."),
) -> None:
    """Rebuild summary.json, scaling.png and report.md from a run directory's samples.

    The report covers every item, sample and setting the run record holds."""
    with RunDir(out).writer() as run:
        record = run.require()
        if regrade:
            n = regrade_run(run.path)
            typer.echo(f"regraded {n['samples']} samples: {n['changed']} changed, {n['correct']} correct")
        items = record.items  # None: a run from before run records, reported as it stands
        bench = record.benchmark if is_hub_id(record.benchmark) else Path(record.benchmark).stem
        meta = {"model": record.model, "benchmark": bench,
                "items": record.limit if items is None else len(items), "samples": record.samples}
        made = previous_provenance(run.path)
        if made is not None:  # what generated the samples (eval's summary)
            meta["provenance"] = made
        summary = write_report(run.path, record.settings, meta, items, None if items is None else record.samples)
    counts = {row["setting"]: row["n"] for row in summary["settings"]}
    for e in summary.get("errors") or []:  # a sample that could not run is done too
        counts[e["setting"]] = counts.get(e["setting"], 0) + 1
    expected = None if items is None else len(items) * record.samples
    for s in record.settings:
        if expected is not None and counts.get(s.key, 0) < expected:
            typer.echo(f"warning: {s.key} has {counts.get(s.key, 0)} of {expected} samples (the run was "
                       "interrupted: rerun its s1kit eval to finish it)", err=True)
    print_summary(summary, run.path)
