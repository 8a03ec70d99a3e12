"""Issue 28: turn the run directories of ``scripts/early_exit_study.sh`` into ``results/early-exit/``.

    tar xzf ee.tgz -C /tmp && PYTHONPATH=src python scripts/early_exit_summary.py /tmp/ee [--regrade-old]

Run directories (``config.json`` + ``samples.jsonl``) come from two places:

- under the root (the unpacked ``/root/ee`` of the device machine): each run's own ``summary.json`` / ``report.md``
  / ``scaling.png`` is rebuilt over every recorded setting (what ``s1kit report DIR`` does), and its summary, report,
  plot, record and graded samples (without the generated text, gzipped) are copied under ``results/early-exit/runs/``;
- already under ``results/early-exit/runs/`` and not under the root (the first run's ``math500`` and ``gsm8k500``,
  whose samples carry no generated text): read as they are, their intervals recomputed as Wilson intervals from
  their counts (their own summaries have percentile-bootstrap ones).

It writes ``results/early-exit/summary.json`` (one row per setting, the study's methods named: uncapped, cap, waits,
early-exit, grace, vote; each row says its run and the grader version that graded it) and
``results/early-exit/scaling.png`` (accuracy against thinking + probe tokens, s1's Figure style: the cap curve as a
line, the rest as points), and prints the README's tables.

Run names say what a run is: ``B`` the main sweep (caps and early exit), ``B-waits``, ``B-grace``, ``B-ee`` (early
exit alone, which supersedes the main sweep's rows of the same rule), ``B-vote`` (4 samples, majority vote: its
accuracy is the vote's, over items, and its tokens are the 4 samples' together), ``B-uN`` (thinking bounded at N:
the "uncapped" row when complete; otherwise the main sweep's largest cap is).

Settings are compared item by item (``paired``): early exit with the uncapped row (the goal), and also with the cap
at its own bound; Waits with the 0-Wait row of their run; the graceful cap with the plain cap it extends; the vote
with greedy decoding at its cap. A setting cut short by the device's time limit holds the rows that finished first,
which are not a random subset of the benchmark, so its own accuracy is not comparable with the full runs, but its
difference from another setting on the same items is.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from s1kit.evaluate.metrics import wilson_ci
from s1kit.evaluate.record import RunDir
from s1kit.evaluate.report import write_report
from s1kit.plots import saved_figure

NAMES = {"math500": "MATH-500", "gsm8k500": "GSM8K (500 test items, seed 0)"}
KEEP = ("n", "accuracy", "ci_low", "ci_high", "mean_thinking_tokens", "mean_probe_tokens", "mean_answer_tokens",
        "hit_cap_rate", "early_exit_rate", "mean_waits", "graded_from_thinking")
GOAL_POINTS, GOAL_SAVING = 1.0, 0.30
ORDER = ["uncapped", "cap", "early-exit", "waits", "grace", "vote"]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a (possibly gzipped) JSONL file; a torn last line is skipped."""
    text = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class Run:
    """One run directory: its record, its summary's setting rows and its graded samples."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path, self.name, self.fresh = path, path.name, fresh
        self.bench, _, self.kind = path.name.partition("-")
        if fresh:  # rebuild its summary over every recorded setting (s1kit report)
            d = RunDir(path)
            with d.writer():
                record = d.require()
                meta = {"model": record.model, "benchmark": Path(record.benchmark).stem, "items": len(record.items),
                        "samples": record.samples}
                self.summary = write_report(path, record.settings, meta, record.items, record.samples)
            self.records = read_jsonl(path / "samples.jsonl")
        else:
            self.summary = json.loads((path / "summary.json").read_text())
            self.records = read_jsonl(path / "samples.jsonl.gz")
        self.config = json.loads((path / "config.json").read_text())
        self.grader = self.config.get("grader")
        self.samples = self.config.get("samples", 1)
        self.items = len(self.config["items"])
        self.by_setting: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for r in self.records:
            if "error" not in r:
                self.by_setting[r["setting"]][r["item_id"]].append(r)

    def outcomes(self, setting: str) -> dict[str, tuple[bool, float]]:
        """item -> (correct, thinking + probe tokens): the first sample's; with several samples the majority vote's
        (ties: the earliest sample's answer) and the tokens of all of them."""
        out = {}
        for item, recs in self.by_setting[setting].items():
            recs = sorted(recs, key=lambda r: r["sample"])
            tokens = sum(r["thinking_tokens"] + (r.get("probe_tokens") or 0) for r in recs)
            if len(recs) == 1:
                out[item] = (bool(recs[0]["correct"]), tokens)
                continue
            counts = Counter(r["prediction"] for r in recs if r["prediction"])
            if not counts:
                out[item] = (False, tokens)
                continue
            top = max(counts.values())
            winner = next(r for r in recs if r["prediction"] and counts[r["prediction"]] == top)
            out[item] = (bool(winner["correct"]), tokens)
        return out


def paired(row: dict, run: Run, base_row: dict, base: Run) -> dict:
    """``row``'s setting against ``base_row``'s on the items both hold (complete items only for a vote)."""
    a = run.outcomes(row["key"])
    if run.samples > 1:
        a = {i: v for i, v in a.items() if len(run.by_setting[row["key"]][i]) == run.samples}
    b = base.outcomes(base_row["key"])
    ids = [i for i in a if i in b]
    n = len(ids)
    acc = sum(a[i][0] for i in ids) / n
    base_acc = sum(b[i][0] for i in ids) / n
    tok = sum(a[i][1] for i in ids) / n
    base_tok = sum(b[i][1] for i in ids) / n
    out = {"against": {"run": base.name, "setting": base_row["setting"], "method": base_row["method"],
                       "grader": base.grader},
           "n": n, "accuracy": acc, "base_accuracy": base_acc, "delta_points": 100 * (acc - base_acc),
           "tokens": tok, "base_tokens": base_tok, "token_saving": 1 - tok / base_tok,
           "fixed": sum(a[i][0] and not b[i][0] for i in ids), "broke": sum(b[i][0] and not a[i][0] for i in ids)}
    if row["method"] in ("waits", "grace"):  # where the change can act (the rest measures decoding noise)
        hit = {i: bool(rs[0]["hit_cap"]) for i, rs in base.by_setting[base_row["key"]].items()}
        acts = (lambda i: not hit[i]) if row["method"] == "waits" else (lambda i: hit[i])
        for name, group in (("acting", [i for i in ids if acts(i)]), ("not_acting", [i for i in ids if not acts(i)])):
            out[name] = {"n": len(group), "fixed": sum(a[i][0] and not b[i][0] for i in group),
                         "broke": sum(b[i][0] and not a[i][0] for i in group)}
        out["acting_means"] = ("the 0-Wait row stopped before the cap (a Wait can replace its stop)"
                               if row["method"] == "waits" else "the plain cap's row hit the cap (grace can act)")
    if row["method"] == "early-exit":
        first = {i: rs[0] for i, rs in run.by_setting[row["key"]].items()}
        exited = [i for i in ids if first[i].get("early_exit")]
        out.update(exited=len(exited),
                   exited_accuracy=sum(a[i][0] for i in exited) / len(exited) if exited else None,
                   exited_base_accuracy=sum(b[i][0] for i in exited) / len(exited) if exited else None,
                   median_exit_point=sorted(first[i]["thinking_tokens"] for i in exited)[len(exited) // 2]
                   if exited else None,
                   reaches_goal=out["delta_points"] >= -GOAL_POINTS and out["token_saving"] >= GOAL_SAVING)
    return out


def classify(run: Run, s: dict, bound: int | None) -> tuple[str, str]:
    """(method, setting) of a summary row in the study's terms (before the uncapped row is chosen)."""
    label = s["label"]
    if run.kind == "grace":
        return "grace", f"{label},grace=64"
    if run.kind == "vote":
        return "vote", f"{label},T=0.7,4 samples,majority"
    if s["method"] == "early-exit":
        return "early-exit", f"{label} (bound {bound})"
    if run.kind.startswith("u"):
        return "uncapped", label
    if run.kind == "waits":
        return "waits", label if "waits=" in label else f"{label},waits=0"
    if re.fullmatch(r"max=\d+", label):
        return "cap", label
    return s["method"], label


def make_rows(run: Run) -> list[dict]:
    caps = [s["hi"] for s in run.summary["settings"] if s["method"] == "budget" and s.get("hi")]
    bound = max(caps) if caps else next((s["hi"] for s in run.summary["settings"] if s.get("hi")), None)
    rows = []
    for s in run.summary["settings"]:
        method, setting = classify(run, s, bound)
        row = {"method": method, "setting": setting, **{k: s.get(k, 0) for k in KEEP}, "key": s["setting"],
               "cap": s.get("hi"), "items": run.items, "complete": s["n"] >= run.items * run.samples,
               "run": run.name, "grader": run.grader}
        row["mean_probe_tokens"] = row["mean_probe_tokens"] or 0.0
        if method == "uncapped":
            row["note"] = f"thinking bounded at {row['cap']} tokens, not at the context window (32,768)"
        elif method == "waits" and "waits=0" in setting:
            row["note"] = f"cap {row['cap']} with no Wait: the Waits' baseline, decoded and graded beside them"
        elif method == "vote":
            row["note"] = ("accuracy of the majority answer over items (ties: the earliest sample's), its interval over "
                           "items; mean_thinking_tokens counts all 4 samples of an item")
        if run.samples > 1:  # the vote: over items, the tokens of every sample
            votes = run.outcomes(s["setting"])
            full = [v for i, v in votes.items() if len(run.by_setting[s["setting"]][i]) == run.samples]
            lo, hi = wilson_ci([c for c, _ in full])
            row.update(sample_accuracy=s["accuracy"], sample_n=s["n"], accuracy=sum(c for c, _ in full) / len(full),
                       ci_low=lo, ci_high=hi, n=len(full), complete=len(full) >= run.items,
                       mean_thinking_tokens_per_sample=s["mean_thinking_tokens"],
                       mean_thinking_tokens=sum(t for _, t in full) / len(full))
        elif not run.fresh:  # the first run's summaries have bootstrap intervals: Wilson from the counts
            k = round(row["accuracy"] * row["n"])
            row["ci_low"], row["ci_high"] = wilson_ci([True] * k + [False] * (row["n"] - k))
        rows.append(row)
    return rows


def strip_text(run: Path, dest: Path) -> None:
    """The graded samples without the generated text (nor the rendered prompt), gzipped."""
    lines = []
    for r in read_jsonl(run / "samples.jsonl"):
        for k in ("thinking", "answer", "prompt"):
            r.pop(k, None)
        lines.append(json.dumps(r, ensure_ascii=False) + "\n")
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # the same bytes every time
        f.write("".join(lines).encode())


def regrade_check(runs: list[Run]) -> dict:
    """The first run's stored predictions compared with their golds again by this grader (extraction stays the
    first run's: its generated text is gone)."""
    from s1kit.data.grading import GRADER_VERSION, Grader

    out = {}
    with Grader() as grader:
        for run in runs:
            recs = [r for r in run.records if "error" not in r]
            pairs = sorted({(r["prediction"], json.dumps(r["gold"])) for r in recs})
            ok = grader.grade_many([p for p, _ in pairs], [json.loads(g) for _, g in pairs], ["math"] * len(pairs))
            now = dict(zip(pairs, ok))
            changed = [r for r in recs if now[(r["prediction"], json.dumps(r["gold"]))] != bool(r["correct"])]
            out[run.name] = {"grader_then": run.grader, "grader_now": GRADER_VERSION, "samples": len(recs),
                             "changed": len(changed),
                             "changed_by_setting": dict(Counter(r["setting"] for r in changed)),
                             "examples": [{k: r[k] for k in ("setting", "item_id", "prediction", "gold", "correct")}
                                          for r in changed[:5]]}
    return out


def plot(benchmarks: dict[str, list[dict]], path: Path) -> None:
    """One panel per benchmark: the cap curve as a line, the other methods as points (hollow: cut short)."""
    style = {"uncapped": ("*", "k"), "grace": ("D", "tab:purple"), "vote": ("P", "tab:brown")}
    rules = sorted({r["setting"] for rows in benchmarks.values() for r in rows if r["method"] == "early-exit"})
    ee_color = dict(zip(rules, ["tab:red", "tab:orange", "tab:olive", "tab:pink", "tab:cyan"]))
    waits_color = ["tab:gray", "tab:green", "tab:cyan", "darkgreen", "lime"]
    with saved_figure(path, nrows=1, ncols=len(benchmarks), figsize=(6.4 * len(benchmarks), 7.2), dpi=120) as axes:
        axes = axes if len(benchmarks) > 1 else [axes]
        for ax, (name, rows) in zip(axes, benchmarks.items()):
            rows = [r for r in rows if not r.get("superseded_by")]
            caps = sorted((r for r in rows if r["method"] == "cap"), key=lambda r: r["mean_thinking_tokens"])
            x = [r["mean_thinking_tokens"] for r in caps]
            y = [100 * r["accuracy"] for r in caps]
            err = [[100 * (r["accuracy"] - r["ci_low"]) for r in caps], [100 * (r["ci_high"] - r["accuracy"]) for r in caps]]
            graders = sorted({r["grader"] for r in caps})
            ax.errorbar(x, y, yerr=err, marker="o", color="tab:blue", capsize=3, label="budget forcing: cap"
                        + ("" if graders == [3] else f" [grader {', '.join(map(str, graders))}]"))
            last = 0.0
            for r, xx, yy in zip(caps, x, y):
                if xx > 1.08 * last:  # no labels on top of each other
                    ax.annotate(r["setting"].replace("max=", ""), (xx, yy), textcoords="offset points",
                                xytext=(4, -11), fontsize=7, color="tab:blue")
                    last = xx
            nwaits = 0
            for r in rows:
                if r["method"] == "cap":
                    continue
                xx = r["mean_thinking_tokens"] + r["mean_probe_tokens"]
                yy = 100 * r["accuracy"]
                lo, hi = yy - 100 * r["ci_low"], 100 * r["ci_high"] - yy
                full = r["complete"]
                p = r.get("paired_same_bound") or r.get("paired")
                base = p and next((q for q in rows if q["run"] == p["against"]["run"]
                                   and q["setting"] == p["against"]["setting"]), None)
                if not full and base:  # cut short: its baseline's point moved by the paired difference
                    xx = (base["mean_thinking_tokens"] + base["mean_probe_tokens"]) * (1 - p["token_saving"])
                    yy = 100 * base["accuracy"] + p["delta_points"]
                if r["method"] == "early-exit":
                    marker, color = "^", ee_color.get(r["setting"], "gray")
                elif r["method"] == "waits":
                    marker, color = "s", waits_color[nwaits % len(waits_color)]
                    nwaits += 1
                else:
                    marker, color = style.get(r["method"], ("x", "gray"))
                label = (f"{r['method']}: {r['setting']}" + ("" if r["grader"] == 3 else f" [grader {r['grader']}]")
                         + ("" if full else f" [cut short: paired estimate from {r['n']} items]"))
                ax.errorbar([xx], [yy], yerr=[[lo], [hi]], marker=marker,
                            markersize=11 if marker == "*" else 7, color=color, capsize=3, linestyle="none",
                            markerfacecolor=color if full else "none", label=label)
            ax.set_xscale("log")
            ax.set_xlabel("average thinking + probe tokens (log; a vote counts its 4 samples)")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(name)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6.3, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def cell(s: str) -> str:
    return s.replace("|", "\\|")


def tables(benchmarks: dict[str, list[dict]]) -> str:
    """The README's tables, one per benchmark."""
    out = []
    for name, rows in benchmarks.items():
        out += [f"**{name}**", "", "| method | setting | accuracy % (95% CI) | mean thinking | mean probe | cap hit % | "
                "exit % | n | grader | item by item |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("superseded_by"):
                continue
            vs = "; ".join(f"vs {p['against']['setting']} ({p['against']['run']}): {p['delta_points']:+.1f} pt, "
                           f"{-100 * p['token_saving']:+.0f}% tokens, fixes {p['fixed']}, breaks {p['broke']}"
                           for p in (r.get("paired"), r.get("paired_same_bound")) if p)
            n = str(r["n"]) if r["complete"] else f"{r['n']} of {r['items']} (cut short)"
            ee = pct(r.get("early_exit_rate")) if r["method"] == "early-exit" else ""
            out.append(f"| {r['method']} | {cell(r['setting'].replace(',probe=16 (bound 4096)', ''))} | "
                       f"{pct(r['accuracy'])} ({pct(r['ci_low'])}–{pct(r['ci_high'])}) | "
                       f"{r['mean_thinking_tokens']:.0f} | {r['mean_probe_tokens']:.0f} | {pct(r['hit_cap_rate'])} | "
                       f"{ee} | {n} | {r['grader']} | {cell(vs)} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="the unpacked /root/ee of the device machine")
    ap.add_argument("--out", type=Path, default=Path("results/early-exit"))
    ap.add_argument("--model", default="Qwen2.5-Coder-1.5B-Instruct (bundled qwen2.5-coder-1.5b: GGUF Q4_K_M, "
                                        "sha256 cc324af0..., dequantised to bf16)")
    ap.add_argument("--date", default="2026-12-02")
    ap.add_argument("--regrade-old", action="store_true",
                    help="compare the stored predictions of runs graded by an older grader again (into checks)")
    args = ap.parse_args()
    env = (args.root / "env.txt").read_text().splitlines()
    device = "; ".join(line for line in env if not line.startswith(("s1kit from", "converted")))
    fresh = {p.parent.name: p.parent for p in args.root.glob("*/config.json")}
    kept = {p.parent.name: p.parent for p in (args.out / "runs").glob("*/config.json") if p.parent.name not in fresh}
    order = lambda name: (name.split("-")[0] != "math500", "-" in name, name)  # noqa: E731
    runs = [Run(path, name in fresh) for name, path in sorted({**fresh, **kept}.items(), key=lambda kv: order(kv[0]))]
    by_name = {r.name: r for r in runs}
    benchmarks: dict[str, list[dict]] = {}
    goal: dict[str, dict] = {}
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    for bench in dict.fromkeys(r.bench for r in runs):
        brs = [r for r in runs if r.bench == bench]
        rows = [row for r in brs for row in make_rows(r)]
        run_of = {row["run"]: by_name[row["run"]] for row in rows}
        # The uncapped row: a complete B-uN run, else the main sweep's largest cap (the same samples as that cap).
        if not any(r["method"] == "uncapped" and r["complete"] for r in rows):
            for r in rows:
                if r["method"] == "uncapped":
                    r["method"], r["note"] = "cap", "thinking bounded at this cap only (cut short: not the uncapped row)"
            main_caps = [r for r in rows if r["method"] == "cap" and r["run"] == bench]
            top = max(main_caps, key=lambda r: r["cap"])
            rows.append({**top, "method": "uncapped", "note": (
                f"thinking bounded at {top['cap']} tokens (the study's largest cap; the same samples as cap "
                f"max={top['cap']}), not at the context window (32,768)")})
            top["note"] = "the same samples as the uncapped row"
        uncapped = next(r for r in rows if r["method"] == "uncapped")
        # Early-exit rules rerun whole in B-ee supersede the main sweep's rows of the same rule.
        done_ee = {r["setting"] for r in rows if r["method"] == "early-exit" and r["run"] == f"{bench}-ee"}
        for r in rows:
            if r["method"] == "early-exit" and r["run"] == bench and r["setting"] in done_ee:
                r["superseded_by"] = f"{bench}-ee"

        def find(method: str, setting: str, prefer: tuple[str, ...]) -> dict | None:
            found = [r for r in rows if r["method"] == method and r["setting"] == setting]
            found.sort(key=lambda r: prefer.index(r["run"]) if r["run"] in prefer else 9)
            return found[0] if found else None

        for r in rows:
            run = run_of[r["run"]]
            if r["method"] == "early-exit":
                r["paired"] = paired(r, run, uncapped, run_of[uncapped["run"]])
                same = find("cap", f"max={r['cap']}", (bench,))
                if same is not None and (same["run"], same["key"]) != (uncapped["run"], uncapped["key"]):
                    r["paired_same_bound"] = paired(r, run, same, run_of[same["run"]])
            elif r["method"] == "waits" and "waits=0" not in r["setting"]:
                base = next(q for q in rows if q["run"] == r["run"] and "waits=0" in q["setting"])
                r["paired"] = paired(r, run, base, run)
            elif r["method"] in ("grace", "vote"):
                cap = f"max={r['cap']}"
                base = find("waits", f"{cap},waits=0", (f"{bench}-waits",)) or find("cap", cap, (bench,))
                if base is not None:
                    r["paired"] = paired(r, run, base, run_of[base["run"]])
        # The 0-Wait row is the main sweep's cap again, by this code and grader: the same item by item?
        checks = {}
        for r in rows:
            if r["method"] == "waits" and "waits=0" in r["setting"]:
                old = find("cap", r["setting"].replace(",waits=0", ""), (bench,))
                if old is not None and old["run"] == bench:
                    a, b = run_of[r["run"]], run_of[bench]
                    ra = {i: v[0] for i, v in a.by_setting[r["key"]].items()}
                    rb = {i: v[0] for i, v in b.by_setting[old["key"]].items()}
                    ids = [i for i in ra if i in rb]
                    checks["rerun_of_main_cap"] = {
                        "setting": old["setting"], "runs": [bench, r["run"]], "graders": [b.grader, a.grader],
                        "items": len(ids), "accuracy": [old["accuracy"], r["accuracy"]],
                        "same_prediction": sum(ra[i]["prediction"] == rb[i]["prediction"] for i in ids),
                        "same_thinking_tokens": sum(ra[i]["thinking_tokens"] == rb[i]["thinking_tokens"] for i in ids),
                        "same_grade": sum(bool(ra[i]["correct"]) == bool(rb[i]["correct"]) for i in ids),
                        "right_only_first": sum(bool(rb[i]["correct"]) and not ra[i]["correct"] for i in ids),
                        "right_only_rerun": sum(bool(ra[i]["correct"]) and not rb[i]["correct"] for i in ids)}
        rows.sort(key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else 9,
                                 r["setting"] if r["method"] == "waits" else "", -r["mean_thinking_tokens"]))
        cap_keys = {id(r): r.pop("key") for r in rows}
        name = NAMES.get(bench, bench)
        benchmarks[name] = rows
        ee = [r for r in rows if r["method"] == "early-exit" and not r.get("superseded_by")]
        keys = ("n", "delta_points", "token_saving", "reaches_goal")
        goal[name] = {"reached": any(r["paired"]["reaches_goal"] for r in ee),
                      "against": f"{uncapped['setting']} ({uncapped['run']}, grader {uncapped['grader']})",
                      "reached_at_equal_bound": any(r.get("paired_same_bound", r["paired"])["reaches_goal"]
                                                    for r in ee),
                      "settings": {r["setting"]: {**{k: r["paired"][k] for k in keys}, "same_bound": {
                          "against": r["paired_same_bound"]["against"],
                          **{k: r["paired_same_bound"][k] for k in keys}} if "paired_same_bound" in r else None}
                                   for r in ee}}
        bound_cap = next((r["paired_same_bound"]["against"] for r in ee if "paired_same_bound" in r), None)
        if bound_cap is not None:  # what the early-exit rows' bound alone does against the uncapped row
            cap_row = next(q for q in rows if q["run"] == bound_cap["run"] and q["setting"] == bound_cap["setting"]
                           and q["method"] == "cap")
            alone = paired({**cap_row, "key": cap_keys[id(cap_row)]}, run_of[cap_row["run"]], {
                **uncapped, "key": cap_keys[id(uncapped)]}, run_of[uncapped["run"]])
            goal[name]["bound_alone"] = {"setting": cap_row["setting"], "run": cap_row["run"],
                                         **{k: alone[k] for k in ("n", "delta_points", "token_saving")},
                                         "reaches_goal": alone["delta_points"] >= -GOAL_POINTS
                                         and alone["token_saving"] >= GOAL_SAVING}
            g = goal[name]
            if g["reached"] and not g["reached_at_equal_bound"] and g["bound_alone"]["reaches_goal"]:
                g["note"] = (f"reached only against the uncapped row, whose bound is larger than the early-exit rows' "
                             f"({cap_row['setting']}): that cap alone reaches it too "
                             f"({alone['delta_points']:+.1f} pt, {100 * alone['token_saving']:.0f}% fewer tokens), and "
                             f"against it no early-exit rule does")
        if checks:
            goal[name]["checks"] = checks
    for run in runs:
        if not run.fresh:
            continue
        dest = args.out / "runs" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("summary.json", "report.md", "scaling.png", "config.json"):
            shutil.copy(run.path / f, dest / f)
        strip_text(run.path, dest / "samples.jsonl.gz")
    out = {"model": args.model, "device": device, "date": args.date,
           "goal": {"rule": f"an early-exit setting within {GOAL_POINTS:g} point of uncapped accuracy with >= "
                            f"{GOAL_SAVING:.0%} fewer thinking + probe tokens, on the same items, on both benchmarks",
                    "reached": bool(goal) and all(g["reached"] for g in goal.values()), "per_benchmark": goal},
           "benchmarks": benchmarks}
    if args.regrade_old:
        out["regrade_of_stored_predictions"] = regrade_check([r for r in runs if not r.fresh])
    (args.out / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(benchmarks, args.out / "scaling.png")
    print(tables(benchmarks))
    for name, g in goal.items():
        print(name, json.dumps(g.get("checks", {})))
    if args.regrade_old:
        print(json.dumps(out["regrade_of_stored_predictions"], indent=1))
    print("\ngoal reached:", out["goal"]["reached"])


if __name__ == "__main__":
    main()
