"""The run record: everything that determines a sweep's samples, kept in ``OUT/config.json`` and checked by every
rerun; and the run directory's lock, so that one process at a time writes there.

A rerun that asks for the same thing resumes. One that asks for more items (a larger limit), more samples per item
or more settings extends the run. One that differs in anything else that determines the samples (model, engine,
precision, benchmark and its field overrides, format, sampling, answer budget, grader version) is refused with
the fields that differ, and writes nothing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..data.benchmarks import REGISTRY, Item, is_hub_id, load_benchmark
from ..data.files import read_appended, write_jsonl
from ..engines.base import SamplingParams
from ..data.grading import GRADER_VERSION, Grader
from ..errors import S1KitError
from .sweep import SAMPLE_KEYS, Setting, grade_samples, is_error, setting_from_json, setting_to_json

RECORD_FORMAT = 2  # 1: s1kit before run records (model, benchmark, format, temperature and settings only)
CONFIG, SAMPLES, LOCK = "config.json", "samples.jsonl", ".lock"
# The fields of a record that a rerun may grow (the selection: items, samples, settings), and its format number.
# Every other field is the run's identity and must match for a rerun to resume: a field added to RunRecord is
# compared without being listed anywhere, and so is every field of every setting and its policy.
GROWS = ("settings", "items", "items_sha256", "limit", "samples", "record")
# Policy fields that are the run's, not a setting's: one answer budget and answer prefix per run.
RUN_POLICY = ("max_answer_tokens", "answer_prefix")


class RunMismatch(S1KitError):
    """A rerun asks for something that would change the samples of the run it would resume."""

    def __init__(self, path: Path, differences: Sequence[tuple[str, Any, Any]]) -> None:
        self.path, self.differences = path, list(differences)
        listed = "; ".join(f"{name} {old!r} (asked: {new!r})" for name, old, new in self.differences)
        super().__init__(f"{path} holds a run with other settings: {listed}")


class RunInUse(S1KitError):
    """Another process writes the run directory."""


class RunNotResumable(S1KitError):
    """A run directory whose samples cannot be told apart from a new run's: no record, or one from before records."""


