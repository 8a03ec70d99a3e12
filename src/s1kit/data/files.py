"""Record files and append-only logs, shared by benchmarks, curation pools, training data and result caches."""

from __future__ import annotations

import csv
import json
import os
import re
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


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, record, None)`` per non-blank line of a JSONL file, or ``(line number, None, reason)`` for a
    line that is not UTF-8 text or not JSON; callers choose to fail or to skip it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            yield (n, *_parse_line(raw))


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    """A JSONL line's value, or None and why it is not one (blank lines are ``(None, None)`` and skipped)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start + 1} of the line)"
    if not line.strip():
        return None, "blank"
    try:
        return json.loads(line), None
    except (json.JSONDecodeError, RecursionError) as e:
        return None, f"not valid JSON ({getattr(e, 'msg', 'nested too deeply')})"


def _jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    for n, rec, error in iter_jsonl(path):
        if error != "blank":
            yield n, rec, error


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


def read_appended(path: Path, keys: Iterable[str] = ()) -> Iterator[dict]:
    """The records of an append-only JSONL log (each a JSON object with ``keys``).

    A last line without its newline that is not a whole record is what a kill mid-write leaves (cut anywhere, even
    inside a UTF-8 character): it is skipped, its work is redone, and ``open_append`` removes it. So is such a
    fragment that an older s1kit left inside the file (it resumed on a new line after it). Any other line that is
    not a record is an ``S1KitError`` naming the file and line: it was not written by a crash, and guessing past
    it could lose or double results."""
    if not path.exists():
        return
    keys = tuple(keys)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            rec, error = _parse_line(raw)
            if error == "blank":
                continue
            if error is not None:
                if not raw.endswith(b"\n") or _torn(raw):
                    continue
                raise S1KitError(f"{path}:{n}: {error}; this line was not written by s1kit (delete it to go on)")
            if not isinstance(rec, dict):
                raise S1KitError(f"{path}:{n}: not a JSON object ({json.dumps(rec)[:40]}); this line was not written "
                                 "by s1kit (delete it to go on)")
            missing = [k for k in keys if k not in rec]
            if missing:
                raise S1KitError(f"{path}:{n}: not a sample record (no {', '.join(map(repr, missing))}); this line "
                                 "was not written by s1kit (delete it to go on)")
            yield rec


def _torn(raw: bytes) -> bool:
    """Whether a line is a record cut short: a JSON object that is whole up to where the line ends (then only the
    newline that a resumed run put after it), ending inside a string, a number or a UTF-8 character."""
    body = raw.rstrip(b"\r\n")
    if not body.startswith(b"{"):
        return False
    text = body.decode("utf-8", errors="ignore")  # a character cut at the end is dropped
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        rest = text[e.pos:].strip()
        return (e.msg.startswith("Unterminated string") or not rest or any(w.startswith(rest) for w in _LITERALS)
                or re.fullmatch(r"-?\d*\.?\d*(?:[eE][-+]?\d*)?", rest) is not None)
    return False


_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")


def open_append(path: Path) -> TextIO:
    """Open an append-only JSONL log for appending, repaired first (``repair_appended``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_appended(path)
    return open(path, "a", encoding="utf-8")


def repair_appended(path: Path) -> None:
    """Repair what a kill mid-write leaves at the end of an append-only JSONL log: a last line cut short is removed
    (so that every line parses again); a whole last record without its newline gets one. The caller is its only
    writer."""
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb+") as f:
            size = f.seek(0, 2)
            start = max(0, size - (1 << 20))
            while True:  # find the start of the last line
                f.seek(start)
                tail = f.read(size - start)
                cut = tail.rfind(b"\n")
                if cut >= 0 or start == 0:
                    break
                start = max(0, start - (1 << 20))
            if not tail.endswith(b"\n"):
                last = tail[cut + 1:]
                rec, error = _parse_line(last)
                if error is None and isinstance(rec, dict):
                    f.write(b"\n")  # a whole record: keep it
                else:
                    f.truncate(start + cut + 1)  # a torn fragment: gone


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` as JSONL, atomically (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
