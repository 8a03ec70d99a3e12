"""Run a grid of thinking-control settings over a benchmark, grading as it goes, resumably.

Every graded sample is appended to ``samples.jsonl`` at once; a rerun of the same command loads the
store, skips what is done and computes only the rest. A line cut short by a kill is ignored and redone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..budget import BudgetPolicy
from ..data.benchmarks import MC_LETTERS, Benchmark, Item
from ..data.files import open_append, read_appended, write_jsonl
from ..data.grading import Grader, extract_answer, extract_choice
from ..engines.base import Engine, Request, SamplingParams
from ..errors import S1KitError
from ..formats import ThinkingFormat

METHODS = ("budget", "token-conditional", "step-conditional", "class-conditional", "rejection")
SHORT = "Think briefly: answer after a short amount of thinking and do not double-check at length."
LONG = ("Think at length: take a long time to reason, and if you finish early, keep checking your work "
        "until you are sure of the answer.")


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: a control method, its budget policy and the thinking bounds it asks for."""

    method: str
    label: str
    policy: BudgetPolicy
    instruction: str = ""  # appended to the question by the conditional methods
    lo: int = 0  # Control bounds: the thinking tokens this setting asks for
    hi: int | None = None
    accept_max: int | None = None  # rejection sampling: resample until thinking <= this

    @property
    def key(self) -> str:
        """Stable identifier in the sample store."""
        return f"{self.method}:{self.label}"


def _label(parts: Iterable[tuple[str, Any]]) -> str:
    return ",".join(f"{k}={v}" for k, v in parts if v not in (None, 0, "")) or "unforced"


def build_grid(
    methods: Sequence[str] = ("budget",),
    max_thinking: Sequence[int | None] = (None,),
    min_thinking: Sequence[int] = (0,),
    waits: Sequence[int] = (0,),
    wait_strings: Sequence[str] = ("Wait",),
    answer_prefix: str = "Final Answer:",
    max_answer: int = 256,
    tokens_per_step: int = 50,
) -> list[Setting]:
    """The settings of a sweep; budgets are required by every method but ``budget``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise S1KitError(f"unknown method {unknown[0]!r}; choose from: {', '.join(METHODS)}")
    base = BudgetPolicy(wait_strings=tuple(wait_strings), answer_prefix=answer_prefix, max_answer_tokens=max_answer)
    budgets = sorted({b for b in max_thinking if b is not None})
    out: list[Setting] = []
    for method in methods:
        if method != "budget" and not budgets:
            raise S1KitError(f"method {method!r} needs token budgets: pass --max-thinking N[,N...]")
        if method == "budget":
            for cap, lo, k in itertools.product(max_thinking, min_thinking, waits):
                if cap is not None and lo > cap:
                    continue
                ws = wait_strings if k or lo else ()
                label = _label([("max", cap), ("min", lo), ("waits", k), ("wait", "|".join(ws) if ws != ("Wait",) else "")])
                policy = replace(base, max_thinking_tokens=cap, min_thinking_tokens=lo, num_waits=k)
                out.append(Setting(method, label, policy, lo=lo, hi=cap))
        elif method == "token-conditional":
            for n in budgets:  # asked in the prompt, not enforced; a safety cap at 2N bounds the cost
                out.append(Setting(method, f"tokens={n}", replace(base, max_thinking_tokens=2 * n),
                                   f"Think for up to {n} tokens.", hi=n))
        elif method == "step-conditional":
            for n in budgets:
                steps = max(1, round(n / tokens_per_step))
                out.append(Setting(method, f"steps={steps}", replace(base, max_thinking_tokens=2 * n),
                                   f"Think for up to {steps} steps (a step is one line of reasoning).", hi=n))
        elif method == "class-conditional":
            out.append(Setting(method, "short", replace(base, max_thinking_tokens=2 * budgets[-1]), SHORT, hi=budgets[0]))
            out.append(Setting(method, "long", replace(base, max_thinking_tokens=2 * budgets[-1]), LONG, hi=budgets[-1]))
        elif method == "rejection":
            for n in budgets:  # a sample reaching n+1 tokens is rejected anyway: cap there
                out.append(Setting(method, f"accept<={n}", replace(base, max_thinking_tokens=n + 1), hi=n, accept_max=n))
    keys = [s.key for s in out]
    if len(set(keys)) != len(keys):
        raise S1KitError("the grid has duplicate settings")
    return out


class SampleStore:
    """Append-only JSONL of graded samples keyed by (setting, item, sample)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[tuple[str, str, int], dict] = {
            (rec["setting"], rec["item_id"], rec["sample"]): rec for rec in read_appended(path)}
        self._file = None

    def __contains__(self, key: tuple[str, str, int]) -> bool:
        return key in self.records

    def add(self, rec: dict) -> None:
        """Append one graded sample and flush it to disk."""
        if self._file is None:
            self._file = open_append(self.path)
        self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[(rec["setting"], rec["item_id"], rec["sample"])] = rec

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class _Job:
    setting: Setting
    item: Item
    sample: int
    tries: int = 1


