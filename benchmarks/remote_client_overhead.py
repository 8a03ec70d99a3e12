"""The stop-and-continue client's own cost: CPU seconds the remote engine spends per completion request.

Runs one GSM8K workload with many short continuations (cap 16, 2 Waits, 2 answer tokens: ~2.4 requests per
sample) against llama-cpp-python's server on a free loopback port, and measures the client process's CPU
time (the server is another process) and wall time. With ``--before FILE`` (an older ``engines/remote.py``,
e.g. ``git show a765aa6:src/s1kit/engines/remote.py > .bench/remote_a765aa6.py``) both clients take turns;
each row is the median of ``--reps`` runs.

    python benchmarks/remote_client_overhead.py --before .bench/remote_a765aa6.py --json benchmarks/results/remote_client_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from remote_throughput import start_server
from remote_vllm import load_engine_class

from s1kit import BUNDLED, BudgetPolicy, Request
from s1kit.data.benchmarks import load_benchmark
from s1kit.engines.remote import RemoteEngine
from s1kit.models import bundled_files


def run_once(engine, requests: list[Request]) -> dict:
    sent = engine.completions_sent
    cpu, wall = time.process_time(), time.perf_counter()
    engine.generate(requests)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = engine.completions_sent - sent
    return {"requests": n, "client_cpu_s": cpu, "wall_s": wall, "cpu_ms_per_request": 1000 * cpu / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (leave a core to the client)")
    ap.add_argument("--before", help="an older engines/remote.py to compare with")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    policy = BudgetPolicy(max_thinking_tokens=16, num_waits=2, max_answer_tokens=2)
    requests = [Request(item.question, policy) for item in load_benchmark("gsm8k", limit=args.limit).items]
    proc, url = start_server(bundled_files(BUNDLED["smollm2-135m"])[0], args.threads)
    engines = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # llama-cpp-python takes text prompts only
            engines["after"] = RemoteEngine(url, "smollm2-135m", concurrency=args.concurrency)
            if args.before:
                engines["before"] = load_engine_class(args.before)(url, "smollm2-135m", concurrency=args.concurrency)
        for engine in engines.values():
            engine.generate(requests[:2])  # warm-up
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for _ in range(args.reps):
            for name, engine in engines.items():
                runs[name].append(run_once(engine, requests))
        for engine in engines.values():
            engine.close()
    finally:
        proc.kill()
        proc.wait()
    rows = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    print(f"{'client':8} {'requests':>8} {'client CPU s':>12} {'ms/request':>10} {'wall s':>7}")
    for name, r in rows.items():
        print(f"{name:8} {r['requests']:8.0f} {r['client_cpu_s']:12.3f} {r['cpu_ms_per_request']:10.2f} {r['wall_s']:7.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "median": rows, "runs": runs},
                                        indent=2))


if __name__ == "__main__":
    main()
