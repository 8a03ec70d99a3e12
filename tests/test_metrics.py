"""The s1 paper's metrics on hand-computed examples."""

import math

import pytest

from s1kit.evaluate.metrics import bootstrap_ci, control, majority_accuracy, performance, scaling, summarize


def test_scaling_is_the_mean_pairwise_slope():
    pts = [(100, 0.2), (200, 0.3), (400, 0.3)]
    # slopes: (0.3-0.2)/100 = 1e-3, (0.3-0.2)/300 = 3.33e-4, (0.3-0.3)/200 = 0
    assert scaling(pts) == pytest.approx((1e-3 + 1e-3 / 3 + 0) / 3)
    assert scaling([(100, 0.5)]) is None
    assert scaling([(100, 0.9), (200, 0.5)]) == pytest.approx(-0.4 / 100)


def test_control_and_performance():
    assert control([(50, 0, 64), (70, 0, 64), (10, 16, None), (20, 16, None)]) == 0.5
    assert control([(64, 0, 64), (16, 16, None)]) == 1.0  # bounds are inclusive
    assert performance([(1, 0.2), (2, 0.7), (3, 0.5)]) == 0.7


def test_bootstrap_ci_brackets_the_mean():
    lo, hi = bootstrap_ci([True] * 30 + [False] * 70)
    assert lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert bootstrap_ci([True] * 5) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_majority_vote():
    recs = [
        {"item_id": "a", "sample": 0, "prediction": "3", "correct": False},
        {"item_id": "a", "sample": 1, "prediction": "4", "correct": True},
        {"item_id": "a", "sample": 2, "prediction": "4", "correct": True},
        {"item_id": "b", "sample": 0, "prediction": "7", "correct": False},
        {"item_id": "b", "sample": 1, "prediction": "8", "correct": True},  # tie: the earliest sample wins
    ]
    assert majority_accuracy(recs) == 0.5


def test_summarize_counts_per_sample_control():
    recs = [{"item_id": str(i), "sample": 0, "correct": i % 2 == 0, "thinking_tokens": t, "answer_tokens": 3,
             "hit_cap": t == 64, "waits_used": 0, "prediction": "x"} for i, t in enumerate([10, 64, 70, 30])]
    s = summarize(recs, lo=0, hi=64)
    assert s["accuracy"] == 0.5 and s["control"] == 0.75 and s["mean_thinking_tokens"] == 43.5
    assert "majority_accuracy" not in s
