"""The curation report: ``curation_report.json`` + ``.md`` with the stage table (this run's counts beside the
s1 paper's), a domain histogram and a trace-length histogram (PNG)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from ..plots import saved_figure
from .stage import StageReport

# Rows left after each kind of stage in the s1 paper (§2), for comparison.
S1_PAPER = {"load": 59_029, "traces": 54_116, "quality": 51_581, "difficulty": 24_496, "select": 1_000}


def length_stats(lengths: Sequence[int]) -> dict:
    """Count, mean, median, min and max of trace lengths (rows without a trace ignored)."""
    xs = [x for x in lengths if x >= 0]
    if not xs:
        return {"rows": 0}
    return {"rows": len(xs), "mean": round(statistics.fmean(xs), 1), "median": statistics.median(xs),
            "min": min(xs), "max": max(xs)}


def _plot_domains(selected: Counter, candidates: Counter, path: Path) -> None:
    names = [d for d, _ in candidates.most_common()][:40]
    with saved_figure(path, figsize=(7.5, 0.28 * len(names) + 1.6), dpi=110) as ax:
        y = range(len(names))
        total_c, total_s = sum(candidates.values()) or 1, sum(selected.values()) or 1
        ax.barh([i + 0.2 for i in y], [100 * candidates[n] / total_c for n in names], 0.4, label="candidates")
        ax.barh([i - 0.2 for i in y], [100 * selected[n] / total_s for n in names], 0.4, label="selected")
        ax.set_yticks(list(y), [n[:48] for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("share of rows (%)")
        ax.set_title("domains")
        ax.legend(fontsize=8)


def _plot_lengths(selected: Sequence[int], candidates: Sequence[int], path: Path) -> None:
    with saved_figure(path, figsize=(6.4, 4.0), dpi=110) as ax:
        xs = [x for x in candidates if x >= 0]
        bins = 40 if not xs else [min(xs) + (max(xs) - min(xs) + 1) * k / 40 for k in range(41)]
        for data, label in ((xs, "candidates"), ([x for x in selected if x >= 0], "selected")):
            if data:
                ax.hist(data, bins=bins, alpha=0.55, density=True, label=f"{label} (n={len(data)})")
        ax.set_xlabel("trace length (tokens)")
        ax.set_ylabel("density")
        ax.set_title("thinking-trace lengths")
        ax.legend(fontsize=8)


def render_markdown(summary: dict) -> str:
    """``curation_report.md`` from the JSON summary."""
    cfg = summary["config"]
    lines = ["# Curation report", "",
             f"Pool: {', '.join(cfg['pools'])} · size {cfg['size']} · seed {cfg['seed']} · "
             f"output `{cfg['out']}`", "",
             "| stage | what | rows in | rows out | dropped | why | s1 paper (rows out) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        why = "; ".join(f"{r}: {n}" for r, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1])) or "–"
        dropped = s["rows_in"] - s["rows_out"]
        paper = f"{S1_PAPER[s['name']]:,}" if s["name"] in S1_PAPER else "–"
        lines.append(f"| {s['name']} | {s['description']} | {s['rows_in']:,} | {s['rows_out']:,} | {dropped:,} | "
                     f"{why} | {paper} | {s['seconds']:.2f} |")
    sel = next((s for s in summary["stages"] if s["name"] == "select"), None)
    if sel and "random" in sel["info"]:
        lines += ["", f"Selection: {sel['info']['random']} rows uniformly at random (1K-random ablation)."]
    elif sel:
        lines += ["", f"Selection: {sel['info']['direct_picks']} direct picks "
                      f"({', '.join(f'{k}: {v}' for k, v in sel['info']['direct_rules'].items()) or 'none'}), "
                      f"{sel['info']['diversity_sampled']} by diversity sampling."]
    notes = [(s["name"], s["info"]) for s in summary["stages"] if s["info"]]
    lines += ["", "## Stage details", ""]
    for name, info in notes:
        shown = {k: v for k, v in info.items() if k != "histogram"}
        lines.append(f"- **{name}**: `{json.dumps(shown, ensure_ascii=False)[:600]}`")
    lines += ["", "## Domains of the selection", "", "| domain | selected | candidates |", "|---|---|---|"]
    cand = summary["candidates"]["domains"]
    for d, n in sorted(summary["selected"]["domains"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {d} | {n} | {cand.get(d, 0)} |")
    ts, tc = summary["selected"]["trace_tokens"], summary["candidates"]["trace_tokens"]
    lines += ["", "## Trace lengths (tokens)", "", "| rows | n | mean | median | min | max |", "|---|---|---|---|---|---|"]
    for label, t in (("selected", ts), ("candidates", tc)):
        lines.append(f"| {label} | {t.get('rows', 0)} | {t.get('mean', '–')} | {t.get('median', '–')} | "
                     f"{t.get('min', '–')} | {t.get('max', '–')} |")
    lines += ["", "![domains](domains.png)", "", "![trace lengths](trace_lengths.png)", ""]
    for s in summary["stages"]:
        for reason, ex in s["examples"].items():
            if ex and reason != "not selected":
                lines.append(f"<details><summary>{s['name']} · {reason}: examples</summary>\n")
                lines += [f"- {e.replace(chr(10), ' ')}" for e in ex]
                lines.append("\n</details>")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, stages: Sequence[StageReport], selected: pa.Table, candidates: pa.Table,
                 config: dict) -> dict:
    """Write ``curation_report.json``/``.md``, ``domains.png`` and ``trace_lengths.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sel_domains = Counter(selected.column("domain").to_pylist())
    cand_domains = Counter(candidates.column("domain").to_pylist())
    sel_len = selected.column("trace_tokens").to_pylist()
    cand_len = candidates.column("trace_tokens").to_pylist()
    summary = {
        "config": config,
        "stages": [s.to_dict() for s in stages],
        "selected": {"rows": selected.num_rows, "domains": dict(sel_domains.most_common()),
                     "trace_tokens": length_stats(sel_len)},
        "candidates": {"rows": candidates.num_rows, "domains": dict(cand_domains.most_common()),
                       "trace_tokens": length_stats(cand_len)},
        "s1_paper": S1_PAPER,
    }
    _plot_domains(sel_domains, cand_domains, out_dir / "domains.png")
    _plot_lengths(sel_len, cand_len, out_dir / "trace_lengths.png")
    (out_dir / "curation_report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out_dir / "curation_report.md").write_text(render_markdown(summary))
    return summary
