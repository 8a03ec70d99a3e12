"""Results you can trust (issue #22): a run directory records everything that determines its samples, reruns
that differ are refused, a second writer is refused, list-valued golds grade correctly, and every bad input is one
``error:`` line with exit code 2 and nothing written. The command as the console script runs it (in this process;
real subprocesses where a test needs a second writer or a kill), the real SmolLM2, real GSM8K."""

import json
import signal
import subprocess
import sys
import time

import pytest
from test_cli import ENV, s1kit

QUESTION = "There are 6 birds on a tree and 2 fly away. How many birds are left?"


def error_line(r) -> str:
    """The single ``error:`` line of a refused command (exit code 2, no traceback)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


def snapshot(path) -> dict:
    """Every file under ``path`` with its bytes (to show that a refused command wrote nothing), but the lock file,
    which every command opens to learn whether another one writes there."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def summary_n(out) -> list[int]:
    return [row["n"] for row in json.loads((out / "summary.json").read_text())["settings"]]


# ------------------------------------------------------------------ 1. list-valued answers


def test_eval_grades_a_list_valued_answer_field(engine, tmp_path):
    # OlympiadBench-style golds: a list with one answer, and a list of answers any of which is right. The cap at 0
    # forces the answer prefix, so the (correct) answer text does not depend on the model: "4 birds are left."
    data = tmp_path / "olympiad.jsonl"
    rows = [{"id": "one", "question": QUESTION, "final_answer": ["4"]},
            {"id": "any", "question": QUESTION, "final_answer": ["four", "4"]},
            {"id": "wrong", "question": QUESTION, "final_answer": ["5"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    r = s1kit("eval", "--benchmark", str(data), "--answer-field", "final_answer", "--max-thinking", "0",
              "--max-answer", "1", "--answer-prefix", "Final Answer: 4 birds are left.\n", "--out", str(out))
    assert r.returncode == 0, r.stderr
    records = {rec["item_id"]: rec for rec in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    assert {k: rec["correct"] for k, rec in records.items()} == {"one": True, "any": True, "wrong": False}
    assert records["any"]["gold"] == ["four", "4"] and records["one"]["gold"] == ["4"]  # the record shows the list
    # the field override is recorded, so --regrade needs no flags (and finds nothing to change)
    r = s1kit("report", "--regrade", str(out))
    assert r.returncode == 0 and "regraded 3 samples: 0 changed, 2 correct" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ 2. reruns: refused, resumed, extended


def test_reruns_are_refused_when_settings_differ_and_follow_the_asked_items(engine, tmp_path):
    out = tmp_path / "run"
    base = ["eval", "--benchmark", "gsm8k", "--max-thinking", "8", "--out", str(out)]
    answer = ["--max-answer", "8"]
    r = s1kit(*base, *answer, "--limit", "4")
    assert r.returncode == 0, r.stderr
    assert summary_n(out) == [4]
    before = snapshot(out)
    for flags, named in [(["--max-answer", "16"], "--max-answer"),
                         ([*answer, "--answer-prefix", "Answer:"], "--answer-prefix"),
                         ([*answer, "--format", "r1"], "--format"), ([*answer, "--temperature", "0.7"], "--temperature")]:
        line = error_line(s1kit(*base, "--limit", "4", *flags))
        assert named in line and "--out" in line, line  # names the differing flag and how to start afresh
        assert snapshot(out) == before
    # fewer items: nothing is generated and the summary covers exactly the 2 asked for
    r = s1kit(*base, *answer, "--limit", "2")
    assert r.returncode == 0, r.stderr
    assert summary_n(out) == [2] and (out / "samples.jsonl").read_bytes() == before["samples.jsonl"]
    # more items: the run is extended by the missing one only
    r = s1kit(*base, *answer, "--limit", "5")
    assert r.returncode == 0, r.stderr
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert summary_n(out) == [5] and len(lines) == 5
    assert "\n".join(lines[:4]) + "\n" == before["samples.jsonl"].decode()
    # report reads everything from the record
    r = s1kit("report", str(out))
    assert r.returncode == 0 and summary_n(out) == [5], r.stderr


# ------------------------------------------------------------------ 3. one writer per run directory


def test_a_second_eval_into_the_same_directory_is_refused(engine, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--benchmark", "gsm8k", "--limit", "2", "--max-thinking", "16", "--max-answer", "8",
            "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "s1kit.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (
            (out / ".lock").exists() and (out / ".lock").read_text().strip() or (out / "samples.jsonl").exists()):
        time.sleep(0.05)
    second = s1kit(*args)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    line = error_line(second)
    assert "in use" in line and "--out" in line, line
    keys = [(rec["setting"], rec["item_id"], rec["sample"])
            for rec in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 2


# ------------------------------------------------------------------ 4. samples stored as each row finishes


def test_samples_are_stored_as_each_row_finishes(engine, tmp_path):
    # One batch (the default --batch-size 16) whose rows end far apart: a cap of 8 thinking tokens, and exactly 96.
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "s1kit.cli", "eval", "--benchmark", "gsm8k", "--limit", "2",
                          "--max-thinking", "8,96", "--min-thinking", "0,96", "--max-answer", "8", "--out", str(out)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = out / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (store.exists() and store.read_text().strip()):
        time.sleep(0.05)
    time.sleep(0.5)  # a chunk's rows are all written within microseconds of each other
    p.send_signal(signal.SIGKILL)
    p.wait()
    kept = store.read_text().count("\n") if store.exists() else 0
    assert 0 < kept < 6  # the short rows are kept, the long ones were still running


# ------------------------------------------------------------------ clear errors, nothing written


def _eval(tmp_path, *args):
    return ["eval", "--benchmark", "gsm8k", "--limit", "2", "--max-answer", "8", *args]


@pytest.mark.parametrize("args, needles", [
    (["--min-thinking", "50", "--max-thinking", "10"], ["--min-thinking", "--max-thinking"]),
    (["--max-answer", "0"], ["--max-answer must be >= 1"]),
    (["--wait-string", "", "--waits", "1"], ["--wait-string"]),
    (["--samples", "0"], ["--samples"]),
    (["--limit", "abc"], ["--limit"]),
    (["--model", "/nonexistent"], ["unknown model '/nonexistent'"]),
])
def test_eval_bad_flags_are_one_line_and_write_nothing(tmp_path, args, needles):
    out = tmp_path / "run"
    line = error_line(s1kit(*_eval(tmp_path), *args, "--out", str(out)))
    assert all(n in line for n in needles), line
    assert "max_answer_tokens" not in line and "wait_strings" not in line
    assert not out.exists()  # e.g. a wrong --model leaves no config.json that would refuse the corrected rerun


def test_out_naming_a_file_or_a_broken_record_is_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("mine\n")
    line = error_line(s1kit(*_eval(tmp_path), "--out", str(path)))
    assert "--out" in line and str(path) in line and path.read_text() == "mine\n"
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"model": "smollm2-135m", "bench')  # cut short
    before = snapshot(out)
    for cmd in (_eval(tmp_path, "--out", str(out)), ["report", str(out)], ["report", "--regrade", str(out)]):
        line = error_line(s1kit(*cmd))
        assert str(out / "config.json") in line, line
        assert snapshot(out) == before


def test_generate_speaks_in_flags(engine):
    for args, needle in [(["--max-answer", "0"], "--max-answer must be >= 1"),
                         (["--wait-string", "", "--waits", "1"], "--wait-string"),
                         (["--min-thinking", "64", "--max-thinking", "32"], "--min-thinking (64) exceeds --max-thinking (32)")]:
        line = error_line(s1kit("generate", *args, "x"))
        assert needle in line and "_tokens" not in line and "wait_strings" not in line, line


def test_curate_names_the_question_field(engine, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "solution": f"It is \\boxed{{{2 * i}}}."})
                            + "\n" for i in range(3)))
    out = tmp_path / "s1k.jsonl"
    common = ["curate", "--pool", str(pool), "--size", "2", "--decontaminate", "none", "--out", str(out)]
    line = error_line(s1kit(*common))
    assert "--question-field" in line and str(pool) in line, line
    assert not out.exists()
    r = s1kit(*common, "--question-field", "prompt")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all(row["question"].startswith("What is") for row in rows)
