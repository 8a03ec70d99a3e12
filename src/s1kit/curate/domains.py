"""Domains: label every question with a domain, so selection can spread over them (s1 §2.2).

s1 asked Claude for each question's Mathematics Subject Classification (MSC) two-digit code. Three
classifiers, all returning one label per row:
- ``LLMClassifier``: any engine, prompted with the MSC code list shipped as package data (``msc.json``);
- ``FieldClassifier``: an existing field (MATH's ``type``, MATH-500's ``subject``) taken verbatim;
- ``KeywordClassifier``: a keyword rule onto MSC codes, for rows that have no field, fully offline.
The first two fall back to the keyword rule where they have nothing to say, and count how often.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol, Sequence

import pyarrow as pa

from ..budget import BudgetPolicy
from ..engines.base import Engine, Request, SamplingParams
from ..formats import ThinkingFormat
from .generation import NamedEngine, Progress, cache_for, no_progress, run_cached
from .pool import as_table, parse_metadata
from .stage import StageReport, Timer, set_column

CLASSIFIER_POLICY = BudgetPolicy(max_thinking_tokens=64, answer_prefix="MSC code:", max_answer_tokens=8)
PROMPT_QUESTION_CHARS = 2000  # a code needs the gist, not a whole long problem


@lru_cache(maxsize=1)
def msc_codes() -> dict[str, str]:
    """MSC2020 top-level codes -> names (package data)."""
    text = resources.files("s1kit.curate").joinpath("msc.json").read_text(encoding="utf-8")
    return json.loads(text)["codes"]


def msc_label(code: str) -> str:
    """``"11"`` -> ``"11 Number theory"``."""
    return f"{code} {msc_codes()[code]}"


Labels = tuple[list[str], dict[str, int]]  # one label per row, and how the labels came about


class DomainClassifier(Protocol):
    """Labels the rows of a table with domains."""

    name: str

    def classify(self, table: pa.Table, workdir: Path | None = None, progress: Progress = no_progress) -> Labels:
        """One domain label per row, and counts of how they were found."""
        ...


# The keyword rule: MSC code -> words (a plural "s" is ignored) and phrases; the code with most hits wins,
# ties go to the earlier code here. Words are looked up in one dict, so a row costs one pass over its words.
_KEYWORDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "60": ("probability random randomly dice die coin flip marble odds", ("expected value",)),
    "05": ("arrange arrangement permutation combination committee subset pigeonhole tiling vertex vertices choose",
           ("how many ways", "how many different")),
    "11": ("prime divisor divisible remainder modulo mod pmod gcd lcm integer digit congruent congruence factorial",
           ("greatest common", "least common")),
    "51": ("triangle circle angle polygon rectangle perimeter area radius diameter tangent hexagon quadrilateral "
           "perpendicular parallel asy coordinate", ()),
    "12": ("polynomial root quadratic cubic coefficient", ("zeros of",)),
    "15": ("matrix matrices vector determinant eigenvalue eigenvector pmatrix bmatrix", ("linear transformation",)),
    "40": ("sequence series term progression", ("sum of the first",)),
    "26": ("derivative integral int lim continuous increasing decreasing inequality log logarithm",
           ("maximum value", "minimum value")),
    "30": ("imaginary", ("complex number",)),
    "39": ("recurrence", ("functional equation",)),
    "62": ("mean median mode deviation variance", ("data set",)),
    "34": ("", ("differential equation",)),
    "20": ("group subgroup isomorphism isomorphic homomorphism", ()),
    "03": ("knight knave logic truth", ()),
    "68": ("algorithm program programming computer binary", ()),
    "70": ("velocity acceleration force momentum friction pendulum kinetic projectile", ()),
    "78": ("electric magnetic charge capacitor lens wavelength photon voltage circuit", ()),
    "80": ("heat thermal entropy temperature", ("ideal gas",)),
    "81": ("quantum electron spin hamiltonian orbital", ()),
    "92": ("cell protein dna enzyme molecule chemical acid", ()),
    "91": ("dollar price cost profit earn salary discount interest money pay sell buy spend", ()),
    "90": ("maximize minimize maximise minimise optimal schedule", ()),
}
_WORD_CODE = {w: code for code, (ws, _) in reversed(_KEYWORDS.items()) for w in ws.split()}
_PHRASES = tuple((p, code) for code, (_, ps) in _KEYWORDS.items() for p in ps)
_ORDER = {code: i for i, code in enumerate(_KEYWORDS)}
_LETTERS = re.compile(r"[a-z]+")
DEFAULT_CODE = "97"  # nothing recognised: elementary problems, most often school word problems


def keyword_domain(question: str) -> str:
    """The MSC label whose keywords occur most often in ``question``."""
    text = question.lower()
    hits: Counter = Counter()
    for w in _LETTERS.findall(text):
        code = _WORD_CODE.get(w) or (_WORD_CODE.get(w[:-1]) if w.endswith("s") else None)
        if code:
            hits[code] += 1
    for phrase, code in _PHRASES:
        if phrase in text:
            hits[code] += 1
    hits = +hits  # drop zero counts
    if not hits:
        return msc_label(DEFAULT_CODE)
    return msc_label(max(hits, key=lambda code: (hits[code], -_ORDER[code])))


class KeywordClassifier:
    """MSC labels from a keyword rule: no model, no network."""

    name = "keyword"

    def classify(self, table: pa.Table, workdir: Path | None = None, progress: Progress = no_progress) -> Labels:
        """One MSC label per row."""
        labels = [keyword_domain(q) for q in table.column("question").to_pylist()]
        return labels, {"keyword rule": len(labels)}


class FieldClassifier:
    """The value of an existing field (a column or a metadata key), first of ``fields`` present."""

    def __init__(self, fields: Sequence[str], fallback: DomainClassifier | None = None) -> None:
        self.fields = tuple(fields)
        self.fallback = fallback or KeywordClassifier()
        self.name = "field:" + ",".join(self.fields)

    def classify(self, table: pa.Table, workdir: Path | None = None, progress: Progress = no_progress) -> Labels:
        """One label per row: the field's value, else the fallback's label."""
        columns = {f: table.column(f).to_pylist() for f in self.fields if f in table.column_names}
        metas = [parse_metadata(m) for m in table.column("metadata").to_pylist()]
        labels: list[str | None] = []
        counts: Counter = Counter()
        for i, meta in enumerate(metas):
            label = None
            for f in self.fields:
                v = columns[f][i] if f in columns else meta.get(f)
                if v not in (None, "") and not isinstance(v, (dict, list)):
                    label = str(v).strip()
                    counts[f"field {f}"] += 1
                    break
            labels.append(label)
        missing = [i for i, x in enumerate(labels) if x is None]
        if missing:
            sub, notes = self.fallback.classify(table.take(pa.array(missing, type=pa.int64())), workdir, progress)
            for i, label in zip(missing, sub):
                labels[i] = label
            counts.update({f"no field, {k}": v for k, v in notes.items()})
        return labels, dict(counts)


def classifier_prompt(question: str) -> str:
    """The classification prompt: the MSC list, the question, and a request for the code alone."""
    codes = "\n".join(f"{c} {n}" for c, n in msc_codes().items())
    q = question if len(question) <= PROMPT_QUESTION_CHARS else question[:PROMPT_QUESTION_CHARS] + " ..."
    return ("Classify the problem below by its Mathematics Subject Classification (MSC2020) top-level code.\n\n"
            f"Codes:\n{codes}\n\nProblem:\n{q}\n\nReply with the two-digit code only.")


def parse_code(*texts: str) -> str | None:
    """The first valid two-digit MSC code in ``texts`` (searched in order)."""
    codes = msc_codes()
    for text in texts:
        for m in re.finditer(r"(?<!\d)(\d{2})(?!\d)", text):
            if m.group(1) in codes:
                return m.group(1)
    return None


class LLMClassifier:
    """MSC labels from a language model through any engine; unparsable replies fall back to the keyword rule."""

    def __init__(self, engine: NamedEngine, policy: BudgetPolicy = CLASSIFIER_POLICY,
                 fmt: ThinkingFormat | str = "s1", fallback: DomainClassifier | None = None) -> None:
        self.engine = engine
        self.policy = policy
        self.fmt = fmt
        self.fallback = fallback or KeywordClassifier()
        self.name = f"llm:{engine.name}"

    def classify(self, table: pa.Table, workdir: Path | None = None, progress: Progress = no_progress) -> Labels:
        """One MSC label per row: the model's code, else the fallback's label."""
        uids = table.column("uid").to_pylist()
        questions = table.column("question").to_pylist()
        cache = cache_for(workdir, "domains", self.engine.name, {"policy": self.policy, "format": self.fmt, "prompt": 1})
        requests = [Request(classifier_prompt(q), self.policy, self.fmt, SamplingParams()) for q in questions]
        results = run_cached(self.engine, uids, requests, lambda _, c: {"code": parse_code(c.answer, c.thinking)},
                             cache, progress, "classifying domains")
        labels: list[str | None] = [msc_label(results[u]["code"]) if results[u]["code"] else None for u in uids]
        counts = {"model code": sum(x is not None for x in labels)}
        missing = [i for i, x in enumerate(labels) if x is None]
        if missing:
            sub, _ = self.fallback.classify(table.take(pa.array(missing, type=pa.int64())), workdir, progress)
            for i, label in zip(missing, sub):
                labels[i] = label
            counts[f"unparsable reply, {self.fallback.name}"] = len(missing)
        return labels, counts


def parse_classifier(spec: str, make_engine: Callable[[str], Engine | Callable[[], Engine]] | None = None) -> DomainClassifier:
    """``auto`` (subject/type field, else keywords), ``keyword``, ``field:NAME[,NAME]`` or ``llm:MODEL``."""
    kind, _, arg = spec.partition(":")
    if spec == "auto":
        return FieldClassifier(("subject", "type"))
    if spec == "keyword":
        return KeywordClassifier()
    if kind == "field" and arg.strip():
        return FieldClassifier([f.strip() for f in arg.split(",") if f.strip()])
    if kind == "llm" and arg.strip():
        if make_engine is None:
            raise ValueError("an llm domain classifier needs an engine factory")
        return LLMClassifier(NamedEngine(arg, make_engine(arg)))
    raise ValueError(f"classifier must be auto, keyword, field:NAME (e.g. field:subject) or llm:MODEL, got {spec!r}")


def classify_domains(
    table: pa.Table, classifier: DomainClassifier, workdir: Path | None = None, progress: Progress = no_progress
) -> tuple[pa.Table, StageReport]:
    """Set the ``domain`` column with ``classifier``."""
    timer = Timer()
    table = as_table(table)
    report = StageReport("domains", f"domains from {classifier.name}")
    labels, how = classifier.classify(table, workdir, progress) if table.num_rows else ([], {})
    table = set_column(table, "domain", labels)
    report.rows_in = report.rows_out = table.num_rows
    report.info = {"classifier": classifier.name, "how": how, "domains": len(set(labels)),
                   "histogram": dict(Counter(labels).most_common())}
    report.seconds = timer()
    return table, report
