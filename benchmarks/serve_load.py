"""Load test of ``s1kit serve``: N concurrent streamed chat completions, each with its own thinking budget.

Starts the server in this process on a free loopback port (nothing leaves the machine), fires all requests
at once with httpx, reads every Server-Sent Event, and stops by itself (``--deadline``). Prints one row per
``--max-batch-size``: requests/s, generated tokens/s, time to first token and latency percentiles, and how
many requests completed (with exactly their budget of thinking tokens). A last row runs the same requests
through ``engine.generate`` directly (no HTTP, one batch), the floor the server is measured against.

    .venv/bin/python benchmarks/serve_load.py --requests 64 --budgets 8,16,24,32 --max-batch-size 64,16 --batch-window-ms 5,200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time

# Idle OpenMP threads sleep instead of spinning (as in tests/conftest.py): on a shared CPU, spinning
# threads slow decoding several-fold. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx
import torch
import uvicorn

from s1kit import BudgetPolicy, Request, SamplingParams
from s1kit.api import make_engine
from s1kit.serve import create_app

PROMPTS = ["What is 17*23?", "Name three prime numbers.", "What is the capital of France?", "Is 91 prime?",
           "Convert 3/8 to a decimal.", "What is 2 to the power 10?", "Name a colour of the rainbow.", "What is 9*12?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_stream(client: httpx.AsyncClient, url: str, model: str, i: int, budget: int, max_answer: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_answer, "temperature": 0,
            "thinking_budget": {"min_tokens": budget, "max_tokens": budget}}
    start = time.perf_counter()
    first = None
    usage = None
    done = False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("reasoning_content") for c in chunk["choices"]):
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"] if usage else None
    return {"ok": done and reasoning == budget, "latency": time.perf_counter() - start, "ttft": first,
            "tokens": usage["completion_tokens"] if usage else 0}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


async def load(base: str, model: str, n: int, budgets: list[int], max_answer: int, deadline: float) -> dict:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=deadline, limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one_stream(client, base + "/v1/chat/completions", model, i,
                                                budgets[i % len(budgets)], max_answer)) for i in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:  # bounded: whatever is left at the deadline is abandoned (and cancelled server-side)
            t.cancel()
        wall = time.perf_counter() - start
    results = [t.result() for t in done if not t.exception()]
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"requests": n, "completed": len(ok), "wall_s": wall, "req_per_s": len(ok) / wall,
            "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": percentile(ttft, 50) if ttft else float("nan"),
            "p50": percentile(lat, 50) if lat else float("nan"), "p99": percentile(lat, 99) if lat else float("nan")}


def run(args: argparse.Namespace, engine, max_batch: int, window_ms: float) -> dict:
    port = free_port()
    app = create_app(engine, args.model, max_batch_size=max_batch, batch_window_s=window_ms / 1000)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
        row = asyncio.run(load(f"http://127.0.0.1:{port}", args.model, args.requests, budgets, args.max_answer,
                               args.deadline))
        row["batches"] = app.state.batcher.stats["batches"]
        row["largest"] = app.state.batcher.stats["max_batch"]
    finally:
        server.should_exit = True
        thread.join()
    return {"max_batch_size": max_batch, "window_ms": window_ms, **row}


def direct(args: argparse.Namespace, engine) -> dict:
    """The same requests through ``engine.generate`` in one call: no HTTP, no streaming."""
    budgets = [int(b) for b in args.budgets.split(",")]
    requests = [Request(PROMPTS[i % len(PROMPTS)], BudgetPolicy(min_thinking_tokens=b, max_thinking_tokens=b,
                                                                   max_answer_tokens=args.max_answer),
                        sampling=SamplingParams(temperature=0))
                for i, b in ((i, budgets[i % len(budgets)]) for i in range(args.requests))]
    start = time.perf_counter()
    completions = engine.generate(requests)
    wall = time.perf_counter() - start
    ok = sum(c.thinking_tokens == r.policy.max_thinking_tokens for c, r in zip(completions, requests))
    return {"max_batch_size": f"{len(requests)} (engine.generate, no server)", "requests": len(requests),
            "window_ms": "–", "completed": ok, "batches": 1, "largest": len(requests), "wall_s": wall, "req_per_s": ok / wall,
            "tok_per_s": sum(len(c.token_ids) for c in completions) / wall, "ttft_p50": float("nan"),
            "p50": wall, "p99": wall}


def main() -> None:
    """Run the load for each --max-batch-size and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=64, help="concurrent streamed requests")
    p.add_argument("--budgets", default="8,16,24,32", help="thinking budgets (min = max), used in turn")
    p.add_argument("--max-answer", type=int, default=8, help="answer tokens per request")
    p.add_argument("--max-batch-size", default="64", help="comma-separated: one run each")
    p.add_argument("--batch-window-ms", default="5", help="comma-separated: one run each (with each batch size)")
    p.add_argument("--deadline", type=float, default=600, help="seconds; unfinished requests count as failed")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.max_batch_size.split(",")]
    engine = make_engine(args.model, "hf", device=args.device, dtype=args.dtype,
                         batch_size=max(sizes + [args.requests]))
    engine.generate([Request("Hi", BudgetPolicy(max_thinking_tokens=2, max_answer_tokens=2))])  # warm up
    rows = []
    for b in sizes:
        for w in (float(w) for w in args.batch_window_ms.split(",")):
            rows.append(run(args, engine, b, w))
            print(rows[-1], file=sys.stderr, flush=True)
    rows.append(direct(args, engine))
    print(f"\n{args.requests} concurrent streams, thinking budgets {args.budgets} (min = max), "
          f"answer <= {args.max_answer} tokens, greedy, model {args.model} on {engine.device}, "
          f"{torch.get_num_threads()} torch threads\n")
    print("| max batch | window ms | completed | batches (largest) | wall s | requests/s | tokens/s | TTFT p50 s "
          "| latency p50 s | latency p99 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ttft = "–" if r["ttft_p50"] != r["ttft_p50"] else f"{r['ttft_p50']:.2f}"  # NaN: not streamed
        print(f"| {r['max_batch_size']} | {r['window_ms']} | {r['completed']}/{r['requests']} | {r['batches']} "
              f"({r['largest']}) | {r['wall_s']:.1f} | "
              f"{r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {ttft} | {r['p50']:.2f} | {r['p99']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
