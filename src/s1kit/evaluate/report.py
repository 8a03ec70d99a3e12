"""Turn a sweep's samples into ``summary.json``, ``scaling.png`` and ``report.md``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..plots import saved_figure
from .metrics import CI_METHOD, SCALING_UNIT, mcnemar_exact, method_metrics, paired_outcomes, summarize
from .sweep import METHODS, SampleStore, Setting, is_error, selected


def build_summary(records: Sequence[dict], settings: Sequence[Setting], meta: dict | None = None) -> dict:
    """Per-setting rows and per-method Control/Scaling/Performance; top level is budget forcing's."""
    by_setting: dict[str, list[dict]] = defaultdict(list)
    failed: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        (failed if is_error(r) else by_setting)[r["setting"]].append(r)
    rows, errors = [], []
    for s in settings:
        recs = by_setting.get(s.key)
        errors += [{"setting": s.key, "item_id": r["item_id"], "sample": r["sample"], "error": r["error"]}
                   for r in failed.get(s.key, [])]
        if not recs:
            continue
        row = {"setting": s.key, "method": s.method, "label": s.label, "lo": s.lo, "hi": s.hi,
               **summarize(recs, s.lo, s.hi)}
        if failed.get(s.key):  # samples of this setting that could not run (not in n)
            row["errors"] = len(failed[s.key])
        rows.append(row)
    methods = {}
    for m in METHODS:
        mrows = [r for r in rows if r["method"] == m]
        if mrows:
            methods[m] = method_metrics(mrows)
    head = methods.get("budget") or (next(iter(methods.values())) if methods else {})
    return {
        **(meta or {}),
        "settings": rows,
        "methods": methods,
        "comparisons": comparisons(rows, by_setting),
        "ci_method": CI_METHOD,
        "control": head.get("control"),
        "scaling": head.get("scaling"),
        "performance": head.get("performance"),
        "scaling_unit": SCALING_UNIT,
        "errors": errors,  # samples that could not run (their item, e.g. too long): not in any accuracy
    }


def comparisons(rows: Sequence[dict], by_setting: dict[str, list[dict]]) -> list[dict]:
    """Each method's settings in order of compute, each against the next on the samples both graded: McNemar's exact
    test (does the next budget change accuracy on the same items?)."""
    out = []
    for m in METHODS:
        mrows = sorted((r for r in rows if r["method"] == m), key=compute_tokens)
        for a, b in zip(mrows, mrows[1:]):
            first, second = paired_outcomes(by_setting[a["setting"]], by_setting[b["setting"]])
            out.append({"method": m, "first": a["setting"], "second": b["setting"], **mcnemar_exact(first, second)})
    return out


def compute_tokens(row: dict) -> float:
    """A setting's mean thinking tokens plus the probe tokens early exit spent beside them."""
    return row["mean_thinking_tokens"] + (row.get("mean_probe_tokens") or 0)


