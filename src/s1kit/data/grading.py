"""Answer extraction and grading: math-verify for math, the letter for multiple choice.

An answer identical to the gold (up to spacing, ``$``, ``\\left``/``\\right`` and such) is always right. Answers
with structure are compared by their structure, each element by math-verify: a list or set of solutions
(``1, 3, 5``, ``\\{1,2\\}``, ``x=2, y=3``) as a set, where order carries no meaning; a tuple or point (``(6,5)``)
element by element in order; an interval (``[2,5)``, ``(-\\infty,-5)``) with its ends, open or closed; a union of
intervals as the set of its pieces.

math-verify bounds its own time with ``signal.alarm``, which only works on a main thread. ``Grader``
runs the symbolic checks in worker processes (where each check runs on the worker's main thread, so
those bounds hold) and bounds each result again from outside; exact matches never leave this process.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
import threading
from dataclasses import dataclass
from typing import Sequence, Union

from .benchmarks import last_boxed

# Bumped whenever a change to extraction or grading can change a grade; sweeps record it, and a rerun into a run
# graded by another version is refused until ``s1kit report --regrade`` grades its samples again.
# 1: math-verify + extraction rules; 2: list-valued golds (any listed answer is right); 3: structured answers (lists
# and sets of solutions as sets, tuples in order, intervals with their ends; a comma is a thousands separator only in
# 1,234,567 form: "1,3,5" is no longer 135), \\( \\) and \\[ \\] around an answer.
GRADER_VERSION = 3

Gold = Union[str, Sequence[str]]  # one answer, or several acceptable ones (a list-valued answer field)

_ANSWER_MARK = re.compile(r"(?:final\s+answer|answer)\s*(?:is)?\s*[:：]?", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_NUMERIC_GOLD = re.compile(r"^-?[\d,]*\.?\d+$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")  # 1,234,567.5: one number
_NUMBER_LIST = re.compile(r"^-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)+$")  # 1, 3, 5: several
_MATH_DELIMS = re.compile(r"^\\\((.*)\\\)$|^\\\[(.*)\\\]$", re.DOTALL)


def _unwrap(s: str) -> str:
    """``s`` without surrounding ``$``/``$$``, ``\\( \\)`` or ``\\[ \\]``."""
    s = s.strip()
    while True:
        inner = s.strip("$").strip()
        m = _MATH_DELIMS.match(inner)
        if m:
            inner = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        if inner == s:
            return s
        s = inner


def extract_answer(text: str, numeric: bool = False) -> str:
    """The answer in ``text`` (the part after the answer opener): the last ``\\boxed{}``; else what follows
    the last "Final Answer:"/"Answer:"; for numeric golds, the last number of that (a list of numbers stays a
    list: ``1, 3, 5`` is three solutions)."""
    boxed = last_boxed(text)
    if boxed is not None:
        found = boxed
    else:
        marks = list(_ANSWER_MARK.finditer(text))
        found = text[marks[-1].end():] if marks else text
        found = found.strip().split("\n")[0].strip() if found.strip() else ""
    found = _unwrap(found)
    if numeric:
        cleaned = _unwrap(found.replace("\\!", "").strip().rstrip(".").strip())
        if _NUMBER_LIST.match(cleaned) and not _THOUSANDS.match(cleaned):
            return cleaned
        if not _NUMERIC_GOLD.match(cleaned.replace(" ", "")):
            nums = _NUMBER.findall(found) or _NUMBER.findall(text)
            return nums[-1].replace(",", "") if nums else found
        return cleaned.replace(",", "").replace(" ", "")
    return _unwrap(found.strip().rstrip(".").strip())


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


_UNICODE = (("\u2212", "-"), ("\u2013", "-"), ("\u221e", "\\infty"), ("\u222a", "\\cup"), ("\u2264", "\\le"),
            ("\u2265", "\\ge"), ("\u00b7", "\\cdot"), ("\u00d7", "\\times"), ("\u221a", "\\sqrt"), ("\u03c0", "\\pi"))


def normalize(s: str) -> str:
    """Cheap canonical form for exact-match checks (spacing, $, \\( \\), \\left/\\right, \\text, trailing dot, a
    thousands separator; Unicode minus, infinity and union as LaTeX)."""
    s = _unwrap(s)
    for a, b in _UNICODE:
        s = s.replace(a, b)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                 ("\\quad", ""), ("\\ ", ""), ("dfrac", "frac"), ("tfrac", "frac"), ("\\displaystyle", ""),
                 ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("\\infin", "\\infty")):
        s = s.replace(a, b)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


# -- answers with structure ------------------------------------------------------------------------------------

_OPEN, _CLOSE = "([{", ")]}"
_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![a-zA-Z])")
_SEPARATORS = re.compile(r"\\text\{\s*(?:and|or)\s*\}|\\(?:quad|qquad)\b|;|\band\b")


@dataclass(frozen=True)
class _Shape:
    """An answer's structure: ``kind`` is ``set`` (order carries no meaning: a list or set of solutions, or the pieces
    of a union), ``seq`` (a tuple, point or interval: its brackets and elements in order) or ``atom``."""

    kind: str
    items: tuple  # of _Shape (set, seq) or the text (atom)
    brackets: str = ""  # seq: its opening and closing bracket, e.g. "[)"


def _top_level_split(s: str, sep: re.Pattern | str) -> list[str]:
    """``s`` split at ``sep`` (a character or a pattern) outside brackets and braces (``[2,5)`` counts as one)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(depth - 1, 0)
        elif depth == 0:
            if isinstance(sep, str):
                if s.startswith(sep, i):
                    parts.append(s[start:i])
                    i += len(sep)
                    start = i
                    continue
            else:
                m = sep.match(s, i)
                if m and m.end() > i:
                    parts.append(s[start:i])
                    i = start = m.end()
                    continue
        i += 1
    parts.append(s[start:])
    return parts