@dataclass
class SweepConfig:
    """Everything that identifies a sweep's results (checked when resuming into the same directory)."""

    model: str
    benchmark: str
    items: int
    format: str = "s1"
    temperature: float = 0.0
    extra: dict = field(default_factory=dict)


def _seed(base: int, *parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, (base, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def setting_to_json(s: Setting) -> dict:
    """A JSON-ready form of a setting (kept in ``config.json`` so ``s1kit report`` can rebuild it)."""
    d = asdict(s)
    d["policy"]["wait_strings"] = list(s.policy.wait_strings)
    return d


def setting_from_json(d: dict) -> Setting:
    """Inverse of ``setting_to_json``."""
    return Setting(**{**d, "policy": BudgetPolicy(**d["policy"])})


def open_run(out: Path, config: SweepConfig, settings: Sequence[Setting]) -> list[Setting]:
    """Record the run in ``out/config.json`` (adding new settings) or refuse to mix in another model's or
    benchmark's results. Returns every setting the directory holds."""
    path = out / "config.json"
    mine = {"model": config.model, "benchmark": config.benchmark, "format": config.format,
            "temperature": config.temperature}
    known: list[Setting] = []
    if path.exists():
        old = json.loads(path.read_text())
        for k, v in mine.items():
            if old.get(k) != v:
                raise S1KitError(f"{out} holds results for {k}={old.get(k)!r}, not {v!r}; use another --out directory")
        known = [setting_from_json(d) for d in old.get("settings", [])]
    keys = {s.key for s in known}
    known += [s for s in settings if s.key not in keys]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**mine, "items": config.items, **config.extra,
                                "settings": [setting_to_json(s) for s in known]}, indent=2))
    return known


def load_run(out: Path) -> tuple[dict, list[Setting]]:
    """The config and settings recorded in a sweep directory."""
    path = out / "config.json"
    if not path.is_file():
        raise S1KitError(f"{out} is not a sweep directory (no config.json); run s1kit eval --out {out} first")
    cfg = json.loads(path.read_text())
    return cfg, [setting_from_json(d) for d in cfg.get("settings", [])]


