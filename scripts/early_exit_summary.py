"""Issue 28: turn the run directories of ``scripts/early_exit_study.sh`` into ``results/early-exit/``.

    tar xzf ee.tgz -C /tmp && PYTHONPATH=src python scripts/early_exit_summary.py /tmp/ee

For every run directory (``config.json`` + ``samples.jsonl``) under the root it first rebuilds the run's own
``summary.json`` / ``report.md`` / ``scaling.png`` over every recorded setting (what ``s1kit report DIR`` does), then
writes ``results/early-exit/summary.json`` (one row per setting, the study's methods named: uncapped, cap, waits,
early-exit, grace, vote), ``results/early-exit/scaling.png`` (accuracy against thinking + probe tokens, s1's Figure
style) and copies each run's summary, report, plot, record and graded samples (without the generated text) under
``results/early-exit/runs/``.

Early-exit settings are also compared with the uncapped run item by item (``paired``): a setting cut short by the
device's time limit holds the rows that finished first, which are not a random subset of the benchmark, so its
own accuracy is not comparable with the full runs, but its difference from the uncapped run on the same items is.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

from s1kit.evaluate.record import RunDir
from s1kit.evaluate.report import write_report
from s1kit.plots import saved_figure

NAMES = {"math500": "MATH-500", "gsm8k500": "GSM8K (500 test items, seed 0)"}
KEEP = ("n", "accuracy", "ci_low", "ci_high", "mean_thinking_tokens", "mean_probe_tokens", "mean_answer_tokens",
        "hit_cap_rate", "early_exit_rate", "mean_waits", "graded_from_thinking")
GOAL_POINTS, GOAL_SAVING = 1.0, 0.30


def rebuild(run: Path) -> tuple[dict, dict]:
    """The run's record (as JSON) and its summary over every recorded setting, items and samples (``s1kit
    report``)."""
    d = RunDir(run)
    with d.writer():
        record = d.require()
        meta = {"model": record.model, "benchmark": Path(record.benchmark).stem, "items": len(record.items),
                "samples": record.samples}
        summary = write_report(run, record.settings, meta, record.items, record.samples)
    return json.loads((run / "config.json").read_text()), summary


def samples(run: Path) -> dict[str, dict[str, dict]]:
    """setting -> item -> its first sample's record."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in (run / "samples.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r["sample"] == 0:
            out[r["setting"]][r["item_id"]] = r
    return out


def classify(run_name: str, row: dict, bound: int, uncapped_key: str) -> tuple[str, str]:
    """(method, setting) of a summary row in the study's terms."""
    key, label = row["setting"], row["label"]
    if run_name.endswith("-grace"):
        return "grace", f"{label},grace=64"
    if run_name.endswith("-vote"):
        return "vote", label
    if row["method"] == "early-exit":
        return "early-exit", f"{label} (bound {bound})"
    if key == uncapped_key:
        return "uncapped", label
    if re.fullmatch(r"max=\d+", label):
        return "cap", label
    if re.fullmatch(r"max=\d+,waits=\d+", label):
        return "waits", label
    return row["method"], label