def plot_scaling(summary: dict, path: Path) -> None:
    """Accuracy against mean thinking tokens (plus probe tokens, where early exit probed), one line per method,
    95% CI bars: early exit sits beside the cap curve at the compute it spent."""
    probed = any(r.get("mean_probe_tokens") for r in summary["settings"])
    with saved_figure(path, figsize=(6.4, 4.4), dpi=120) as ax:
        for method in summary["methods"]:
            rows = sorted((r for r in summary["settings"] if r["method"] == method), key=compute_tokens)
            x = [compute_tokens(r) for r in rows]
            y = [100 * r["accuracy"] for r in rows]
            err = [[100 * (r["accuracy"] - r["ci_low"]) for r in rows],
                   [100 * (r["ci_high"] - r["accuracy"]) for r in rows]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xlabel("average thinking + probe tokens" if probed else "average thinking tokens")
        ax.set_ylabel("accuracy (%)")
        title = " · ".join(str(summary[k]) for k in ("model", "benchmark") if summary.get(k))
        ax.set_title(title or "test-time scaling")
        ax.grid(alpha=0.3)
        ax.legend()


def _fmt(x: float | None, pct: bool = False, digits: int = 1) -> str:
    if x is None or x != x:  # None or NaN
        return "–"
    return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def cell(text: object) -> str:
    """Text for a markdown table cell: a ``|`` (``words=Wait|So``) would end the cell, a newline the row."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _p(p: float) -> str:
    return "–" if p != p else "< 0.001" if p < 0.001 else f"{p:.3f}"


def methods_table(methods: dict) -> list[str]:
    """The Control / Scaling / Performance table (s1 Table 3 style) as markdown lines."""
    lines = ["| method | Control % | Scaling | Performance % | settings |", "|---|---|---|---|---|"]
    for m, v in methods.items():
        sc = "–" if v["scaling"] is None else f"{v['scaling']:.2e}"
        lines.append(f"| {cell(m)} | {_fmt(v['control'], True)} | {sc} | {_fmt(v['performance'], True)} | "
                     f"{v['settings']} |")
    return lines


def comparisons_table(pairs: Sequence[dict]) -> list[str]:
    """The paired comparisons (McNemar's exact test) as markdown lines."""
    lines = ["| method | setting | next setting | paired samples | right only under the first | right only under the "
             "next | McNemar exact p |", "|---|---|---|---|---|---|---|"]
    for c in pairs:
        lines.append(f"| {cell(c['method'])} | {cell(c['first'])} | {cell(c['second'])} | {c['pairs']} | "
                     f"{c['first_only']} | {c['second_only']} | {_p(c['p_value'])} |")
    return lines


def render_markdown(summary: dict) -> str:
    """``report.md``: settings table and the Control/Scaling/Performance table (s1 Tables 3/4 style)."""
    lines = [f"# Test-time scaling: {summary.get('model', '?')} on {summary.get('benchmark', '?')}", ""]
    if summary.get("items"):
        lines += [f"{summary['items']} items per setting.", ""]
    probed = any(r.get("mean_probe_tokens") for r in summary["settings"])
    extra = " mean probe tokens | early exit % |" if probed else ""
    lines += ["| setting | accuracy % | 95% CI (Wilson) | mean thinking | control | cap hit % | waits | n |" + extra,
              "|---|---|---|---|---|---|---|---|" + ("---|---|" if probed else "")]
    for r in summary["settings"]:
        acc = _fmt(r["accuracy"], True)
        if "majority_accuracy" in r:
            acc += f" (maj {_fmt(r['majority_accuracy'], True)})"
        more = (f" {_fmt(r.get('mean_probe_tokens'))} | {_fmt(r.get('early_exit_rate'), True, 0)} |"
                if probed else "")
        lines.append(f"| {cell(r['setting'])} | {acc} | {_fmt(r['ci_low'], True)}–{_fmt(r['ci_high'], True)} | "
                     f"{_fmt(r['mean_thinking_tokens'])} | {_fmt(r['control'], True, 0)}% | "
                     f"{_fmt(r['hit_cap_rate'], True, 0)} | {_fmt(r['mean_waits'], digits=2)} | {r['n']} |" + more)
    lines += ["", *methods_table(summary["methods"])]
    pairs = summary.get("comparisons") or []
    if pairs:
        lines += ["", "Each setting against the next of its method by compute, on the samples both graded (McNemar's "
                  "exact test: a small p says the two settings differ in accuracy on the same items):", "",
                  *comparisons_table(pairs)]
    blank = sum(r.get("graded_from_thinking", 0) for r in summary["settings"])
    if blank:
        lines += ["", f"{blank} sample(s) ended their turn while thinking, with a blank answer: their thinking was "
                  "graded instead."]
    errors = summary.get("errors") or []
    if errors:
        lines += ["", f"{len(errors)} sample(s) could not run and are left out of every accuracy above:", ""]
        lines += [f"- item `{e['item_id']}` ({e['setting']}, sample {e['sample']}): {e['error']}" for e in errors[:50]]
        if len(errors) > 50:
            lines.append(f"- ... and {len(errors) - 50} more (samples.jsonl has them all, with an `error` field)")
    lines += ["", f"Scaling is the paper's raw slope, in {SCALING_UNIT}; Control counts the settings whose mean "
              "thinking tokens stay within the bounds they asked for.", "", "![scaling](scaling.png)", ""]
    return "\n".join(lines)


def write_report(out: Path, settings: Sequence[Setting], meta: dict | None = None,
                 item_ids: Sequence[str] | None = None, samples: int | None = None) -> dict:
    """Write ``summary.json``, ``scaling.png`` and ``report.md`` for the samples in ``out`` of these settings and,
    when given, only these items and the first ``samples`` samples of each."""
    records = selected(SampleStore(out / "samples.jsonl").records.values(), settings, item_ids, samples)
    summary = build_summary(records, settings, meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_scaling(summary, out / "scaling.png")
    (out / "report.md").write_text(render_markdown(summary))
    return summary