def _balanced_inside(s: str) -> bool:
    """Whether the first character's bracket closes at the last character (``(1,2)`` yes, ``(1)+(2)`` no)."""
    depth = 0
    for i, c in enumerate(s):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                return False
    return depth == 0


def _shape(text: str) -> _Shape:
    """The structure of an answer (LaTeX, already unwrapped of ``$``)."""
    s = text.strip()
    for a, b in _UNICODE:
        s = s.replace(a, b)
    for a in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\displaystyle", "\\$", "\\%"):
        s = s.replace(a, "")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r" \1 ", s)
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s.strip()).strip().rstrip(".").strip()  # "x \in [-2,7]"
    pieces = [p.strip() for p in _top_level_split(s, "\\cup")]
    if len(pieces) > 1 and all(pieces):
        return _Shape("set", tuple(_piece(p) for p in pieces))
    if s.startswith("\\{") and s.endswith("\\}") and _balanced_inside(s[1:]):
        return _set(_shape(p) for p in _top_level_split(s[2:-2], ",") if p.strip())
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _balanced_inside(s):
        inner = _top_level_split(s[1:-1], ",")
        if len(inner) > 1 and all(p.strip() for p in inner):
            return _Shape("seq", tuple(_shape(p) for p in inner), s[0] + s[-1])
    compact = re.sub(r"\s+", "", s)
    if _THOUSANDS.match(compact):
        return _Shape("atom", (s,))
    parts = [p for q in _top_level_split(s, _SEPARATORS) for p in _top_level_split(q, ",") if p.strip()]
    if len(parts) > 1:  # "1, 3, and 5": the empty piece between "," and "and" is no element
        return _set(_shape(p) for p in parts)
    signs = _top_level_split(s, _PLUS_MINUS)
    if len(signs) == 2:  # a \pm b: the two solutions a + b and a - b
        a, b = signs[0].strip(), signs[1].strip()
        return _Shape("set", (_Shape("atom", (f"{a}+{b}" if a else b,)), _Shape("atom", (f"{a}-{b}" if a else f"-{b}",))))
    return _Shape("atom", (s,))


def _set(elements) -> _Shape:
    """A set of these elements, the elements of a set among them taken in (``1 \\pm \\sqrt5, -2``: three)."""
    return _Shape("set", tuple(x for e in elements for x in (e.items if e.kind == "set" else (e,))))


def _piece(text: str) -> _Shape:
    """A piece of a union: an interval, a set, or one point (as a set of it)."""
    shape = _shape(text)
    return shape if shape.kind != "atom" else _Shape("set", (shape,))


def _flat(shape: _Shape) -> _Shape:
    """A set of one element is that element (``\\{5\\}`` and ``5``), a union of one piece is that piece."""
    while shape.kind == "set" and len(shape.items) == 1:
        shape = shape.items[0]
    return shape


def _same_shape(pred: _Shape, gold: _Shape, timeout: int | None) -> bool:
    pred, gold = _flat(pred), _flat(gold)
    if pred.kind != gold.kind:
        return False
    if gold.kind == "atom":
        return _same_atom(pred.items[0], gold.items[0], timeout)
    if gold.kind == "seq":
        return (pred.brackets == gold.brackets and len(pred.items) == len(gold.items)
                and all(_same_shape(p, g, timeout) for p, g in zip(pred.items, gold.items)))
    # sets: every gold element has an equal one among the prediction's, and every predicted one among the gold's
    return (all(any(_same_shape(p, g, timeout) for p in pred.items) for g in gold.items)
            and all(any(_same_shape(p, g, timeout) for g in gold.items) for p in pred.items))


def _same_atom(pred: str, gold: str, timeout: int | None) -> bool:
    if normalize(pred) == normalize(gold):
        return True
    try:
        return _symbolic(pred, gold, timeout)
    except Exception:  # a malformed expression is a wrong answer, never a crash
        return False


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
    a list of golds)? An answer identical to the gold always is; one with structure (a list, set, tuple, interval or
    union) is compared by its structure, element by element."""
    if not isinstance(gold, str):
        return any(grade(prediction, g, kind, timeout) for g in gold)
    if kind == "mc":
        return extract_choice(prediction) == gold.strip().upper()
    if kind != "math":
        raise ValueError(f"unknown answer kind {kind!r} (math or mc)")
    if not prediction.strip():
        return False
    if prediction.strip() == gold.strip() or normalize(prediction) == normalize(gold):
        return True
    try:
        p, g = _shape(_unwrap(prediction)), _shape(_unwrap(gold))
        if _flat(p).kind != "atom" or _flat(g).kind != "atom":
            return _same_shape(p, g, timeout)
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
