"""Model stages share one pattern: ask an engine about many rows, keep every answer in a per-row cache in the
work directory, and never ask again. A killed run loses at most the chunk in flight."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

from ..data.files import open_append, read_appended
from ..engines.base import Completion, Engine, Request

Progress = Callable[[int, str], ContextManager[Callable[..., None]]]


def no_progress(total: int, label: str) -> ContextManager[Callable[..., None]]:
    """A progress factory that shows nothing."""
    return nullcontext(lambda n, description=None: None)


class NamedEngine:
    """An engine with a name (for caches and reports), loaded on first use: cached runs load no model.

    ``chunk`` requests go to the engine per call (and to the cache per flush): a few batches' worth keeps a
    continuously batching engine full while a kill still loses little."""

    def __init__(self, name: str, engine: Engine | Callable[[], Engine], chunk: int = 64) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.name = name
        self.chunk = chunk
        self._engine = engine if hasattr(engine, "generate") else None
        self._load = None if self._engine is not None else engine

    @property
    def engine(self) -> Engine:
        """The engine, loading it now if needed."""
        if self._engine is None:
            self._engine = self._load()
        return self._engine

    def generate(self, requests: Sequence[Request], on_progress: Callable[[int], None] | None = None) -> list[Completion]:
        """Completions for ``requests`` (see ``Engine.generate``)."""
        return self.engine.generate(requests, on_progress=on_progress)


class ResultCache:
    """Append-only JSONL of per-row results keyed by ``uid``; ``path=None`` keeps them in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: dict[str, dict] = {} if path is None else {rec["uid"]: rec for rec in read_appended(path)}

    def __contains__(self, uid: str) -> bool:
        return uid in self.records

    def __getitem__(self, uid: str) -> dict:
        return self.records[uid]

    def add_many(self, recs: Sequence[dict]) -> None:
        """Store results and flush them to disk at once."""
        for rec in recs:
            self.records[rec["uid"]] = rec
        if self.path is None or not recs:
            return
        with open_append(self.path) as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))


def cache_for(workdir: Path | None, stage: str, model: str, settings: Any) -> ResultCache:
    """The cache of one stage for one model and settings (a change of settings starts a new file)."""
    if workdir is None:
        return ResultCache(None)
    blob = json.dumps(settings, sort_keys=True, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    key = hashlib.sha1(blob.encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")[-60:] or "model"
    return ResultCache(Path(workdir) / f"{stage}-{slug}-{key}.jsonl")


def run_cached(
    engine: NamedEngine,
    uids: Sequence[str],
    requests: Sequence[Request],
    to_record: Callable[[int, Completion], dict],
    cache: ResultCache,
    progress: Progress = no_progress,
    label: str = "generating",
) -> dict[str, dict]:
    """Results for every uid: from the cache, else generated in chunks and stored as each chunk finishes.

    ``to_record(i, completion)`` turns the completion of ``requests[i]`` into the record to keep."""
    todo = [i for i, u in enumerate(uids) if u not in cache]
    if todo:
        with progress(len(todo), f"{label} ({engine.name})") as advance:
            for start in range(0, len(todo), engine.chunk):
                part = todo[start : start + engine.chunk]
                completions = engine.generate([requests[i] for i in part], on_progress=advance)
                cache.add_many([{"uid": uids[i], **to_record(i, c)} for i, c in zip(part, completions)])
    return {u: cache[u] for u in uids}
