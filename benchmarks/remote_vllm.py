"""s1 budget forcing on vLLM: the logits processor (one request per sample) vs the stop-and-continue loop vs vLLM
without forcing, in one call on one GPU. Exits non-zero if any budget is not exact or streaming fails.

(a) exactness: 256 requests, 64 in flight, greedy and seeded sampling: caps, min = max, minimum only, 1-3 Waits,
    two wait strings, a cap of 0; every completion's thinking_tokens / waits_used / hit_cap as asked;
(b) greedy tokens through the processor equal those of the loop against the same server (mismatches are
    run again one request at a time; vLLM's numerics depend on the batch);
(c) streaming: a raw ``stream: true`` request with ``vllm_xargs`` gives SSE chunks with the same text and ids;
(d) throughput, 256 prompts, 64 in flight, min = max = 256 thinking tokens, 64 answer tokens, greedy:
    "direct" (the same prompts and token counts straight to vLLM, no forcing, ignore_eos), "plugin"
    (RemoteEngine on the processor), "loop" (RemoteEngine's stop-and-continue loop), and "loop_before"
    (the loop client before issue #19, if --loop-before is given). Tokens are generated tokens as the server
    counts them (usage.completion_tokens; the forced end token after an answer budget included).

On the GPU machine (vLLM 0.26.0 installed as DESIGN.md §7 says; MODEL a transformers directory, e.g. the staged
Qwen2.5-Coder-0.5B converted by s1kit, which needs the gguf wheel: ``MODEL=$(python3 -c "from s1kit.models
import resolve; print(resolve('/root/stage/q05.gguf'))")``, or random weights saved with ``save_pretrained``)::

    export PYTHONPATH=/tmp/vsite:$PWD/src PYTHONUNBUFFERED=1
    S="python3 -m vllm.entrypoints.openai.api_server --model $MODEL --served-model-name m --max-model-len 4096 \
       --generation-config vllm --gpu-memory-utilization 0.4"
    VLLM_CACHE_ROOT=/root/vc1 $S --port 8000 --logits-processors s1kit.integrations.vllm:S1BudgetLogitsProcessor \
        > $OUT/plugin.log 2>&1 &
    VLLM_CACHE_ROOT=/root/vc2 $S --port 8001 > $OUT/plain.log 2>&1 &
    until curl -sf localhost:8000/v1/models >/dev/null && curl -sf localhost:8001/v1/models >/dev/null; do sleep 2; done
    python3 benchmarks/remote_vllm.py --plugin-url http://127.0.0.1:8000/v1 --plain-url http://127.0.0.1:8001/v1 \
        --tokenizer $MODEL --loop-before .bench/remote_a765aa6.py --json $OUT/remote_vllm.json

``--plain-url`` (optional) is a server without the processor: "direct" and "loop" run there (vLLM without
forcing, as the issue measured them); without it they run on the processor's server. For "loop_before",
first, here: ``mkdir -p .bench && git show a765aa6:src/s1kit/engines/remote.py > .bench/remote_a765aa6.py``
(``echo /.bench/ >> .git/info/exclude``) and carry ``.bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from s1kit import BudgetPolicy, Request, SamplingParams
from s1kit.engines.remote import RemoteEngine
from s1kit.integrations.xargs import to_xargs

NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0, "top_k": 0}


def prompts(n: int) -> list[str]:
    """``n`` distinct short questions."""
    return [f"Question {i}: what is {17 + i} * {23 + 3 * i}? Think it through, then answer." for i in range(n)]


EXACT_POLICIES = [
    ("cap 24", BudgetPolicy(max_thinking_tokens=24, max_answer_tokens=16)),
    ("min = max = 40", BudgetPolicy(min_thinking_tokens=40, max_thinking_tokens=40, max_answer_tokens=16)),
    ("min 64", BudgetPolicy(min_thinking_tokens=64, max_answer_tokens=16)),
    ("1 Wait, cap 200", BudgetPolicy(num_waits=1, max_thinking_tokens=200, max_answer_tokens=16)),
    ("2 Waits, cap 200", BudgetPolicy(num_waits=2, max_thinking_tokens=200, max_answer_tokens=16)),
    ("3 Waits, cap 200", BudgetPolicy(num_waits=3, max_thinking_tokens=200, max_answer_tokens=16)),
    ("2 Waits, two strings", BudgetPolicy(num_waits=2, max_thinking_tokens=200, wait_strings=("Wait", " Hmm,"),
                                          max_answer_tokens=16)),
    ("cap 0", BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=16)),
]


def problem(policy: BudgetPolicy, c) -> str | None:
    """What in completion ``c`` breaks ``policy`` (DESIGN.md §2), or None."""
    cap, lo, k = policy.max_thinking_tokens, policy.min_thinking_tokens, policy.num_waits
    t, w = c.thinking_tokens, c.waits_used
    if cap is not None and (t > cap or c.hit_cap != (t == cap)):
        return f"thinking {t} vs cap {cap} (hit_cap {c.hit_cap})"
    if t < lo:
        return f"thinking {t} below the minimum {lo}"
    if (lo == 0 and w > k) or (not c.hit_cap and w < k):  # Waits beyond k only below the minimum; a stop
        return f"waits_used {w} for num_waits {k} (thinking {t}, hit_cap {c.hit_cap})"  # is accepted after k
    if c.hit_cap and not c.answer.startswith(policy.answer_prefix):
        return f"capped answer does not start with {policy.answer_prefix!r}: {c.answer[:40]!r}"
    return None


def exactness(engine: RemoteEngine, n_each: int) -> tuple[list[Request], list, list[str]]:
    """Every policy on ``n_each`` prompts, greedy and seeded sampling; (requests, completions, failures)."""
    reqs = []
    for name, policy in EXACT_POLICIES:
        for i, p in enumerate(prompts(n_each)):
            sampling = SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.8, top_p=0.95, seed=i)
            reqs.append(Request(p, policy, sampling=sampling))
    out = engine.generate(reqs)
    failures = []
    for r, c in zip(reqs, out):
        why = problem(r.policy, c)
        if why:
            failures.append(f"{r.policy}: {why}")
    wait_strings = [c for r, c in zip(reqs, out) if r.policy.wait_strings == ("Wait", " Hmm,") and c.waits_used == 2]
    if wait_strings and not any(" Hmm," in c.thinking for c in wait_strings):
        failures.append("two wait strings: no completion with 2 Waits holds the second string")
    return reqs, out, failures


def equality(plugin_url: str, args, reqs: list[Request], forced: list) -> dict:
    """Greedy tokens of the processor vs the loop on the same server; mismatches (16 at most) again one at a time."""
    greedy = [(r, c) for r, c in zip(reqs, forced) if r.sampling.greedy]
    with RemoteEngine(plugin_url, args.model, tokenizer=args.tokenizer, concurrency=args.concurrency, plugin=False,
                      timeout=900) as loop:
        looped = loop.generate([r for r, _ in greedy])
        differ = [i for i, ((_, a), b) in enumerate(zip(greedy, looped)) if a.token_ids != b.token_ids]
        again, rerun = [], differ[:16]
        if rerun:
            loop.concurrency = 1
            with RemoteEngine(plugin_url, args.model, tokenizer=args.tokenizer, concurrency=1, plugin=True) as one:
                sub = [greedy[i][0] for i in rerun]
                again = [i for i, a, b in zip(rerun, one.generate(sub), loop.generate(sub)) if a.token_ids != b.token_ids]
    first = [next((k for k, (x, y) in enumerate(zip(greedy[i][1].token_ids, looped[i].token_ids)) if x != y), None)
             for i in differ]
    counts_equal = sum((a.thinking_tokens, a.waits_used, a.hit_cap) == (b.thinking_tokens, b.waits_used, b.hit_cap)
                       for (_, a), b in zip(greedy, looped))
    return {"greedy_requests": len(greedy), "equal_at_concurrency": len(greedy) - len(differ),
            "rerun_one_at_a_time": len(rerun), "still_different_one_at_a_time": len(again),
            "counts_equal_at_concurrency": counts_equal, "first_divergence_positions": first}


def streaming(url: str, engine: RemoteEngine, report: dict) -> dict:
    """Part (c): a raw streamed request with vllm_xargs vs the same request without streaming."""
    req = Request("Explain why the sky is blue.", BudgetPolicy(max_thinking_tokens=32, num_waits=1, max_answer_tokens=24))
    ids, tokens, _ = engine.prepare(req)
    closing = len(tokens.newline_ids + tokens.opener_ids + tokens.prefix_ids)
    body = {"model": engine.served_model, "prompt": ids, "max_tokens": 32 + closing + 24 + 1, "temperature": 0,
            **NEUTRAL, "skip_special_tokens": False, "return_token_ids": True, "vllm_xargs": to_xargs(req.policy, req.format)}
    whole = httpx.post(url + "/completions", json=body, timeout=300).json()["choices"][0]
    text, ids_out, chunks = "", [], 0
    with httpx.stream("POST", url + "/completions", json={**body, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:]).get("choices"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice.get("text") or ""
                ids_out += choice.get("token_ids") or []
                chunks += 1
    if chunks < 3 or text != whole["text"] or ids_out != whole["token_ids"]:
        report["failures"].append(f"streaming: {chunks} chunks, text equal {text == whole['text']}, ids equal "
                                  f"{ids_out == whole['token_ids']}")
    return {"chunks": chunks, "tokens": len(ids_out), "text_equal": text == whole["text"],
            "ids_equal": ids_out == whole["token_ids"]}


async def _direct(url: str, model: str, prompt_ids: list[list[int]], lengths: list[int], concurrency: int) -> int:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        async def one(ids: list[int], n: int) -> int:
            async with gate:
                r = await client.post(url + "/completions", json={
                    "model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True, **NEUTRAL})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]
        return sum(await asyncio.gather(*(one(p, n) for p, n in zip(prompt_ids, lengths))))


def check_exactness(forced: RemoteEngine, args, report: dict) -> tuple[list[Request], list]:
    """Part (a): the exactness report; returns the requests and completions for part (b)."""
    t = time.perf_counter()
    reqs, out, failures = exactness(forced, args.exact_each)
    report["exactness"] = {
        "requests": len(reqs), "failures": failures, "seconds": time.perf_counter() - t,
        "waits_used": sorted({c.waits_used for c in out}),
        "thinking_by_policy": {name: sorted({c.thinking_tokens for r, c in zip(reqs, out) if r.policy == p})[:12]
                               for name, p in EXACT_POLICIES}}
    report["failures"] += failures
    print(f"exactness: {len(reqs)} requests, {len(failures)} failures", *failures[:10], sep="\n  ")
    return reqs, out


def throughput(forced: RemoteEngine, args, device: str, report: dict) -> list[dict]:
    """Part (d): direct, plugin, loop (and loop_before) on the same prompts and token counts."""
    flat_url = args.plain_url or args.plugin_url
    flat = "plain" if args.plain_url else "plugin"
    policy = BudgetPolicy(min_thinking_tokens=args.thinking, max_thinking_tokens=args.thinking,
                          max_answer_tokens=args.answer)
    reqs = [Request(p, policy) for p in prompts(args.prompts)]
    forced.generate(reqs[: max(1, args.concurrency // 4)])  # warm-up: connections, CUDA graphs of these shapes
    rows = []

    def engine_row(path: str, engine, server: str) -> list:
        sent = engine.completions_sent
        t = time.perf_counter()
        out = engine.generate(reqs)
        seconds = time.perf_counter() - t
        # generated tokens as the server counts them: the processor also emits an end token after an answer budget
        tokens = sum(len(c.token_ids) + (path == "plugin" and c.finish_reason == "length") for c in out)
        rows.append({"path": path, "tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
                     "samples": len(out), "concurrency": args.concurrency, "device": device, "server": server,
                     "requests": engine.completions_sent - sent,
                     "thinking_plus_answer": sum(c.thinking_tokens + c.answer_tokens for c in out),
                     "exact": all(c.thinking_tokens == args.thinking for c in out)})
        return out

    plugin_out = engine_row("plugin", forced, "plugin")
    ids = [forced.prepare(r)[0] for r in reqs]
    lengths = [len(c.token_ids) + (c.finish_reason == "length") for c in plugin_out]
    t = time.perf_counter()
    tokens = asyncio.run(_direct(flat_url, forced.served_model, ids, lengths, args.concurrency))
    seconds = time.perf_counter() - t
    rows.insert(0, {"path": "direct", "tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
                    "samples": len(ids), "concurrency": args.concurrency, "device": device, "server": flat,
                    "requests": len(ids)})
    with RemoteEngine(flat_url, args.model, tokenizer=args.tokenizer, concurrency=args.concurrency, plugin=False,
                      timeout=900) as loop:
        engine_row("loop", loop, flat)
    if args.loop_before:
        before = load_engine_class(args.loop_before)
        with before(flat_url, args.model, tokenizer=args.tokenizer, concurrency=args.concurrency, timeout=900) as old:
            engine_row("loop_before", old, flat)
    for row in rows:
        row["vs_direct"] = row["tok_s"] / rows[0]["tok_s"]
        if "exact" in row and not row["exact"]:
            report["failures"].append(f"throughput {row['path']}: not every sample thought {args.thinking} tokens")
    print(f"\n{'path':12} {'server':7} {'tok/s':>9} {'tokens':>8} {'seconds':>8} {'requests':>8} {'vs direct':>9}")
    for r in rows:
        print(f"{r['path']:12} {r['server']:7} {r['tok_s']:9.0f} {r['tokens']:8d} {r['seconds']:8.2f} "
              f"{r['requests']:8d} {r['vs_direct']:9.2f}")
    return rows


def load_engine_class(path: str):
    """``RemoteEngine`` from an older copy of ``engines/remote.py`` (imported as a module of s1kit.engines)."""
    spec = importlib.util.spec_from_file_location("s1kit.engines._remote_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.RemoteEngine


def device_name(override: str | None) -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process: the servers hold the memory)."""
    if override:
        return override
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
        return names[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def part(report: dict, name: str, fn):
    """Run one part; an exception becomes a failure in the report (the other parts still run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any crash of a part is a failed check, reported with its type
        report["failures"].append(f"{name}: {type(e).__name__}: {e}")
        print(f"{name} FAILED: {type(e).__name__}: {e}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plugin-url", required=True, help="vLLM started with --logits-processors s1kit...")
    ap.add_argument("--plain-url", help="the same model on vLLM without the processor (direct and loop run there)")
    ap.add_argument("--tokenizer", required=True, help="the served model's directory (its tokenizer)")
    ap.add_argument("--model", default="m", help="served model name")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--thinking", type=int, default=256, help="min = max thinking tokens in the throughput rows")
    ap.add_argument("--answer", type=int, default=64)
    ap.add_argument("--exact-each", type=int, default=32, help="prompts per policy in the exactness check")
    ap.add_argument("--loop-before", help="an older engines/remote.py to measure as loop_before")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: exact,equal,stream,throughput")
    ap.add_argument("--device", help="device name for the rows (default: nvidia-smi's)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/remote_vllm.json"))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = device_name(args.device)
    report: dict = {"args": vars(args) | {"json": str(args.json)}, "device": device, "failures": []}
    try:
        report["vllm_version"] = httpx.get(args.plugin_url.rsplit("/v1", 1)[0] + "/version", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        pass
    forced = part(report, "the processor's server", lambda: RemoteEngine(
        args.plugin_url, args.model, tokenizer=args.tokenizer, concurrency=args.concurrency, plugin=True, timeout=900))
    with forced or contextlib.nullcontext():
        if forced is None:
            skip |= {"exact", "stream", "throughput"}
        if "exact" not in skip:
            done = part(report, "exactness", lambda: check_exactness(forced, args, report))
            if done and "equal" not in skip:
                report["equality"] = part(report, "equality", lambda: equality(args.plugin_url, args, *done))
                print("greedy equality plugin vs loop:", report["equality"])
        if "stream" not in skip:
            report["streaming"] = part(report, "streaming", lambda: streaming(args.plugin_url, forced, report))
            print("streaming:", report["streaming"])
        if "throughput" not in skip:
            report["throughput"] = part(report, "throughput", lambda: throughput(forced, args, device, report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    if report["failures"]:
        print(f"\nFAILED: {len(report['failures'])} problem(s):", *report["failures"][:20], sep="\n  ")
        sys.exit(1)
    print(f"\nall exact; results in {args.json}")


if __name__ == "__main__":
    main()
