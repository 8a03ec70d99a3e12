"""Budget sweeps end to end on the real SmolLM2 and real GSM8K: grid, resumability, report, CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from s1kit import S1KitError
from s1kit.data.benchmarks import load_benchmark
from s1kit.evaluate.report import write_report
from s1kit.evaluate.sweep import SweepConfig, build_grid, open_run, prediction, regrade_run, run_sweep

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}


def s1kit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "s1kit.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=900, **kw)


def test_grid_shapes_and_errors():
    g = build_grid(["budget"], [16, 32], [0], [0, 2])
    assert [s.label for s in g] == ["max=16", "max=16,waits=2", "max=32", "max=32,waits=2"]
    assert all(s.hi == s.policy.max_thinking_tokens for s in g)
    g = build_grid(["budget"], [16], [0, 32], [0])  # min > max is skipped
    assert [s.label for s in g] == ["max=16"]
    methods = ["token-conditional", "step-conditional", "class-conditional", "rejection"]
    g = build_grid(methods, [100, 200])
    assert [s.key for s in g] == ["token-conditional:tokens=100", "token-conditional:tokens=200",
                                  "step-conditional:steps=2", "step-conditional:steps=4",
                                  "class-conditional:short", "class-conditional:long",
                                  "rejection:accept<=100", "rejection:accept<=200"]
    assert "Think for up to 100 tokens." in g[0].instruction
    with pytest.raises(S1KitError, match="unknown method"):
        build_grid(["beam"], [16])
    with pytest.raises(S1KitError, match="needs token budgets"):
        build_grid(["rejection"], [None])


def test_sweep_resumes_without_recomputing_and_rejection_respects_its_bound(engine, tmp_path):
    bench = load_benchmark("gsm8k", limit=3)
    settings = build_grid(["budget", "rejection"], [8, 24], max_answer=8)
    out = tmp_path / "run"
    open_run(out, SweepConfig("smollm2-135m", "gsm8k", 3), settings)
    calls = []

    class Counting:  # the real engine, counting how many sequences it is asked for
        tokenizer = engine.tokenizer

        def generate(self, requests, on_progress=None):
            calls.append(len(requests))
            return engine.generate(requests, on_progress)

    records = run_sweep(Counting(), bench, settings, out, max_tries=3)
    assert len(records) == len(settings) * 3
    for r in records:
        if r["method"] == "rejection":
            bound = int(r["label"].split("<=")[1])
            assert r["thinking_tokens"] <= bound or r["tries"] == 3
        else:
            assert r["thinking_tokens"] <= r["hit_cap"] * 0 + int(r["label"].split("=")[1])
    lines = (out / "samples.jsonl").read_text().splitlines()
    # a kill mid-write: drop the last 4 records and leave half a line behind
    (out / "samples.jsonl").write_text("\n".join(lines[:-4]) + "\n" + lines[-4][: len(lines[-4]) // 2])
    calls.clear()
    again = run_sweep(Counting(), bench, settings, out, max_tries=3)
    assert 4 <= sum(calls) <= 4 * 3  # only the lost samples were generated (rejection may retry)
    assert {(r["setting"], r["item_id"]) for r in again} == {(r["setting"], r["item_id"]) for r in records}
    kept = [json.loads(line) for line in lines[:-4]]
    assert all(again_r in again for again_r in kept)
    calls.clear()
    run_sweep(Counting(), bench, settings, out)
    assert calls == []
    summary = write_report(out, settings, {"model": "smollm2-135m", "benchmark": "gsm8k"})
    budget_rows = [r for r in summary["settings"] if r["method"] == "budget"]
    assert summary["control"] == 1.0 and len(budget_rows) == 2
    assert set(summary["methods"]) == {"budget", "rejection"}


def test_eval_cli_writes_report_and_reruns_compute_nothing(engine, tmp_path):
    out = tmp_path / "ev"
    args = ["eval", "--model", "smollm2-135m", "--benchmark", "gsm8k", "--limit", "4", "--max-thinking", "16,32",
            "--out", str(out)]
    r = s1kit(*args)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["control"] == 1.0 and summary["scaling"] is not None and summary["performance"] >= 0
    assert {"setting", "accuracy", "ci_low", "ci_high", "mean_thinking_tokens", "control"} <= summary["settings"][0].keys()
    assert (out / "scaling.png").stat().st_size > 10_000 and "| budget |" in (out / "report.md").read_text()
    before = (out / "samples.jsonl").read_bytes()
    r = s1kit(*args)
    assert r.returncode == 0 and (out / "samples.jsonl").read_bytes() == before
    assert json.loads((out / "summary.json").read_text()) == summary
    r = s1kit("report", str(out))
    assert r.returncode == 0 and "wrote" in r.stdout
    # --regrade grades the stored generations again: spoiled grades come back as they were
    spoiled = [{**rec, "prediction": "spoiled", "correct": not rec["correct"]}
               for rec in map(json.loads, before.splitlines())]
    (out / "samples.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in spoiled))
    r = s1kit("report", "--regrade", str(out))
    assert r.returncode == 0 and f"regraded {len(spoiled)} samples: {len(spoiled)} changed" in r.stdout, r.stdout
    assert json.loads((out / "summary.json").read_text()) == summary
    # the same directory refuses another model's results
    r = s1kit("eval", "--model", "qwen2.5-coder-0.5b", "--benchmark", "gsm8k", "--limit", "4", "--out", str(out))
    assert r.returncode == 2 and "holds results for model='smollm2-135m'" in r.stderr


def test_killed_eval_resumes_to_the_same_summary(engine, tmp_path):
    data = tmp_path / "aime.jsonl"  # a local benchmark in the AIME schema
    rows = [{"id": i, "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "solution": "..."} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["eval", "--benchmark", str(data), "--max-thinking", "24,48", "--max-answer", "12", "--batch-size", "2"]
    ref = s1kit(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "s1kit.cli", *args, "--out", str(out)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = out / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not store.exists() or store.read_text().count("\n") < 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = store.read_text().count("\n")
    assert 2 <= partial < 12
    r = s1kit(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a["settings"] == b["settings"] and len(store.read_text().splitlines()) == 12


@pytest.mark.parametrize("args, message", [
    (["--max-thinking", "16,abc"], "'abc' is not an integer"),
    (["--max-thinking", "-4"], "budgets must be >= 0"),
    (["--samples", "3"], "needs sampling"),
    (["--method", "beam", "--max-thinking", "8"], "unknown method"),
    (["--benchmark", "/no/such.jsonl"], "unknown benchmark"),
])
def test_eval_bad_input(args, message, tmp_path):
    r = s1kit("eval", "--limit", "2", "--out", str(tmp_path / "x"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_blank_answer_is_graded_from_the_thinking():
    """A model that ends its turn while thinking (one not trained on the format) answered there."""
    item = load_benchmark("math500", 1).items[0]
    thinking = f"Working it out, the result is \\boxed{{{item.gold}}}."
    assert prediction("", thinking, item) == (item.gold, "thinking")
    assert prediction(" \n", thinking, item)[1] == "thinking"
    # an answer that says something is graded as it is, even when it is wrong and the thinking was right
    assert prediction("Final Answer: 12345", thinking, item) == ("12345", "answer")
    assert prediction("", "", item) == ("", "answer")


def test_regrade_bad_input(tmp_path):
    with pytest.raises(S1KitError, match="not a sweep directory"):
        regrade_run(tmp_path)
    open_run(tmp_path, SweepConfig("m", "no-such-benchmark.jsonl", 1), build_grid(max_thinking=[8]))
    with pytest.raises(S1KitError, match="cannot regrade .*no-such-benchmark.jsonl"):
        regrade_run(tmp_path)