def paired(ee: dict[str, dict], base: dict[str, dict]) -> dict:
    """An early-exit setting against the uncapped run on the items both hold."""
    ids = [i for i in ee if i in base]
    n = len(ids)
    acc = sum(ee[i]["correct"] for i in ids) / n
    base_acc = sum(base[i]["correct"] for i in ids) / n
    tok = sum(ee[i]["thinking_tokens"] + ee[i].get("probe_tokens", 0) for i in ids) / n
    base_tok = sum(base[i]["thinking_tokens"] for i in ids) / n
    exited = [i for i in ids if ee[i].get("early_exit")]
    return {"n": n, "accuracy": acc, "uncapped_accuracy": base_acc, "delta_points": 100 * (acc - base_acc),
            "thinking_plus_probe_tokens": tok, "uncapped_thinking_tokens": base_tok,
            "token_saving": 1 - tok / base_tok,
            "fixed": sum(ee[i]["correct"] and not base[i]["correct"] for i in ids),
            "broke": sum(base[i]["correct"] and not ee[i]["correct"] for i in ids),
            "exited": len(exited),
            "exited_accuracy": sum(ee[i]["correct"] for i in exited) / len(exited) if exited else None,
            "exited_uncapped_accuracy": sum(base[i]["correct"] for i in exited) / len(exited) if exited else None,
            "median_exit_point": sorted(ee[i]["thinking_tokens"] for i in exited)[len(exited) // 2] if exited else None,
            "reaches_goal": 100 * (acc - base_acc) >= -GOAL_POINTS and 1 - tok / base_tok >= GOAL_SAVING}


def strip_text(run: Path, dest: Path) -> None:
    """The graded samples without the generated text, gzipped."""
    with gzip.open(dest, "wt") as f:
        for line in (run / "samples.jsonl").read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            r.pop("thinking", None)
            r.pop("answer", None)
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def plot(benchmarks: dict[str, list[dict]], path: Path) -> None:
    """One panel per benchmark: the cap curve as a line, the other methods as points (hollow: cut short)."""
    style = {"uncapped": ("*", "k"), "waits": ("s", "tab:green"), "grace": ("D", "tab:purple"),
             "vote": ("P", "tab:brown")}
    rules = sorted({r["setting"] for rows in benchmarks.values() for r in rows if r["method"] == "early-exit"})
    ee_color = dict(zip(rules, ["tab:red", "tab:orange", "tab:olive", "tab:pink", "tab:cyan"]))
    with saved_figure(path, nrows=1, ncols=len(benchmarks), figsize=(6.2 * len(benchmarks), 6.0), dpi=120) as axes:
        axes = axes if len(benchmarks) > 1 else [axes]
        for ax, (name, rows) in zip(axes, benchmarks.items()):
            caps = sorted((r for r in rows if r["method"] == "cap"), key=lambda r: r["mean_thinking_tokens"])
            x = [r["mean_thinking_tokens"] for r in caps]
            y = [100 * r["accuracy"] for r in caps]
            err = [[100 * (r["accuracy"] - r["ci_low"]) for r in caps], [100 * (r["ci_high"] - r["accuracy"]) for r in caps]]
            ax.errorbar(x, y, yerr=err, marker="o", color="tab:blue", capsize=3, label="budget forcing: cap")
            last = 0.0
            for r, xx, yy in zip(caps, x, y):
                if xx > 1.08 * last:  # no labels on top of each other
                    ax.annotate(r["setting"].replace("max=", ""), (xx, yy), textcoords="offset points",
                                xytext=(4, -11), fontsize=7, color="tab:blue")
                    last = xx
            for r in rows:
                if r["method"] == "cap":
                    continue
                xx = r["mean_thinking_tokens"] + r["mean_probe_tokens"]
                yy = 100 * r["accuracy"]
                lo, hi = yy - 100 * r["ci_low"], 100 * r["ci_high"] - yy
                full = r["complete"]
                if not full and r.get("paired"):  # cut short: the uncapped run's point moved by the paired difference
                    p, u = r["paired"], next(q for q in rows if q["method"] == "uncapped")
                    xx = u["mean_thinking_tokens"] * (1 - p["token_saving"])
                    yy = 100 * u["accuracy"] + p["delta_points"]
                if r["method"] == "early-exit":
                    marker, color = "^", ee_color.get(r["setting"], "gray")
                else:
                    marker, color = style.get(r["method"], ("x", "gray"))
                label = f"{r['method']}: {r['setting']}" + ("" if full else
                                                            f" [cut short: paired estimate from {r['n']} items]")
                ax.errorbar([xx], [yy], yerr=[[lo], [hi]], marker=marker,
                            markersize=10 if marker == "*" else 7, color=color, capsize=3, linestyle="none",
                            markerfacecolor=color if full else "none", label=label)
            ax.set_xscale("log")
            ax.set_xlabel("average thinking + probe tokens (log)")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(name)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="the unpacked /root/ee of the device machine")
    ap.add_argument("--out", type=Path, default=Path("results/early-exit"))
    ap.add_argument("--model", default="Qwen2.5-Coder-1.5B-Instruct (bundled qwen2.5-coder-1.5b: GGUF Q4_K_M, "
                                        "sha256 cc324af0..., dequantised to bf16)")
    ap.add_argument("--date", default="2026-12-02")
    args = ap.parse_args()
    env = (args.root / "env.txt").read_text().splitlines()
    device = "; ".join(line for line in env if not line.startswith(("s1kit from", "converted")))
    runs = sorted((p.parent for p in args.root.glob("*/config.json")), key=lambda r: (r.name.split("-")[0] != "math500", r.name))
    benchmarks: dict[str, list[dict]] = {}
    goal: dict[str, dict] = {}
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        record, summary = rebuild(run)
        bench = run.name.split("-")[0]
        items = len(record["items"]) * record["samples"]
        store = samples(run)
        main_store = store if run.name == bench else samples(args.root / bench)
        caps = sorted(int(m.group(1)) for k in main_store if (m := re.fullmatch(r"budget:max=(\d+)", k)))
        bound = max(c for c in caps if c <= 4096)
        uncapped_key = f"budget:max={caps[-1]}"
        rows = benchmarks.setdefault(NAMES.get(bench, bench), [])
        for s in summary["settings"]:
            method, setting = classify(run.name, s, bound, uncapped_key)
            row = {"method": method, "setting": setting, **{k: s.get(k, 0) for k in KEEP},
                   "items": items, "complete": s["n"] >= items, "run": run.name}
            row["mean_probe_tokens"] = row["mean_probe_tokens"] or 0.0
            if "majority_accuracy" in s:
                row.update(sample_accuracy=s["accuracy"], accuracy=s["majority_accuracy"],
                           mean_thinking_tokens_per_sample=s["mean_thinking_tokens"],
                           mean_thinking_tokens=s["mean_thinking_tokens"] * record["samples"])
            if method == "uncapped" and caps[-1] <= 4096:  # no run beyond the caps: the largest cap bounds it
                row["note"] = (f"thinking bounded at {caps[-1]} tokens (the study's largest cap; the same samples as "
                               f"cap max={caps[-1]}), not at the context window (32,768)")
                rows.append({**row, "method": "cap", "note": "the same samples as the uncapped row"})
            if method == "early-exit":
                row["paired"] = paired(store[s["setting"]], main_store[uncapped_key])
            rows.append(row)
        dest = args.out / "runs" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "report.md", "scaling.png", "config.json"):
            shutil.copy(run / name, dest / name)
        strip_text(run, dest / "samples.jsonl.gz")
    order = ["uncapped", "cap", "early-exit", "waits", "grace", "vote"]
    for name, rows in benchmarks.items():
        rows.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else 9, -r["mean_thinking_tokens"]))
        ee = [r for r in rows if r["method"] == "early-exit"]
        goal[name] = {"reached": any(r["paired"]["reaches_goal"] for r in ee),
                      "settings": {r["setting"]: {k: r["paired"][k] for k in ("n", "delta_points", "token_saving",
                                                                              "reaches_goal")} for r in ee}}
    out = {"model": args.model, "device": device, "date": args.date,
           "goal": {"rule": f"an early-exit setting within {GOAL_POINTS:g} point of uncapped accuracy with >= "
                            f"{GOAL_SAVING:.0%} fewer thinking + probe tokens, on the same items, on both benchmarks",
                    "reached": bool(goal) and all(g["reached"] for g in goal.values()), "per_benchmark": goal},
           "benchmarks": benchmarks}
    (args.out / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(benchmarks, args.out / "scaling.png")
    for name, rows in benchmarks.items():
        print(f"\n{name}")
        for r in rows:
            p = r.get("paired")
            extra = (f"  paired n={p['n']}: {p['delta_points']:+.1f} pt, {100 * p['token_saving']:.1f}% fewer tokens"
                     if p else "")
            print(f"  {r['method']:10s} {r['setting']:55s} {100 * r['accuracy']:5.1f}% "
                  f"({100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}) think {r['mean_thinking_tokens']:7.1f} "
                  f"probe {r['mean_probe_tokens']:5.1f} n={r['n']}{extra}")
    print("\ngoal reached:", out["goal"]["reached"])


if __name__ == "__main__":
    main()