def run_sweep(
    engine: Engine | Callable[[], Engine],
    benchmark: Benchmark,
    settings: Sequence[Setting],
    out: Path,
    fmt: ThinkingFormat | str = "s1",
    samples: int = 1,
    sampling: SamplingParams | None = None,
    chunk: int = 32,
    max_tries: int = 8,
    grader: Grader | None = None,
    on_sample: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Generate, grade and store every (setting, item, sample) not yet in ``out/samples.jsonl``.

    ``engine`` may be a zero-argument factory: it is called only if something is left to compute."""
    sampling = sampling or SamplingParams()
    if samples > 1 and sampling.greedy:
        raise S1KitError("--samples > 1 needs sampling: pass --temperature > 0")
    store = SampleStore(out / "samples.jsonl")
    queue = deque(
        _Job(s, it, k)
        for s in settings for it in benchmark.items for k in range(samples)
        if (s.key, it.id, k) not in store
    )
    if queue and callable(engine) and not hasattr(engine, "generate"):
        engine = engine()
    own_grader = grader is None
    grader = grader or Grader()
    try:
        while queue:
            jobs = [queue.popleft() for _ in range(min(chunk, len(queue)))]
            requests = [_request(j, fmt, sampling) for j in jobs]
            completions = engine.generate(requests)
            done = []
            for job, c in zip(jobs, completions):
                if job.setting.accept_max is not None and c.thinking_tokens > job.setting.accept_max \
                        and job.tries < max_tries:
                    queue.append(replace(job, tries=job.tries + 1))  # rejected: sample again
                    continue
                done.append((job, c))
            if not done:
                continue
            found = [prediction(c.answer, c.thinking, j.item) for j, c in done]
            grades = grader.grade_many([p for p, _ in found], [j.item.gold for j, _ in done],
                                       [j.item.kind for j, _ in done])
            for (job, c), (pred, source), ok in zip(done, found, grades):
                rec = {
                    "setting": job.setting.key, "method": job.setting.method, "label": job.setting.label,
                    "item_id": job.item.id, "sample": job.sample, "gold": job.item.gold, "prediction": pred,
                    "graded": source, "correct": ok, "thinking_tokens": c.thinking_tokens,
                    "answer_tokens": c.answer_tokens, "waits_used": c.waits_used, "hit_cap": c.hit_cap,
                    "finish_reason": c.finish_reason, "tries": job.tries, "answer": c.answer, "thinking": c.thinking,
                }
                store.add(rec)
                if on_sample:
                    on_sample(rec)
    finally:
        store.close()
        if own_grader:
            grader.close()
    keys = {s.key for s in settings}
    return [r for r in store.records.values() if r["setting"] in keys]


def _request(job: _Job, fmt: ThinkingFormat | str, sampling: SamplingParams) -> Request:
    s = job.setting
    question = job.item.question if not s.instruction else f"{job.item.question}\n\n{s.instruction}"
    sp = sampling
    if s.accept_max is not None and sp.greedy:
        sp = replace(sp, temperature=1.0)  # rejection sampling needs diverse samples
    if not sp.greedy:
        sp = replace(sp, seed=_seed(sp.seed or 0, s.key, job.item.id, job.sample, job.tries), n=1)
    return Request(question, s.policy, fmt, sp)


def _extract(text: str, item: Item) -> str:
    if item.kind == "mc":
        return extract_choice(text, MC_LETTERS[: item.meta.get("options", 4)]) or ""
    numeric = bool(item.gold) and item.gold.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()
    return extract_answer(text, numeric=numeric)


def prediction(answer: str, thinking: str, item: Item) -> tuple[str, str]:
    """The extracted answer and where it came from: the answer text, or the thinking when the answer is
    blank (a model that ends its turn while thinking, e.g. one not trained on the format, answered there)."""
    if answer.strip() or not thinking.strip():
        return _extract(answer, item), "answer"
    return _extract(thinking, item), "thinking"


def regrade_run(out: Path) -> dict:
    """Extract and grade every stored sample of a sweep directory again, with the current rules; the generations
    are kept. Returns counts: samples, changed (grade or prediction), correct."""
    from ..data.benchmarks import load_benchmark

    cfg, _ = load_run(out)
    path = out / "samples.jsonl"
    records = list(read_appended(path))
    try:
        items = {it.id: it for it in load_benchmark(cfg["benchmark"]).items}
    except S1KitError as e:
        raise S1KitError(f"cannot regrade {out}: its benchmark {cfg['benchmark']!r} does not load ({e})") from e
    missing = sorted({r["item_id"] for r in records} - items.keys())
    if missing:
        raise S1KitError(f"cannot regrade {out}: {len(missing)} sample item(s) are not in {cfg['benchmark']!r}, "
                         f"e.g. {missing[0]!r}")
    found = [prediction(r.get("answer", ""), r.get("thinking", ""), items[r["item_id"]]) for r in records]
    with Grader() as grader:  # the stored gold: a multiple-choice gold letter depends on the option shuffle's seed
        grades = grader.grade_many([p for p, _ in found], [r["gold"] for r in records],
                                   [items[r["item_id"]].kind for r in records])
    changed = 0
    for rec, (pred, source), ok in zip(records, found, grades):
        changed += rec.get("prediction") != pred or rec.get("correct") != ok
        rec.update(prediction=pred, graded=source, correct=ok)
    write_jsonl(path, records)
    return {"samples": len(records), "changed": changed, "correct": sum(grades)}
