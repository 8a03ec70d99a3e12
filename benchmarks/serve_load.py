"""One load client for any OpenAI-compatible server: s1kit serve, vllm serve, llama-server, SGLang.

Sends N chat completions, at most C in flight, twice: non-streamed (completion tokens/s, latency p50/p99) and
streamed (time to first token, p50), and prints one row. The body is the same for every server except the
budget: ``--body s1kit`` asks for exactly ``--thinking`` thinking tokens (``thinking_budget`` min = max) and at
most ``--answer`` answer tokens; ``--body plain`` asks for ``--thinking + --answer`` tokens with ``ignore_eos``
(vLLM's extension), the same token load without forcing. Only httpx is needed, so it runs where the server runs.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --model coder --label s1kit --body s1kit \\
        --requests 256 --concurrency 64 --thinking 256 --answer 64 --json benchmarks/results/serve_vs_vllm.json

``--json`` appends the row to a JSON list (fields: server, tok_s, p50_s, p99_s, ttft_p50_s, requests,
concurrency, device, ...). With ``--body s1kit`` a row counts only responses whose reasoning_tokens equal the
budget as exact; the script exits 1 if any response is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import httpx

PROMPTS = ["What is 17*23?", "Name three prime numbers.", "What is the capital of France?", "Is 91 prime?",
           "Convert 3/8 to a decimal.", "What is 2 to the power 10?", "Name a colour of the rainbow.", "What is 9*12?",
           "Explain why the sky is blue.", "Write a haiku about rain.", "How many days are in a leap year?",
           "What is the square root of 144?", "Sort 5, 2, 9 in increasing order.", "Spell 'budget' backwards.",
           "What is 15% of 80?", "Name an even prime."]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def body(args: argparse.Namespace, i: int, stream: bool) -> dict:
    """Request ``i`` of the load."""
    b = {"model": args.model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
         "temperature": 0.0, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    if args.body == "s1kit":
        b["max_answer_tokens"] = args.answer  # max_tokens bounds thinking + answer, as OpenAI defines it
        b["thinking_budget"] = {"min_tokens": args.thinking, "max_tokens": args.thinking}
    else:
        b["max_tokens"] = args.thinking + args.answer
        b["ignore_eos"] = True
    return b


async def one(client: httpx.AsyncClient, args: argparse.Namespace, i: int, stream: bool) -> dict:
    """Send request ``i``; its latency, time to first token (streamed), completion and reasoning tokens."""
    url = args.url.rstrip("/") + "/chat/completions"
    start = time.perf_counter()
    if not stream:
        r = await client.post(url, json=body(args, i, False))
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
        usage = r.json()["usage"]
        return {"ok": True, "latency": time.perf_counter() - start, "ttft": None, "tokens": usage["completion_tokens"],
                "reasoning": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")}
    first, usage = None, None
    async with client.stream("POST", url, json=body(args, i, True)) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any((c.get("delta") or {}).get("reasoning_content") or (c.get("delta") or {}).get(
                    "content") for c in chunk.get("choices") or []):
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    if usage is None:
        return {"ok": False, "error": "no usage chunk"}
    return {"ok": True, "latency": time.perf_counter() - start, "ttft": first, "tokens": usage["completion_tokens"],
            "reasoning": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")}


async def run(args: argparse.Namespace, n: int, stream: bool) -> tuple[list[dict], float]:
    """``n`` requests, at most ``--concurrency`` in flight; (results, wall seconds)."""
    gate = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def gated(client: httpx.AsyncClient, i: int) -> dict:
        async with gate:
            return await one(client, args, i, stream)

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(client, i) for i in range(n)))
        return results, time.perf_counter() - start


def main() -> None:
    """Warm up, run the load non-streamed and streamed, print and optionally append one row."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server's /v1 base URL")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--label", required=True, help="the row's server name, e.g. s1kit or vllm")
    p.add_argument("--body", choices=("s1kit", "plain"), default="s1kit")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--thinking", type=int, default=256)
    p.add_argument("--answer", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8, help="requests sent (and not counted) before measuring")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--api-key", default=os.environ.get("S1KIT_API_KEY"))
    p.add_argument("--device", default="", help="the machine, for the row")
    p.add_argument("--json", default=None, help="append the row to this JSON list")
    args = p.parse_args()
    asyncio.run(run(args, args.warmup, False))
    plain, wall = asyncio.run(run(args, args.requests, False))
    streamed, swall = asyncio.run(run(args, args.requests, True))
    ok = [r for r in plain if r["ok"]]
    sok = [r for r in streamed if r["ok"]]
    errors = [r["error"] for r in plain + streamed if not r["ok"]]
    exact = None
    if args.body == "s1kit":
        exact = sum(r["reasoning"] == args.thinking for r in ok + sok)
    row = {
        "server": args.label, "tok_s": sum(r["tokens"] for r in ok) / wall,
        "p50_s": percentile([r["latency"] for r in ok], 50), "p99_s": percentile([r["latency"] for r in ok], 99),
        "ttft_p50_s": percentile([r["ttft"] for r in sok if r["ttft"] is not None], 50),
        "stream_tok_s": sum(r["tokens"] for r in sok) / swall, "requests": args.requests,
        "concurrency": args.concurrency, "completed": len(ok), "completed_streamed": len(sok),
        "completion_tokens": sum(r["tokens"] for r in ok), "wall_s": wall, "body": args.body,
        "thinking": args.thinking, "answer": args.answer, "exact_budgets": exact, "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"| {row['server']} | {row['tok_s']:,.0f} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | "
          f"{row['ttft_p50_s']:.3f} | {row['completed']}/{args.requests} | {exact if exact is not None else '-'} |")
    print(json.dumps(row))
    if errors:
        print(f"{len(errors)} failed, e.g. {errors[0]}", file=sys.stderr)
    if args.json:
        rows = json.load(open(args.json)) if os.path.exists(args.json) else []
        rows.append(row)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = errors or (exact is not None and exact != len(ok) + len(sok))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
