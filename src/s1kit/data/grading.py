"""Answer extraction and grading: math-verify for math, the letter for multiple choice.

math-verify bounds its own time with ``signal.alarm``, which only works on a main thread. ``Grader``
runs the symbolic checks in worker processes (where each check runs on the worker's main thread, so
those bounds hold) and bounds each result again from outside; exact matches never leave this process.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
import threading
from typing import Sequence, Union

from .benchmarks import last_boxed

# Bumped whenever a change to extraction or grading can change a grade; sweeps record it, and a rerun into a run
# graded by another version is refused until ``s1kit report --regrade`` grades its samples again.
# 1: math-verify + extraction rules; 2: list-valued golds (any listed answer is right).
GRADER_VERSION = 2

Gold = Union[str, Sequence[str]]  # one answer, or several acceptable ones (a list-valued answer field)

_ANSWER_MARK = re.compile(r"(?:final\s+answer|answer)\s*(?:is)?\s*[:：]?", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_NUMERIC_GOLD = re.compile(r"^-?[\d,]*\.?\d+$")


def extract_answer(text: str, numeric: bool = False) -> str:
    """The answer in ``text`` (the part after the answer opener): the last ``\\boxed{}``; else what follows
    the last "Final Answer:"/"Answer:"; for numeric golds, the last number of that."""
    boxed = last_boxed(text)
    if boxed is not None:
        found = boxed
    else:
        marks = list(_ANSWER_MARK.finditer(text))
        found = text[marks[-1].end():] if marks else text
        found = found.strip().split("\n")[0].strip() if found.strip() else ""
    if numeric:
        cleaned = found.replace("$", "").replace("\\!", "").strip().rstrip(".")
        if not _NUMERIC_GOLD.match(cleaned.replace(" ", "")):
            nums = _NUMBER.findall(found) or _NUMBER.findall(text)
            return nums[-1].replace(",", "") if nums else found
        return cleaned.replace(",", "").replace(" ", "")
    return found.strip().strip("$").strip().rstrip(".").strip()


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The chosen letter among ``letters`` ("B", "(B)", "B) ...", "answer is B"), if any."""
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    marks = list(_ANSWER_MARK.finditer(text))
    tail = text[marks[-1].end():] if marks else text
    for candidate in (tail, text):
        m = re.search(rf"(?<![A-Za-z])\(?([{letters}])\)?(?![A-Za-z])", candidate.strip())
        if m:
            return m.group(1)
    return None


def normalize(s: str) -> str:
    """Cheap canonical form for exact-match checks (spacing, $, \\left/\\right, \\text, trailing dot)."""
    s = s.strip().strip("$").strip()
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("dfrac", "frac"), ("tfrac", "frac"),
                 ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _NUMERIC_GOLD.match(s):
        s = s.replace(",", "")
    return s


def _symbolic(pred: str, gold: str, timeout: int | None) -> bool:
    from math_verify import parse, verify

    on_main = threading.current_thread() is threading.main_thread()
    t = timeout if on_main else None  # signal-based timeouts fail off the main thread
    g = parse(f"${gold}$", parsing_timeout=t)
    p = parse(f"${pred}$", parsing_timeout=t) or parse(pred, parsing_timeout=t)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=t))


def golds_of(gold: Gold) -> tuple[str, ...]:
    """The acceptable answers of a gold: itself, or each entry of a list."""
    return (gold,) if isinstance(gold, str) else tuple(gold)


def grade(prediction: str, gold: Gold, kind: str = "math", timeout: int | None = 5) -> bool:
    """Is ``prediction`` (an extracted answer, or a choice text for ``mc``) equal to ``gold`` (or to any answer of
    a list of golds)?"""
    if not isinstance(gold, str):
        return any(grade(prediction, g, kind, timeout) for g in gold)
    if kind == "mc":
        return extract_choice(prediction) == gold.strip().upper()
    if kind != "math":
        raise ValueError(f"unknown answer kind {kind!r} (math or mc)")
    if not prediction.strip():
        return False
    if normalize(prediction) == normalize(gold):
        return True
    try:
        return _symbolic(prediction, gold, timeout)
    except Exception:  # a malformed expression is a wrong answer, never a crash
        return False


def _grade_args(args: tuple[str, Gold, str, int | None]) -> bool:
    return grade(*args)


class Grader:
    """Grades many answers: exact matches in-process, symbolic checks over worker processes, each bounded."""

    def __init__(self, workers: int | None = None, timeout: int = 5, pool_threshold: int = 8) -> None:
        self.workers = workers or min(4, mp.cpu_count())
        self.timeout = timeout
        self.pool_threshold = pool_threshold
        self._pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _ensure_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self._pool

    def grade_many(self, predictions: Sequence[str], golds: Sequence[Gold], kinds: Sequence[str]) -> list[bool]:
        """Grades for aligned lists of extracted predictions, golds (one answer or a list of them) and kinds."""
        out: list[bool | None] = []
        hard: list[int] = []
        for i, (p, g, k) in enumerate(zip(predictions, golds, kinds)):
            if k == "mc" or not p.strip() or any(normalize(p) == normalize(x) for x in golds_of(g)):
                out.append(grade(p, g, k))
            else:
                out.append(None)
                hard.append(i)
        # Off the main thread (an engine's completion callback) math-verify cannot bound its own time: use the pool.
        if not hard or len(hard) < self.pool_threshold and threading.current_thread() is threading.main_thread():
            for i in hard:
                out[i] = grade(predictions[i], golds[i], kinds[i], self.timeout)
            return [bool(x) for x in out]
        pool = self._ensure_pool()
        futures = {i: pool.submit(_grade_args, (predictions[i], golds[i], kinds[i], self.timeout)) for i in hard}
        for i, fut in futures.items():
            try:
                out[i] = fut.result(timeout=self.timeout * 3 + 10)
            except Exception:  # a hung or crashed check grades as wrong
                out[i] = False
        return [bool(x) for x in out]
