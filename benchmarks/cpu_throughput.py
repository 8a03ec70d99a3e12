"""Budget-forced throughput on the CPU, every path in one run, same machine, same requests.

The slice: qwen2.5-coder-0.5b, the first B GSM8K test questions (B = 8 and 16), thinking capped at 128 tokens,
32 answer tokens, greedy. Each path runs in its own process, one after another (so they never share the cores):

- ``hf-plain``: the in-process loop as it was before the engine core (commit a765aa6: one fixed batch decoded
  until its last row ends, float32), from an exported copy of that commit's ``src/``;
- ``hf-loop``: today's plain loop (rows leave the batch as they end and queued rows join it), float32 and bfloat16;
- ``hf-fast``: the fast path's slot cache stepped eagerly on the CPU (no CUDA graphs), float32 and bfloat16;
- ``llamacpp-server``: ``--engine remote`` against llama-cpp-python's server on loopback (the GGUF as shipped,
  quantized; the stop-and-continue loop), when ``llama_cpp`` is installed. llama-cpp-python's server has one slot:
  requests queue behind one another. With ``--llama-server PATH`` (llama.cpp's own server binary) the peer is that
  server instead, started for each batch size with as many parallel slots as the batch (``--parallel B``);
- ``s1kit-llamacpp``: ``--engine llamacpp``, the GGUF as shipped in this process, rows batched as llama.cpp sequences;
- ``llamacpp-raw``: llama-cpp-python alone (``Llama.generate``, greedy) at batch 1: the first question, as many new
  tokens as ``s1kit-llamacpp`` produced for it (no budget forcing).

    .venv/bin/python benchmarks/cpu_throughput.py --json benchmarks/results/cpu_throughput.json

Rows: path, dtype, batch, tokens, seconds (generation only), load_s (model load), tok_s, tok_s_with_load; in-process
paths run ``--repeats`` times (the median run is kept, ``runs_tok_s`` lists all), the llama.cpp server once.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "a765aa6"  # the last commit before the engine core


def _questions(n: int) -> list[str]:
    from s1kit.data.benchmarks import load_benchmark

    return [it.question for it in load_benchmark("gsm8k", n).items]


def child(args: argparse.Namespace) -> None:
    """Measure one path in this process and print one JSON row."""
    if args.path.startswith("hf"):  # not for llama.cpp: its OpenMP threads sleeping between ops cost it ~a third
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from s1kit import BudgetPolicy, Request

    policy = BudgetPolicy(max_thinking_tokens=128, max_answer_tokens=32)
    requests = [Request(q, policy) for q in _questions(args.batch)]
    if args.path == "llamacpp-raw":
        return _raw(args, requests[0])
    t0 = time.perf_counter()
    if args.path == "s1kit-llamacpp":
        from s1kit.engines.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine.load(args.model, batch_size=args.batch, threads=args.threads, max_model_len=1024)
    elif args.path == "llamacpp-server":
        from s1kit.engines.remote import RemoteEngine

        engine = RemoteEngine(args.base_url, args.model, concurrency=args.batch)
    else:
        from s1kit.engines.hf import HFEngine

        kw = {} if args.path == "hf-plain" else {"fast": args.path == "hf-fast"}
        engine = HFEngine.load(args.model, device="cpu", dtype=args.dtype, batch_size=args.batch, **kw)
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = engine.generate(requests)
    gen = time.perf_counter() - t1
    tokens = sum(len(c.token_ids) for c in out)
    print(json.dumps({"path": args.path, "dtype": args.dtype if args.path.startswith("hf") else "gguf",
                      "batch": args.batch, "tokens": tokens, "seconds": gen, "load_s": load, "tok_s": tokens / gen,
                      "tok_s_with_load": tokens / (gen + load), "threads": args.threads,
                      "capped": sum(c.hit_cap for c in out)}))


def _raw(args: argparse.Namespace, request) -> None:
    """llama-cpp-python alone: the prompt s1kit would send, then ``args.tokens`` greedy tokens."""
    import llama_cpp

    from s1kit.engines.llamacpp import LlamaCppEngine
    from s1kit.models import gguf_file

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf_file(args.model)), n_ctx=1024, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    load = time.perf_counter() - t0
    probe = LlamaCppEngine.load(args.model, batch_size=1, threads=1, max_model_len=1024)  # the same prompt ids
    ids = probe.prepare(request).prompt_ids
    probe.close()
    t1 = time.perf_counter()
    n = 0
    for _ in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        n += 1
        if n >= args.tokens:
            break
    gen = time.perf_counter() - t1
    print(json.dumps({"path": "llamacpp-raw", "dtype": "gguf", "batch": 1, "tokens": n, "seconds": gen,
                      "load_s": load, "tok_s": n / gen, "tok_s_with_load": n / (gen + load), "threads": args.threads,
                      "capped": 0}))


def _run(argv: list[str], pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], capture_output=True, text=True,
                       env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    """The run with the median tokens/s, with every run's tokens/s beside it."""
    ranked = sorted(runs, key=lambda r: r["tok_s"])
    return {**ranked[len(ranked) // 2], "runs_tok_s": [round(r["tok_s"], 1) for r in runs]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Every path, one after another, then a markdown table (and JSON)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default="hf-loop")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--base-url", default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--paths", default="hf-plain,hf-loop,hf-fast,llamacpp-server,s1kit-llamacpp,llamacpp-raw")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of hf-loop and hf-fast")
    p.add_argument("--tokens", type=int, default=160, help=argparse.SUPPRESS)  # llamacpp-raw: new tokens
    p.add_argument("--repeats", type=int, default=3, help="runs of each in-process path (the median is kept): "
                                                          "this CPU's speed varies by a third from run to run")
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary: the server peer, with "
                                                        "--parallel equal to the batch")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.child:
        return child(args)
    src = os.path.join(ROOT, "src")
    rows = []
    with tempfile.TemporaryDirectory() as old:
        # "today's loop" as it was: that commit's package, exported (nothing of it is committed here)
        subprocess.run(f"git -C {ROOT} archive {BEFORE} src | tar -x -C {old}", shell=True, check=True)
        server, server_slots = None, 1
        for b in (int(x) for x in args.batches.split(",")):
            for path in args.paths.split(","):
                base = [f"--path={path}", f"--batch={b}", f"--model={args.model}", f"--threads={args.threads}"]
                if path == "hf-plain":
                    rows.append(_median([_run(base + ["--dtype=float32"], os.path.join(old, "src"))
                                         for _ in range(args.repeats)]))
                elif path in ("hf-loop", "hf-fast"):
                    for dt in args.dtypes.split(","):
                        rows.append(_median([_run(base + [f"--dtype={dt}"], src) for _ in range(args.repeats)]))
                elif path == "s1kit-llamacpp":
                    rows.append(_median([_run(base, src) for _ in range(args.repeats)]))
                elif path == "llamacpp-raw":
                    if b != 1:
                        continue
                    first = next((r for r in rows if r["path"] == "s1kit-llamacpp" and r["batch"] == 1), None)
                    extra = [f"--tokens={first['tokens']}"] if first else []
                    rows.append(_median([_run(base + extra, src) for _ in range(args.repeats)]))
                elif path == "llamacpp-server":
                    try:
                        import llama_cpp  # noqa: F401
                    except ImportError:
                        print("llama_cpp is not installed: skipping llamacpp-server", file=sys.stderr)
                        continue
                    if args.llama_server and server is not None and server_slots != b:
                        server.kill()  # llama-server: one slot per request of the batch
                        server = None
                    if server is None:
                        from s1kit.models import gguf_file

                        gguf = str(gguf_file(args.model))
                        port = _free_port()
                        if args.llama_server:
                            cmd = [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                                   "-c", str(1024 * b), "--parallel", str(b), "--threads", str(args.threads),
                                   "--threads-batch", str(args.threads)]
                        else:
                            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                                   "--port", str(port), "--n_ctx", "4096", "--n_threads", str(args.threads)]
                        server, server_slots = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                                stderr=subprocess.DEVNULL), b if args.llama_server else 1
                        url = f"http://127.0.0.1:{port}/v1"
                        for _ in range(240):
                            try:
                                with socket.create_connection(("127.0.0.1", port), timeout=1):
                                    break
                            except OSError:
                                time.sleep(0.5)
                    row = _run(base + [f"--base-url={url}"], src)
                    row["parallel"] = server_slots
                    rows.append(row)
                print("\n".join(json.dumps(r) for r in rows if r["batch"] == b and r["path"] == path),
                      file=sys.stderr, flush=True)
        if server is not None:
            server.kill()
    print(f"\n{args.model}, GSM8K, thinking cap 128, answer 32, greedy, {args.threads} threads\n")
    for r in rows:
        r.update(date=time.strftime("%Y-%m-%d"), machine=f"{os.cpu_count()}-core {os.uname().machine}")
        r.setdefault("parallel", None)
    print("| path | dtype | batch | tokens | seconds | tok/s (median) | runs | tok/s with load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        runs = ", ".join(str(x) for x in r.get("runs_tok_s", [round(r["tok_s"], 1)]))
        print(f"| {r['path']} | {r['dtype']} | {r['batch']} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | "
              f"{runs} | {r['tok_s_with_load']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
