"""The mini-s1 results: ``summary.json``, ``scaling.png`` and ``report.md`` from a run's sweeps, curation and
training summaries (the ``report`` stage of ``mini_s1.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from s1kit.evaluate.report import _fmt, build_summary, methods_table
from s1kit.evaluate.sweep import SampleStore
from s1kit.plots import saved_figure

NAMES = {"base": "student (no fine-tuning)", "s1kit-mini": "s1kit-mini (curated 1K)", "1k-random": "1K-random"}
BENCH_NAMES = {"math500": "MATH-500", "gsm8k": "GSM8K"}


DEVICE_FILE = "device.txt"  # in the work directory: the machine that ran the stages


def device_name() -> str:
    """This machine's accelerator (or cpu)."""
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # reporting must not fail on a machine without torch's GPU bits
        return "?"


def _curation(path: Path) -> dict | None:
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    return {"stages": [{k: st[k] for k in ("name", "rows_in", "rows_out", "dropped", "seconds")} for st in s["stages"]],
            "selected": s.get("selected"), "config": s.get("config")}


def _training(path: Path, seconds: float | None) -> dict | None:
    """The training summary; ``seconds`` (every call's, from the run's timings) outranks the last call's own."""
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    d = s.get("data_summary", {})
    return {"steps": s["steps"], "train_loss": s["train_loss"], "first_loss": (s["losses"] or [None])[0],
            "last_loss": (s["losses"] or [None])[-1], "seconds": seconds or s["seconds"], "rows": d.get("rows"),
            "tokens": d.get("tokens"), "truncated": d.get("truncated"), "learning_rate": s["learning_rate"],
            "epochs": s["recipe"]["epochs"], "batch_size": s["recipe"]["batch_size"]}


def write_results(run, plan: dict, sweep_dir, host: str) -> dict:
    """Gather everything into ``run.args.results`` and return the summary."""
    a = run.args
    recorded = run.work / DEVICE_FILE
    device = recorded.read_text().strip() if recorded.is_file() else device_name()
    results: dict = {}
    for (model, bench), settings in plan.items():
        store = sweep_dir(run, model, bench) / "samples.jsonl"
        if store.is_file():
            recs = list(SampleStore(store).records.values())
            results.setdefault(bench, {})[model] = build_summary(recs, settings)
    mini = results.get("math500", {}).get("s1kit-mini", {})
    teacher, student = a.names.split(",") if a.names else (a.teacher, a.student)
    summary = {
        "title": "mini-s1: s1's recipe at 0.5B scale", "date": time.strftime("%Y-%m-%d"), "device": device,
        "host": host, "teacher": teacher, "student": student,
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "timings_s": run.timings,
        "curation": {"curated": _curation(run.curated.with_name("curation_report.json")),
                     "random": _curation(run.random.with_name("curation_report.json"))},
        "training": {m: _training(run.checkpoint(m) / "s1kit-train.json", run.timings.get(f"train {m}"))
                     for m in ("s1kit-mini", "1k-random")},
        "results": results,
        # top level: budget forcing of s1kit-mini on MATH-500 (caps and Waits), as s1's Table 3 reports
        "control": mini.get("control"), "scaling": mini.get("scaling"), "performance": mini.get("performance"),
        "scaling_unit": mini.get("scaling_unit"), "methods": mini.get("methods", {}),
    }
    out = a.results
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "scaling.png")
    (out / "report.md").write_text(markdown(summary))
    return summary


def _rows(summary: dict, bench: str, model: str) -> list[dict]:
    return summary["results"].get(bench, {}).get(model, {}).get("settings", [])


def plot(summary: dict, path: Path) -> None:
    """Accuracy against mean thinking tokens: s1kit-mini's methods per benchmark, baselines as single points."""
    benches = [b for b in BENCH_NAMES if b in summary["results"]]
    n = max(len(benches), 1)
    with saved_figure(path, ncols=n, figsize=(6.0 * n, 4.4), dpi=120, squeeze=False) as axes:
        for ax, bench in zip(axes[0], benches):
            rows = _rows(summary, bench, "s1kit-mini")
            series = {
                "budget forcing (caps)": [r for r in rows if r["method"] == "budget" and "waits" not in r["label"]],
                "budget forcing (Waits)": [r for r in rows if r["method"] == "budget" and
                                           ("waits" in r["label"] or r["hi"] == summary["setup"]["unforced_cap"])],
                "token-conditional": [r for r in rows if r["method"] == "token-conditional"],
                "rejection sampling": [r for r in rows if r["method"] == "rejection"],
            }
            for label, pts in series.items():
                pts = sorted(pts, key=lambda r: r["mean_thinking_tokens"])
                if pts:
                    ax.plot([r["mean_thinking_tokens"] for r in pts], [100 * r["accuracy"] for r in pts],
                            marker="o", label=label, linestyle="--" if "Waits" in label else "-")
            for model, marker in (("base", "s"), ("1k-random", "^")):
                for r in _rows(summary, bench, model):
                    ax.scatter([r["mean_thinking_tokens"]], [100 * r["accuracy"]], marker=marker, s=60, zorder=3,
                               label=NAMES[model] + " (no forcing)")
            ax.set_title(f"{BENCH_NAMES[bench]} · student {summary['student']}")
            ax.set_xlabel("average thinking tokens")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)


