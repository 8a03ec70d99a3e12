"""Budget sweeps end to end on the real SmolLM2 and real GSM8K: grid, resumability, report, CLI (the console script
in this process; a real process where one is killed)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from s1kit import S1KitError
from s1kit.data.benchmarks import load_benchmark
from s1kit.evaluate.report import write_report
from s1kit.evaluate.record import RunDir, RunInUse, RunMismatch, RunRecord, open_run, regrade_run
from s1kit.evaluate.sweep import build_grid, prediction, run_sweep
from test_cli import ENV, s1kit


def test_grid_shapes_and_errors():
    g = build_grid(["budget"], [16, 32], [0], [0, 2])
    assert [s.label for s in g] == ["max=16", "max=16,waits=2", "max=32", "max=32,waits=2"]
    assert all(s.hi == s.policy.max_thinking_tokens for s in g)
    g = build_grid(["budget"], [16, 64], [0, 32], [0])  # min > max is skipped for that cap
    assert [s.label for s in g] == ["max=16", "max=64", "max=64,min=32"]
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


def test_grid_refuses_a_minimum_above_every_cap_and_labels_a_cap_of_zero():
    with pytest.raises(S1KitError, match="min_thinking_tokens 50 exceeds every max_thinking_tokens"):
        build_grid(["budget"], [10], [50])
    assert [s.label for s in build_grid(["budget"], [10, None], [50])] == ["min=50"]  # uncapped takes any minimum
    assert [s.key for s in build_grid(["budget"], [0, None])] == ["budget:max=0", "budget:unforced"]
    with pytest.raises(ValueError, match="max_answer_tokens must be >= 1"):
        build_grid(max_answer=0)
    # wait strings only count where a stop can be suppressed
    a, b = build_grid(["budget"], [8], waits=[0, 1], wait_strings=["Hmm"])
    assert a.policy.wait_strings == ("Wait",) and b.policy.wait_strings == ("Hmm",) and b.label == "max=8,waits=1,wait=Hmm"


def test_sweep_resumes_without_recomputing_and_rejection_respects_its_bound(engine, tmp_path):
    bench = load_benchmark("gsm8k", limit=3)
    settings = build_grid(["budget", "rejection"], [4, 8], max_answer=4)
    out = tmp_path / "run"
    open_run(out, RunRecord.create("smollm2-135m", "gsm8k", bench.items, settings), bench.items)
    calls = []

    class Counting:  # the real engine, counting how many sequences it is asked for
        tokenizer = engine.tokenizer

        def generate(self, requests, on_progress=None, on_complete=None, on_error=None):
            calls.append(len(requests))
            return engine.generate(requests, on_progress, on_complete, on_error)

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
            "--max-answer", "12", "--out", str(out)]
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
    r = s1kit(*args, "--model", "qwen2.5-coder-0.5b")
    assert r.returncode == 2 and "--model 'smollm2-135m' (asked: 'qwen2.5-coder-0.5b')" in r.stderr, r.stderr


def test_killed_eval_resumes_to_the_same_summary(engine, tmp_path):
    data = tmp_path / "aime.jsonl"  # a local benchmark in the AIME schema
    rows = [{"id": i, "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "solution": "..."} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["eval", "--benchmark", str(data), "--max-thinking", "8,16", "--max-answer", "6", "--batch-size", "2"]
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
    (["--max-thinking", "-4"], "--max-thinking must be >= 0"),
    (["--samples", "3"], "--samples > 1 needs --temperature > 0"),
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
    with pytest.raises(S1KitError, match="not a run directory"):
        regrade_run(tmp_path)
    open_run(tmp_path, RunRecord.create("m", "no-such-benchmark.jsonl", [], build_grid(max_thinking=[8])), [])
    with pytest.raises(S1KitError, match="cannot regrade .*no-such-benchmark.jsonl"):
        regrade_run(tmp_path)


def test_the_run_record_extends_a_selection_and_names_what_differs(tmp_path):
    items = load_benchmark("gsm8k").items
    grid = build_grid(["budget"], [8, 16], max_answer=8)
    first = open_run(tmp_path, RunRecord.create("m", "gsm8k", items, grid[:1], limit=4), items)
    assert first.items == tuple(it.id for it in items[:4]) and RunDir(tmp_path).read() == first
    (tmp_path / "samples.jsonl").write_text(json.dumps({"setting": grid[0].key, "item_id": items[0].id, "sample": 0})
                                            + "\n")  # a stored sample: the record binds
    # more items and another setting extend it; fewer items change nothing
    grown = open_run(tmp_path, RunRecord.create("m", "gsm8k", items, grid, limit=6, samples=1), items)
    assert grown.items == tuple(it.id for it in items[:6]) and [s.key for s in grown.settings] == [s.key for s in grid]
    assert open_run(tmp_path, RunRecord.create("m", "gsm8k", items, grid[:1], limit=2), items) == grown
    # anything that changes the samples is refused, every difference named, nothing written
    before = (tmp_path / "config.json").read_bytes()
    other = RunRecord.create("m2", "gsm8k", items, build_grid(["budget"], [8], max_answer=16), limit=4, temperature=0.5)
    with pytest.raises(RunMismatch) as e:
        open_run(tmp_path, other, items)
    assert {name for name, _, _ in e.value.differences} == {"model", "temperature", "max_answer_tokens"}
    assert "max_answer_tokens 8 (asked: 16)" in str(e.value)
    edited = [items[0], replace(items[1], gold="-1"), *items[2:]]  # a benchmark file edited since the run
    with pytest.raises(RunMismatch, match="benchmark items"):
        open_run(tmp_path, RunRecord.create("m", "gsm8k", edited, grid, limit=6), edited)
    assert (tmp_path / "config.json").read_bytes() == before
    # a record whose run stored no sample (a start that failed) binds nothing
    (tmp_path / "samples.jsonl").unlink(missing_ok=True)
    assert open_run(tmp_path, other, items) == other
    (tmp_path / "config.json").write_bytes(before)
    # samples without a record cannot be resumed: what made them is unknown
    (tmp_path / "samples.jsonl").write_text("{}\n")
    (tmp_path / "config.json").unlink()
    with pytest.raises(S1KitError, match="holds samples.jsonl but no config.json"):
        open_run(tmp_path, other, items)
    (tmp_path / "config.json").write_bytes(before)
    # a damaged record names its file
    (tmp_path / "config.json").write_text(before.decode()[:40])
    with pytest.raises(S1KitError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        RunDir(tmp_path).read()


def test_one_writer_per_run_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.writer():
        with pytest.raises(RunInUse, match=f"{tmp_path / 'run'} is in use: another process writes it \\(pid {os.getpid()}\\)"):
            with RunDir(tmp_path / "run").writer():
                pass
    assert not run.path.exists()  # created for nothing: removed again
    with run.writer():
        run.write(RunRecord.create("m", "gsm8k", [], build_grid()))
    with run.writer():  # released on the way out
        assert run.read() is not None
    (tmp_path / "file").write_text("x")
    with pytest.raises(S1KitError, match="is a file, not a run directory"):
        with RunDir(tmp_path / "file").writer():
            pass


def test_early_exit_settings_run_beside_the_caps_and_the_report_counts_probe_tokens(engine, tmp_path):
    from s1kit.evaluate.sweep import parse_early_exit, setting_from_json, setting_to_json

    rule = parse_early_exit("every=4,agree=2,probe=3")
    assert (rule.every, rule.agree, rule.probe_tokens, rule.words) == (4, 2, 3, ())
    assert parse_early_exit("words=Wait|Hmm,confidence=0.9,agree=none").words == ("Wait", "Hmm")
    for bad in ("every", "every=x", "colour=3", "every=0"):
        with pytest.raises(ValueError, match="early exit"):
            parse_early_exit(bad)
    settings = build_grid(["budget", "early-exit"], [8, 24], early_exit=[rule], cap_grace=2, max_answer=6)
    assert [s.key for s in settings] == ["budget:max=8", "budget:max=24", "early-exit:every=4,agree=2,probe=3"]
    ee = settings[-1]
    assert ee.policy.max_thinking_tokens == 24 and ee.policy.early_exit == rule and ee.policy.cap_grace == 2
    assert setting_from_json(json.loads(json.dumps(setting_to_json(ee)))) == ee  # kept in the run record as is
    with pytest.raises(S1KitError, match="needs early_exit rules"):
        build_grid(["early-exit"], [8])
    bench = load_benchmark("gsm8k", limit=2)
    open_run(tmp_path, RunRecord.create("smollm2-135m", "gsm8k", bench.items, settings, None), bench.items)
    records = run_sweep(engine, bench, settings, tmp_path)
    probed = [r for r in records if r["method"] == "early-exit"]
    assert len(probed) == 2 and all("probe_tokens" in r and "early_exit" in r for r in records)
    summary = write_report(tmp_path, settings, {"model": "smollm2-135m", "benchmark": "gsm8k"})
    rows = {r["setting"]: r for r in summary["settings"]}
    assert rows["budget:max=8"]["mean_probe_tokens"] == 0
    assert rows["early-exit:every=4,agree=2,probe=3"]["mean_probe_tokens"] == \
        sum(r["probe_tokens"] for r in probed) / 2
    assert "early-exit" in summary["methods"] and (tmp_path / "scaling.png").is_file()