def fingerprint(items: Sequence[Item]) -> str:
    """A digest of items' ids, questions, golds and kinds: a rerun can tell that a benchmark file changed."""
    digest = hashlib.sha256()
    for it in items:
        gold = it.gold if isinstance(it.gold, str) else list(it.gold)
        digest.update(json.dumps([it.id, it.question, gold, it.kind], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class RunRecord:
    """What determines a run's samples. ``items`` (with ``limit``), ``samples`` and ``settings`` grow as reruns ask
    for more; every other field must match. ``items`` is None for a run from before run records."""

    model: str
    benchmark: str
    settings: tuple[Setting, ...]
    items: tuple[str, ...] | None = None
    items_sha256: str | None = None
    limit: int | None = None
    samples: int = 1
    engine: str = "hf"
    dtype: str | None = None
    question_field: str | None = None
    answer_field: str | None = None
    split: str | None = None  # a Hugging Face dataset's split and subset (config)
    subset: str | None = None
    format: str = "s1"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0
    max_tries: int = 8
    grader: int = GRADER_VERSION
    record: int = RECORD_FORMAT

    @classmethod
    def create(cls, model: str, benchmark: str, items: Sequence[Item], settings: Sequence[Setting],
               limit: int | None = None, sampling: SamplingParams | None = None, **fields: Any) -> "RunRecord":
        """The record of a run over the first ``limit`` of ``items`` (all of the benchmark, in order). ``sampling``
        gives every sampling field (but ``n``: a run has ``samples``); a benchmark file is recorded by its absolute
        path, so that ``report --regrade`` finds it from any directory."""
        if sampling is not None:
            given = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling) if f.name != "n"}
            unknown = sorted(given.keys() - cls.__dataclass_fields__.keys())
            if unknown:  # a new sampling field must be recorded (and so compared) before any run can use it
                raise TypeError(f"RunRecord does not record the sampling field(s) {', '.join(unknown)}")
            fields = {**given, **fields}
        chosen = list(items[:limit] if limit else items)
        return cls(model=model, benchmark=benchmark_ref(benchmark), settings=tuple(settings),
                   items=tuple(it.id for it in chosen), items_sha256=fingerprint(chosen), limit=limit, **fields)

    def to_json(self) -> dict:
        """``config.json``'s content (the settings and the item ids last: they are the long part)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in ("record", "settings", "items")}
        return {"record": self.record, **d, "settings": [setting_to_json(s) for s in self.settings],
                "items": None if self.items is None else list(self.items)}

    @classmethod
    def from_json(cls, d: Any, where: Path) -> "RunRecord":
        """A record read back; a run from before run records keeps what it recorded (and says so)."""
        if not isinstance(d, dict) or not isinstance(d.get("settings", []), list):
            raise S1KitError(f"{where}: not a run record (expected a JSON object with settings)")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if d.get("record", 1) < RECORD_FORMAT:  # it recorded model, benchmark, format, temperature and an item count
            count = d.get("items")
            known.update(items=None, items_sha256=None, seed=known.get("seed"), grader=known.get("grader", 1),
                         limit=known.get("limit", count if isinstance(count, int) else None), record=1)
        try:
            settings = tuple(setting_from_json(s) for s in d.get("settings", []))
            items = None if known.get("items") is None else tuple(known["items"])
            return cls(**{**known, "settings": settings, "items": items})
        except (KeyError, TypeError, ValueError) as e:
            raise S1KitError(f"{where}: not a valid run record ({type(e).__name__}: {e})") from None

    def extended_by(self, asked: "RunRecord", items: Sequence[Item], where: Path) -> "RunRecord":
        """This record grown by what ``asked`` adds (items, samples, settings); ``RunMismatch`` naming every field
        that differs otherwise. ``items`` is the whole benchmark as it loads now, in order."""
        if self.items is None:
            raise RunNotResumable(f"{where / CONFIG} was written before run records and does not say which items, seed "
                                  "and grader its samples used (s1kit report still reads it)")
        diffs = [(name, getattr(self, name), getattr(asked, name)) for name in identity_fields()
                 if getattr(self, name) != getattr(asked, name)
                 and not (name == "benchmark" and same_benchmark(self.benchmark, asked.benchmark))]
        for name in RUN_POLICY:
            mine = {getattr(s.policy, name) for s in self.settings}
            theirs = {getattr(s.policy, name) for s in asked.settings}
            if mine and theirs and mine != theirs:
                diffs.append((name, _one(mine), _one(theirs)))
        recorded = {s.key: s for s in self.settings}
        for s in asked.settings:
            if s.key in recorded:
                old, new = _fields_of(recorded[s.key]), _fields_of(s)
                diffs += [(f"{name} of {s.key}", old.get(name), new.get(name)) for name in sorted(old.keys() | new.keys())
                          if old.get(name, _ABSENT) != new.get(name, _ABSENT)
                          and (name in old and name in new or not name.startswith("early_exit."))]
        n = len(self.items)
        if [it.id for it in items[:n]] != list(self.items) or fingerprint(items[:n]) != self.items_sha256:
            diffs.append(("benchmark items", f"{n} recorded", "changed (another or an edited file)"))
        if diffs:
            raise RunMismatch(where, diffs)
        longer = max(n, len(asked.items or ()))
        # a benchmark file with the same items may have moved: record where it loads now
        return replace(self, benchmark=asked.benchmark,
                       settings=self.settings + tuple(s for s in asked.settings if s.key not in recorded),
                       items=tuple(it.id for it in items[:longer]), items_sha256=fingerprint(items[:longer]),
                       limit=None if None in (self.limit, asked.limit) else max(self.limit, asked.limit),
                       samples=max(self.samples, asked.samples))


_ABSENT = object()


def identity_fields() -> list[str]:
    """The record's fields that a rerun must match: all of them but those that grow (``GROWS``)."""
    return [name for name in RunRecord.__dataclass_fields__ if name not in GROWS]