def markdown(summary: dict) -> str:
    """``report.md``: tables in the manner of s1's Tables 1-4 at this scale."""
    s = summary["setup"]
    cap = s["unforced_cap"]
    lines = [f"# {summary['title']}", "",
             f"Teacher `{summary['teacher']}`, student `{summary['student']}`; {summary['device']}, {summary['date']}. "
             f"Runs \"without forcing\" still stop at {cap} thinking tokens (a safety cap; see the cap-hit column).",
             ""]
    lines += ["## Accuracy without budget forcing (Table 1/2 style)", "",
              "| model | " + " | ".join(f"{BENCH_NAMES[b]} % | thinking" for b in BENCH_NAMES) + " |",
              "|---|" + "---|---|" * len(BENCH_NAMES)]
    for model in NAMES:
        cells = []
        for bench in BENCH_NAMES:
            r = next((r for r in _rows(summary, bench, model) if r["label"] == f"max={cap}"), None)
            cells += [f"{_fmt(r['accuracy'], True)} ({_fmt(r['ci_low'], True)}–{_fmt(r['ci_high'], True)})",
                      _fmt(r["mean_thinking_tokens"], digits=0)] if r else ["–", "–"]
        lines.append(f"| {NAMES[model]} | " + " | ".join(cells) + " |")
    lines += ["", "## s1kit-mini: every setting", "",
              "| benchmark | method | setting | accuracy % | 95% CI | mean thinking | cap hit % | waits | control % |",
              "|---|---|---|---|---|---|---|---|---|"]
    for bench in BENCH_NAMES:
        for r in _rows(summary, bench, "s1kit-mini"):
            lines.append(f"| {BENCH_NAMES[bench]} | {r['method']} | {r['label']} | {_fmt(r['accuracy'], True)} | "
                         f"{_fmt(r['ci_low'], True)}–{_fmt(r['ci_high'], True)} | {_fmt(r['mean_thinking_tokens'], digits=0)}"
                         f" | {_fmt(r['hit_cap_rate'], True, 0)} | {_fmt(r['mean_waits'], digits=2)} | "
                         f"{_fmt(r['control'], True, 0)} |")
    lines += ["", "## Control / Scaling / Performance on MATH-500 (Table 3 style)", "",
              *methods_table(summary["methods"])]
    if summary["methods"]:
        lines += ["", f"Scaling: mean slope over pairs of settings, in {summary.get('scaling_unit')}; "
                      "budget forcing's row spans the caps and the Waits."]
    else:
        lines += ["", "No MATH-500 sweep of s1kit-mini yet (run the eval stage)."]
    lines += [""]
    cur = summary["curation"]
    if cur.get("curated"):
        lines += ["## Curation (curated 1K)", "", "| stage | rows in | rows out | dropped | seconds |", "|---|---|---|---|---|"]
        for st in cur["curated"]["stages"]:
            why = "; ".join(f"{k}: {v}" for k, v in st["dropped"].items()) or "–"
            lines.append(f"| {st['name']} | {st['rows_in']:,} | {st['rows_out']:,} | {why} | {st['seconds']:.1f} |")
        lines.append("")
    lines += ["## Training (s1 recipe)", "", "| model | rows | tokens | epochs | steps | loss first → last | seconds |",
              "|---|---|---|---|---|---|---|"]
    for m, t in summary["training"].items():
        if t:
            lines.append(f"| {NAMES[m]} | {t['rows']} | {t['tokens']:,} | {t['epochs']:g} | {t['steps']} | "
                         f"{t['first_loss']:.3f} → {t['last_loss']:.3f} | {t['seconds']:.0f} |")
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in summary["timings_s"].items()]
    lines += ["", "![scaling](scaling.png)", ""]
    return "\n".join(lines)
