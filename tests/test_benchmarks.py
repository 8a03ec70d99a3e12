"""Benchmark loading: offline registry, local files in common schemas, multiple choice, clear errors."""

import csv
import json
import time
from types import SimpleNamespace

import pytest

from s1kit import S1KitError
from s1kit.data.benchmarks import REGISTRY, last_boxed, load_benchmark


@pytest.mark.parametrize("name, size", [("math500", 500), ("math", 5000), ("gsm8k", 1319), ("champ", 270)])
def test_offline_registry(name, size):
    bench = load_benchmark(name)
    assert len(bench.items) == size
    assert len({it.id for it in bench.items}) == size
    assert all(it.question and it.gold for it in bench.items)


def test_known_items():
    gsm = load_benchmark("gsm8k", limit=1).items[0]
    assert gsm.question.startswith("Janet") and gsm.gold == "18"
    m5 = load_benchmark("math500", limit=1).items[0]
    assert m5.gold == "\\left( 3, \\frac{\\pi}{2} \\right)" and m5.meta["subject"] == "Precalculus"
    assert len(load_benchmark("math", limit=7).items) == 7


def test_hub_benchmarks_fail_clearly_offline(monkeypatch):
    assert {"aime24", "aime25", "gpqa-diamond", "math500-hf", "gsm8k-hf"} <= REGISTRY.keys()
    # The Hub client retries a connection that fails 5 times, waiting 1 + 2 + 4 + 8 + 8 s between tries: the tries
    # still happen, without the 23 s of waiting.
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None}))
    with pytest.raises(S1KitError, match="aime24|Hugging Face|datasets"):
        load_benchmark("aime24")


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("no box") is None


def test_local_aime_schema_jsonl(tmp_path):
    path = tmp_path / "aime.jsonl"
    rows = [{"id": 60, "problem": "Find 2+3.", "answer": "5", "solution": "It is \\boxed{5}."},
            {"id": 61, "problem": "Find 2*3.", "answer": "6", "solution": "\\boxed{6}"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bench = load_benchmark(str(path))
    assert bench.name == "aime" and [(it.id, it.gold) for it in bench.items] == [("60", "5"), ("61", "6")]


def test_gold_from_solution_and_gsm8k_marker_and_overrides(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"Question": "q1", "solution": "so \\boxed{\\sqrt{2}}"}) + "\n"
                    + json.dumps({"question": "q2", "answer": "steps\n#### 1,234"}) + "\n")
    items = load_benchmark(str(path)).items
    assert [it.gold for it in items] == ["\\sqrt{2}", "1234"]
    csv_path = tmp_path / "custom.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt_text", "target"])
        w.writeheader()
        w.writerow({"prompt_text": "What is 1+1?", "target": "2"})
    items = load_benchmark(str(csv_path), question_field="prompt_text", answer_field="target").items
    assert items[0].question == "What is 1+1?" and items[0].gold == "2"


def test_gpqa_style_multiple_choice_is_shuffled_with_a_seed(tmp_path):
    path = tmp_path / "gpqa.json"
    rows = [{"Question": f"Q{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": "w1",
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(12)]
    path.write_text(json.dumps(rows))
    a = load_benchmark(str(path), seed=0).items
    b = load_benchmark(str(path), seed=0).items
    c = load_benchmark(str(path), seed=1).items
    assert [it.question for it in a] == [it.question for it in b]
    assert [it.gold for it in a] != [it.gold for it in c]
    assert len({it.gold for it in a}) > 1  # the correct option lands on different letters
    for it in a:
        assert it.kind == "mc" and f"{it.gold}) right" in it.question
        assert all(f"{L}) " in it.question for L in "ABCD")


@pytest.mark.parametrize("content, suffix, message", [
    ('{"problem": "a", "answer": "1"}\n{broken\n', ".jsonl", ":2: not valid JSON"),
    ('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n', ".jsonl", ":2: missing answer field"),
    ('{"answer": "1"}\n', ".jsonl", ":1: missing question field"),
    ("", ".jsonl", "empty file"),
    ("[1, 2]", ".json", ":1: expected a JSON object"),
    ("a,b\n", ".txt", "unsupported file type"),
])
def test_malformed_files_name_the_file_and_record(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(S1KitError, match=message) as e:
        load_benchmark(str(path))
    assert str(path) in str(e.value)


def test_unknown_benchmark_and_bad_limit():
    with pytest.raises(S1KitError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")
    with pytest.raises(S1KitError, match="limit must be >= 1"):
        load_benchmark("gsm8k", limit=0)


def test_list_valued_answers_keep_every_listed_gold(tmp_path):
    # OlympiadBench stores "final_answer": ["2"]; some sets list several acceptable answers
    path = tmp_path / "olympiad.jsonl"
    rows = [{"question": "q1", "final_answer": ["2"]}, {"question": "q2", "final_answer": ["$x=1$", " 1 "]},
            {"question": "q3", "final_answer": 7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_benchmark(str(path), answer_field="final_answer").items
    assert [it.gold for it in items] == [("2",), ("$x=1$", "1"), "7"]


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "answer": []}, ":1: answer field 'answer' is an empty list"),
    ({"question": "q", "answer": {"value": 2}}, ":1: answer field 'answer' holds an object"),
    ({"question": "q", "answer": [["2"]]}, ":1: answer field 'answer' holds a nested list"),
    ({"question": ["q"], "answer": "2"}, ":1: question field 'question' is not text"),
])
def test_answer_and_question_values_that_cannot_be_graded_are_refused(tmp_path, record, message):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(S1KitError, match=message):
        load_benchmark(str(path))


def test_errors_name_library_parameters_not_flags(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "q", "target": "1"}) + "\n")
    with pytest.raises(S1KitError, match="set question_field") as e:
        load_benchmark(str(path))
    assert "--" not in str(e.value)
    with pytest.raises(S1KitError, match="set answer_field"):
        load_benchmark(str(path), question_field="prompt")
