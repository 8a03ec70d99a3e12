"""Record files and append-only logs, shared by benchmarks, curation pools, training data and result caches."""

from __future__ import annotations

import csv
import os
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from ..errors import S1KitError


def iter_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(number, record, None)`` per record of a .jsonl/.json/.csv/.parquet file (line, item or row number),
    or ``(number, None, reason)`` for a JSONL line that is not JSON; callers choose to fail or to skip it.
    A file that cannot be read as its type at all is an ``S1KitError`` naming it."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _jsonl(path)
        elif suffix == ".json":
            yield from ((n, r, None) for n, r in enumerate(_json_list(path), 1))
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                yield from ((n, r, None) for n, r in enumerate(csv.DictReader(f), 2))  # line 1 is the header
        elif suffix == ".parquet":
            yield from ((n, r, None) for n, r in enumerate(_parquet_rows(path), 1))
        else:
            raise S1KitError(f"{path}: unsupported file type (use .jsonl, .json, .csv or .parquet)")
    except UnicodeDecodeError as e:
        raise S1KitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except csv.Error as e:
        raise S1KitError(f"{path}: not a readable CSV file ({e})") from None


def _jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line), None
            except (json.JSONDecodeError, RecursionError) as e:
                yield n, None, f"not valid JSON ({getattr(e, 'msg', 'nested too deeply')})"


def _json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise S1KitError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise S1KitError(f"{path}: not valid JSON (nested too deeply)") from None
    if isinstance(data, dict):  # {"data": [...]} or {id: record}
        data = data.get("data", data.get("problems", list(data.values())))
        if isinstance(data, dict):
            data = list(data.values())
    if not isinstance(data, list):
        raise S1KitError(f"{path}: expected a list of records")
    return data


def _parquet_rows(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise S1KitError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own types for a file that is not Parquet
        raise S1KitError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def read_appended(path: Path) -> Iterator[dict]:
    """The records of an append-only JSONL log, skipping a line cut short by a kill (its work is redone)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def open_append(path: Path) -> TextIO:
    """Open an append-only JSONL log for appending, on a fresh line if a kill left a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")
    if torn:
        f.write("\n")
    return f


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` as JSONL, atomically (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
