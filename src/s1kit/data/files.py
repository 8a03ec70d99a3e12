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
    or ``(number, None, reason)`` for a JSONL line that is not JSON; callers choose to fail or to skip it."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield n, None, f"not valid JSON ({e.msg})"
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise S1KitError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or {id: record}
            data = data.get("data", data.get("problems", list(data.values())))
            if isinstance(data, dict):
                data = list(data.values())
        if not isinstance(data, list):
            raise S1KitError(f"{path}: expected a list of records")
        yield from ((n, r, None) for n, r in enumerate(data, 1))
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            yield from ((n, r, None) for n, r in enumerate(csv.DictReader(f), 2))  # line 1 is the header
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise S1KitError("reading .parquet needs pyarrow: pip install pyarrow") from None
        yield from ((n, r, None) for n, r in enumerate(pq.read_table(path).to_pylist(), 1))
    else:
        raise S1KitError(f"{path}: unsupported file type (use .jsonl, .json, .csv or .parquet)")


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