def benchmark_ref(benchmark: str) -> str:
    """A registered benchmark's name as it is; a file's absolute path (the record must not depend on the
    directory the eval ran in)."""
    if benchmark in REGISTRY or is_hub_id(benchmark):
        return benchmark
    return os.path.abspath(os.path.expanduser(benchmark))


def same_benchmark(recorded: str, asked: str) -> bool:
    """Whether two benchmark references may hold the same items: the same name, or two files (a file's path is
    where it is, not what it holds: its items are compared by their fingerprint)."""
    return recorded == asked or (recorded not in REGISTRY and asked not in REGISTRY)


def _fields_of(setting: Setting) -> dict:
    """Every field of a setting, its policy's and early-exit rule's flattened in (``early_exit.every``), but the
    run's own (compared once for the whole run)."""
    d = setting_to_json(setting)
    policy = d.pop("policy")
    rule = policy.pop("early_exit", None)
    flat = {k: v for k, v in policy.items() if k not in RUN_POLICY}
    flat["early_exit"] = None if rule is None else "on"
    flat.update({f"early_exit.{k}": v for k, v in (rule or {}).items()})
    return {**flat, **d}


def _one(values: set) -> Any:
    return next(iter(values)) if len(values) == 1 else sorted(values, key=repr)


class RunDir:
    """A sweep's output directory: ``config.json`` (the run record), ``samples.jsonl`` and ``.lock``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.config, self.samples = self.path / CONFIG, self.path / SAMPLES

    def read(self) -> RunRecord | None:
        """The recorded run, or None when the directory holds none; ``S1KitError`` naming a damaged file."""
        if self.path.exists() and not self.path.is_dir():
            raise S1KitError(f"{self.path} is a file, not a run directory")
        if not self.config.is_file():
            return None
        try:
            data = json.loads(self.config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise S1KitError(f"{self.config}: not valid JSON ({why}); the run record is damaged") from None
        return RunRecord.from_json(data, self.config)

    def require(self) -> RunRecord:
        """The recorded run; ``S1KitError`` when there is none."""
        record = self.read()
        if record is None:
            raise S1KitError(f"{self.path} is not a run directory (no {CONFIG}); write one with s1kit eval")
        return record

    def extend(self, asked: RunRecord, items: Sequence[Item]) -> RunRecord:
        """The record this directory will hold once ``asked`` runs: ``asked`` itself in a new run directory (or one
        whose run never stored a sample: a failed start binds nothing), else the recorded run extended by it
        (``RunMismatch`` when they differ). Nothing is written."""
        recorded, stored = self.read(), next(read_appended(self.samples), None) is not None
        if recorded is None and stored:
            raise RunNotResumable(f"{self.path} holds {SAMPLES} but no {CONFIG}: what its samples were generated with "
                                  "is unknown")
        if recorded is None or not stored:
            return asked
        return recorded.extended_by(asked, items, self.path)

    def write(self, record: RunRecord) -> None:
        """Save ``record`` atomically (a kill never leaves half a record)."""
        text = json.dumps(record.to_json(), indent=2, ensure_ascii=False)
        if self.config.is_file() and self.config.read_text(encoding="utf-8") == text:
            return
        tmp = self.path / f".{CONFIG}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.config)

    @contextmanager
    def writer(self) -> Iterator["RunDir"]:
        """Hold the directory's lock (``RunInUse`` if another process holds it), creating the directory if need
        be; a directory this call created and nothing else wrote to is removed again on the way out."""
        if self.path.exists() and not self.path.is_dir():
            raise S1KitError(f"{self.path} is a file, not a run directory")
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = self._lock()
        try:
            yield self
        finally:
            os.close(fd)  # releases the lock
            if created and [p.name for p in self.path.iterdir()] == [LOCK]:
                (self.path / LOCK).unlink(missing_ok=True)
                self.path.rmdir()

    def _lock(self) -> int:
        path = self.path / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise RunInUse(f"{self.path} is in use: another process writes it"
                               + (f" (pid {pid})" if pid.isdigit() else "")) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file after we opened it: lock the current one
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)


def open_run(out: Path | str, asked: RunRecord, items: Sequence[Item]) -> RunRecord:
    """Record ``asked`` in ``out/config.json``, or extend the run recorded there (``RunMismatch`` if it differs);
    returns the record now saved. The caller holds ``RunDir(out).writer()`` if other processes may write there."""
    run = RunDir(out)
    record = run.extend(asked, items)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write(record)
    return record


def regrade_run(out: Path | str) -> dict:
    """Extract and grade every stored sample of a run again with the current rules, against the benchmark as its
    record loads it (field overrides and seed included); the generations are kept and the record then names this
    grader version. Returns counts: samples, changed (grade or prediction), correct."""
    run = RunDir(out)
    record = run.require()
    try:
        bench = load_benchmark(record.benchmark, None, record.question_field, record.answer_field, record.seed or 0,
                               record.split, record.subset)
    except S1KitError as e:
        reason = str(e).split(";")[0]  # without a remedy that names options of another command
        where = ("" if os.path.isabs(record.benchmark) or record.benchmark in REGISTRY else
                 "; its path was recorded relative to the directory that run's eval ran in (an older s1kit): rerun "
                 "that eval once with the benchmark's path, from anywhere, to record it in full")
        raise S1KitError(f"cannot regrade {run.path}: its benchmark {record.benchmark!r} does not load "
                         f"({reason}){where}") from e
    if record.items is not None and fingerprint(bench.items[:len(record.items)]) != record.items_sha256:
        raise S1KitError(f"cannot regrade {run.path}: the items of {record.benchmark!r} changed since the run")
    items = {it.id: it for it in bench.items}
    stored = list(read_appended(run.samples, SAMPLE_KEYS))
    records = [r for r in stored if not is_error(r)]  # a sample that could not run has nothing to grade
    missing = sorted({r["item_id"] for r in records} - items.keys())
    if missing:
        raise S1KitError(f"cannot regrade {run.path}: {len(missing)} sample item(s) are not in {record.benchmark!r}, "
                         f"e.g. {missing[0]!r}")
    # A run from before run records did not record its seed, which shuffles multiple-choice options: keep its gold.
    golds = [r["gold"] if record.items is None and items[r["item_id"]].kind == "mc" else items[r["item_id"]].gold
             for r in records]
    with Grader() as grader:
        graded = grade_samples(grader, [(r.get("answer", ""), r.get("thinking", ""), items[r["item_id"]], gold)
                                        for r, gold in zip(records, golds)])
    changed = 0
    for rec, gold, (pred, source, ok) in zip(records, golds, graded):
        changed += rec.get("prediction") != pred or rec.get("correct") != ok
        rec.update(gold=gold if isinstance(gold, str) else list(gold), prediction=pred, graded=source, correct=ok)
    write_jsonl(run.samples, stored)
    run.write(replace(record, grader=GRADER_VERSION))
    return {"samples": len(records), "changed": changed, "correct": sum(ok for *_, ok in graded)}


def provenance(model_ref: str, engine: Any = None, previous: dict | None = None) -> dict:
    """What made a run's numbers, for its summary: s1kit, torch and transformers versions, the date, and which
    weights (``models.model_provenance``; the served model and URL for a remote engine). ``engine`` is the engine
    that generated now; without one (nothing was due), ``previous`` (the last summary's) is kept, as it made the
    samples."""
    import datetime
    import platform

    import torch
    import transformers

    from .. import __version__
    from ..models import model_provenance

    if engine is None and previous:
        return previous
    out = {"s1kit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if engine is not None and hasattr(engine, "served_model"):  # a remote engine: the server holds the weights
        out["model"] = {"ref": model_ref, "served_model": engine.served_model, "base_url": engine.client.base_url}
    else:
        out["model"] = model_provenance(model_ref, getattr(engine, "model", None))
    return out


def previous_provenance(out: Path) -> dict | None:
    """The provenance in ``out/summary.json`` if one was written (a rerun that generated nothing keeps it)."""
    try:
        summary = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = summary.get("provenance") if isinstance(summary, dict) else None
    return found if isinstance(found, dict) else None
