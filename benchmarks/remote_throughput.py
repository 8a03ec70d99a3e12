"""Throughput of one GSM8K budget sweep: the in-process hf engine vs the remote engine on a llama.cpp server.

Same model (the bundled SmolLM2-135M: float32 transformers weights dequantized from the GGUF in-process,
the Q4_1 GGUF itself on llama.cpp), same items, settings and greedy decoding. Tokens counted are the
generated ones (thinking + forced closing + answer). The server is llama-cpp-python's, started here on a
free loopback port unless --base-url points at a running one.

The machine is shared, so the engines take turns (hf, remote, hf, remote ...) and each row is the
fastest of --reps sweeps.

    python benchmarks/remote_throughput.py [--limit 16] [--budgets 32,64] [--concurrency 8] [--reps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from s1kit import BUNDLED
from s1kit.data.benchmarks import load_benchmark
from s1kit.engines.hf import HFEngine
from s1kit.engines.remote import RemoteEngine
from s1kit.evaluate.sweep import build_grid, run_sweep
from s1kit.models import bundled_files


def start_server(gguf: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads), "--logits_all", "False",
                             "--verbose", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the llama.cpp server did not start")


def sweep(engine, bench, settings, chunk: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        t = time.perf_counter()
        records = run_sweep(engine, bench, settings, out, chunk=chunk)
        seconds = time.perf_counter() - t
    tokens = sum(r["thinking_tokens"] + r["answer_tokens"] for r in records)
    return {"samples": len(records), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "samples_s": len(records) / seconds, "accuracy": sum(r["correct"] for r in records) / len(records),
            "mean_thinking": sum(r["thinking_tokens"] for r in records) / len(records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=16, help="GSM8K test items")
    ap.add_argument("--budgets", default="32,64", help="thinking caps of the sweep")
    ap.add_argument("--max-answer", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="hf engine batch")
    ap.add_argument("--concurrency", default="8,1", help="remote requests in flight (one row per value)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    ap.add_argument("--reps", type=int, default=3, help="sweeps per engine; the fastest counts")
    ap.add_argument("--base-url", help="use a running server instead of starting llama-cpp-python's")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    bench = load_benchmark("gsm8k", limit=args.limit)
    settings = build_grid(["budget"], [int(b) for b in args.budgets.split(",")], max_answer=args.max_answer)
    hf = HFEngine.load("smollm2-135m", device="cpu", dtype="float32", batch_size=args.batch_size)
    proc, url = (None, args.base_url) if args.base_url else start_server(bundled_files(BUNDLED["smollm2-135m"])[0],
                                                                          args.threads)
    rows: dict[str, dict] = {}
    levels = [int(c) for c in args.concurrency.split(",")]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # llama-cpp-python takes text prompts only
            remote = RemoteEngine(url, "smollm2-135m", concurrency=max(levels))
        runs = [(f"hf (transformers, float32, batch {args.batch_size})", hf, args.batch_size * 2, None)]
        runs += [(f"remote (llama.cpp Q4_1, {c} in flight)", remote, c * 2, c) for c in levels]
        for _ in range(args.reps):
            for name, engine, chunk, concurrency in runs:
                remote.concurrency = concurrency or remote.concurrency
                sent = remote.completions_sent
                row = sweep(engine, bench, settings, chunk)
                row["requests"] = remote.completions_sent - sent
                if name not in rows or row["seconds"] < rows[name]["seconds"]:
                    rows[name] = row
        remote.close()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()

    table = Table("engine", "samples", "generated tokens", "seconds", "tokens/s", "samples/s", "mean thinking",
                  "accuracy", title=f"GSM8K sweep, {args.limit} items × caps {args.budgets}, max answer "
                                    f"{args.max_answer}, greedy, SmolLM2-135M on the CPU")
    for name, r in rows.items():
        table.add_row(name, str(r["samples"]), str(r["tokens"]), f"{r['seconds']:.1f}", f"{r['tok_s']:.1f}",
                      f"{r['samples_s']:.2f}", f"{r['mean_thinking']:.1f}", f"{r['accuracy']:.1%}")
    Console().print(table)
    hf_row = next(iter(rows.values()))
    for name, r in list(rows.items())[1:]:
        Console().print(f"{name}: {r['tok_s'] / hf_row['tok_s']:.2f}× the hf engine's throughput, "
                        f"{r['requests']} completion requests for {r['samples']} samples")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
