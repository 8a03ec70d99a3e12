"""Metrics of the s1 paper (§3.2) and the usual accuracy statistics.

For runs at different compute levels, with a = mean thinking tokens of a run and f(a) its accuracy:
Control = fraction of runs with a_min <= a <= a_max; Scaling = mean over pairs b > a of
(f(b) - f(a)) / (b - a), in accuracy (a fraction) per thinking token; Performance = max f(a).
Accuracy intervals are Wilson score intervals; two settings are compared on the same items by McNemar's exact test.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from statistics import NormalDist
from typing import Sequence

import numpy as np

SCALING_UNIT = "accuracy (fraction correct) per thinking token"


CI_METHOD = "Wilson score interval"


def wilson_ci(correct: Sequence[bool], level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the fraction of true outcomes: never empty at 0 or n of n (0 of 6: 0%-39%, where the
    percentile bootstrap gave 0%-0%); NaN for no outcomes."""
    n = len(correct)
    if n == 0:
        return (float("nan"), float("nan"))
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    k = sum(bool(c) for c in correct)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """McNemar's exact test on paired outcomes (the same items under two settings): the discordant pairs
    (``first_only`` right under the first setting alone, ``second_only`` under the second alone) and the two-sided
    p-value of a binomial(first_only + second_only, 1/2) test that neither setting is better."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths, got {len(first)} and {len(second)}")
    b = sum(bool(x) and not bool(y) for x, y in zip(first, second))
    c = sum(bool(y) and not bool(x) for x, y in zip(first, second))
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n if n else 1.0
    return {"pairs": len(first), "first_only": b, "second_only": c, "p_value": min(1.0, 2 * tail)}


def in_bounds(a: float, lo: float, hi: float | None) -> bool:
    """Is ``a`` within [lo, hi] (hi None: no upper bound)?"""
    return a >= lo and (hi is None or a <= hi)


def control(points: Sequence[tuple[float, float, float | None]]) -> float:
    """Fraction of (a, a_min, a_max) runs whose thinking stays within its bounds."""
    return sum(in_bounds(a, lo, hi) for a, lo, hi in points) / len(points) if points else float("nan")


def scaling(points: Sequence[tuple[float, float]]) -> float | None:
    """Mean slope of accuracy over thinking tokens across all pairs of runs (None with < 2 distinct a)."""
    pts = sorted(points)
    slopes = [(fb - fa) / (b - a) for (a, fa), (b, fb) in itertools.combinations(pts, 2) if b > a]
    return float(np.mean(slopes)) if slopes else None


def performance(points: Sequence[tuple[float, float]]) -> float:
    """Best accuracy over the runs."""
    return max(f for _, f in points) if points else float("nan")


def majority_accuracy(records: Sequence[dict]) -> float:
    """Accuracy of the most common prediction per item (ties: the earliest sample's)."""
    by_item: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_item[r["item_id"]].append(r)
    hits = 0
    for recs in by_item.values():
        recs.sort(key=lambda r: r["sample"])
        counts = Counter(r["prediction"] for r in recs if r["prediction"])
        if not counts:
            continue
        top = max(counts.values())
        winner = next(r for r in recs if r["prediction"] and counts[r["prediction"]] == top)
        hits += bool(winner["correct"])
    return hits / len(by_item) if by_item else float("nan")


def summarize(records: Sequence[dict], lo: int = 0, hi: int | None = None) -> dict:
    """Accuracy (with its 95% Wilson interval), thinking statistics and per-sample control of one setting."""
    correct = [bool(r["correct"]) for r in records]
    thinking = [r["thinking_tokens"] for r in records]
    ci_low, ci_high = wilson_ci(correct)
    out = {
        "n": len(records),
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "mean_thinking_tokens": float(np.mean(thinking)) if thinking else float("nan"),
        "mean_answer_tokens": float(np.mean([r["answer_tokens"] for r in records])) if records else float("nan"),
        "control": float(np.mean([in_bounds(t, lo, hi) for t in thinking])) if thinking else float("nan"),
        "hit_cap_rate": float(np.mean([r["hit_cap"] for r in records])) if records else float("nan"),
        "mean_waits": float(np.mean([r["waits_used"] for r in records])) if records else float("nan"),
        "graded_from_thinking": sum(r.get("graded") == "thinking" for r in records),
    }
    if any("probe_tokens" in r for r in records):  # records from before early exit have neither field
        out["mean_probe_tokens"] = float(np.mean([r.get("probe_tokens", 0) for r in records]))
        out["early_exit_rate"] = float(np.mean([bool(r.get("early_exit")) for r in records]))
    if len({r["sample"] for r in records}) > 1:
        out["majority_accuracy"] = majority_accuracy(records)
    return out


def method_metrics(rows: Sequence[dict]) -> dict:
    """Control / Scaling / Performance over the settings (summary rows) of one method."""
    pts = [(r["mean_thinking_tokens"], r["accuracy"]) for r in rows]
    return {
        "control": control([(r["mean_thinking_tokens"], r["lo"], r["hi"]) for r in rows]),
        "scaling": scaling(pts),
        "performance": performance(pts),
        "settings": len(rows),
    }


def paired_outcomes(first: Sequence[dict], second: Sequence[dict]) -> tuple[list[bool], list[bool]]:
    """The outcomes of the samples both settings graded (the same item and sample index), in one order."""
    a = {(r["item_id"], r["sample"]): bool(r["correct"]) for r in first}
    b = {(r["item_id"], r["sample"]): bool(r["correct"]) for r in second}
    shared = sorted(a.keys() & b.keys(), key=str)
    return [a[k] for k in shared], [b[k] for k in shared]
