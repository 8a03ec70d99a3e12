"""The s1 paper's metrics on hand-computed examples."""

import math
import re

import pytest

from s1kit.evaluate.metrics import (control, majority_accuracy, mcnemar_exact, paired_outcomes, performance, scaling,
                                    summarize, wilson_ci)


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


def test_wilson_interval_on_hand_computed_values():
    # Wilson (1927) at z = 1.959964: 30 of 100 -> (0.2189, 0.3958); 4 of 48 -> (0.0329, 0.1955)
    assert wilson_ci([True] * 30 + [False] * 70) == pytest.approx((0.21895, 0.39585), abs=5e-5)
    assert wilson_ci([True] * 4 + [False] * 44) == pytest.approx((0.03288, 0.19553), abs=5e-5)
    # 0 of n and n of n: the interval is not empty (the percentile bootstrap printed 0.0%-0.0% for 0 of 6)
    lo, hi = wilson_ci([False] * 6)
    assert lo == 0.0 and hi == pytest.approx(0.39033, abs=5e-5)
    lo, hi = wilson_ci([True] * 5)
    assert hi == 1.0 and lo == pytest.approx(0.56552, abs=5e-5)
    assert wilson_ci([True] * 30 + [False] * 70, level=0.99)[0] < 0.2189
    assert all(math.isnan(x) for x in wilson_ci([]))
    with pytest.raises(ValueError, match="level must be in"):
        wilson_ci([True], level=1.0)


def test_mcnemar_exact_counts_the_discordant_pairs():
    # b = 3, c = 1: p = 2 * P(X <= 1), X ~ Binomial(4, 1/2) = 2 * 5/16
    assert mcnemar_exact([1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1]) == \
        {"pairs": 6, "first_only": 3, "second_only": 1, "p_value": 0.625}
    assert mcnemar_exact([1] * 10, [0] * 10)["p_value"] == pytest.approx(2 / 2 ** 10)
    assert mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0  # no discordant pair: no evidence either way
    assert mcnemar_exact([1, 0, 1], [0, 1, 1])["p_value"] == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([1], [1, 0])
    first = [{"item_id": "a", "sample": 0, "correct": True}, {"item_id": "b", "sample": 0, "correct": False}]
    second = [{"item_id": "b", "sample": 0, "correct": True}, {"item_id": "c", "sample": 0, "correct": True}]
    assert paired_outcomes(first, second) == ([False], [True])  # only the item both graded


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
    assert (s["ci_low"], s["ci_high"]) == wilson_ci([True, False, True, False])
    assert "majority_accuracy" not in s


def test_report_compares_settings_on_the_same_items_and_escapes_pipes(tmp_path):
    from s1kit.budget import BudgetPolicy, EarlyExit
    from s1kit.evaluate.report import build_summary, render_markdown
    from s1kit.evaluate.sweep import Setting

    cap = Setting("budget", "max=64", BudgetPolicy(max_thinking_tokens=64), hi=64)
    big = Setting("budget", "max=256", BudgetPolicy(max_thinking_tokens=256), hi=256)
    ee = Setting("early-exit", "words=Wait|So|Therefore", BudgetPolicy(
        max_thinking_tokens=256, early_exit=EarlyExit(words=("Wait", "So", "Therefore"))), hi=256)

    def recs(setting, right, thinking):
        return [{"setting": setting.key, "item_id": str(i), "sample": 0, "correct": r, "thinking_tokens": thinking,
                 "answer_tokens": 3, "hit_cap": False, "waits_used": 0, "prediction": "x"} for i, r in enumerate(right)]

    records = (recs(cap, [0, 0, 0, 0, 0, 0], 60) + recs(big, [1, 1, 1, 1, 1, 0], 200)
               + recs(ee, [1, 0, 1, 0, 1, 0], 150))
    summary = build_summary(records, [cap, big, ee])
    assert summary["ci_method"] == "Wilson score interval"
    (pair,) = [c for c in summary["comparisons"] if c["method"] == "budget"]
    assert pair == {"method": "budget", "first": cap.key, "second": big.key, "pairs": 6, "first_only": 0,
                    "second_only": 5, "p_value": 0.0625}
    assert not [c for c in summary["comparisons"] if c["method"] == "early-exit"]  # one setting: nothing to pair
    row = next(r for r in summary["settings"] if r["setting"] == cap.key)
    assert row["ci_low"] == 0.0 and row["ci_high"] > 0.35  # 0 of 6 is not "0.0-0.0"
    md = render_markdown(summary)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert "| budget | budget:max=64 | budget:max=256 | 6 | 0 | 5 | 0.062 |" in table
    assert "95% CI (Wilson)" in md and "| budget:max=64 | 0.0 | 0.0–39.0 |" in md
    # the early-exit label's pipes are escaped: every row of the settings table has as many cells as its header
    ee_row = next(line for line in table if "Wait" in line)
    assert "words=Wait\\|So\\|Therefore" in ee_row
    header = table[0]
    cells = lambda line: len(re.split(r"(?<!\\)\|", line))  # noqa: E731
    assert cells(ee_row) == cells(header)
