"""Timing shared by the benchmark scripts (imported as ``_timing``: scripts run from this folder)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median wall seconds of ``reps`` calls of ``fn``, and the last call's result."""
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out
