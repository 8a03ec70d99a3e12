"""Run a grid of thinking-control settings over a benchmark, grading as it goes, resumably.

Every graded sample is appended to ``samples.jsonl`` at once; a rerun of the same command loads the
store, skips what is done and computes only the rest. A line cut short by a kill is ignored and redone.
What a run directory holds is recorded and checked by ``record.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..budget import BudgetPolicy, EarlyExit
from ..data.benchmarks import MC_LETTERS, Benchmark, Item
from ..data.files import open_append, read_appended, repair_appended
from ..data.grading import Gold, Grader, extract_answer, extract_choice, golds_of
from ..engines.base import Completion, Engine, Request, SamplingParams
from ..errors import S1KitError, require_int
from ..formats import ThinkingFormat

METHODS = ("budget", "token-conditional", "step-conditional", "class-conditional", "rejection", "early-exit")
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
    return ",".join(f"{k}={v}" for k, v in parts if v not in (None, 0, "") or (k == "max" and v == 0)) or "unforced"


_DEFAULT = BudgetPolicy()  # the library's defaults are the sweep's (and the command line's)


def build_grid(
    methods: Sequence[str] = ("budget",),
    max_thinking: Sequence[int | None] = (None,),
    min_thinking: Sequence[int] = (0,),
    waits: Sequence[int] = (0,),
    wait_strings: Sequence[str] = _DEFAULT.wait_strings,
    answer_prefix: str = _DEFAULT.answer_prefix,
    max_answer: int = _DEFAULT.max_answer_tokens,
    tokens_per_step: int = 50,
    early_exit: Sequence[EarlyExit] = (),
    cap_grace: int = 0,
) -> list[Setting]:
    """The settings of a sweep; budgets are required by every method but ``budget`` and ``early-exit``. A minimum
    above a cap is skipped for that cap; a minimum above every cap is an error (it would run nothing).
    ``early_exit`` rules make the ``early-exit`` settings (capped at the largest budget, if any); ``cap_grace``
    applies to every setting."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise S1KitError(f"unknown method {unknown[0]!r}; choose from: {', '.join(METHODS)}")
    if ("early-exit" in methods) != bool(early_exit):
        raise S1KitError("the early-exit method needs early_exit rules, and early_exit rules need that method")
    base = BudgetPolicy(wait_strings=tuple(wait_strings), answer_prefix=answer_prefix, max_answer_tokens=max_answer,
                        cap_grace=cap_grace)
    budgets = sorted({b for b in max_thinking if b is not None})
    out: list[Setting] = []
    for method in methods:
        if method == "early-exit":
            cap = budgets[-1] if budgets else None  # the largest cap still bounds a sequence that never settles
            for rule in early_exit:
                out.append(Setting(method, early_exit_label(rule), replace(base, max_thinking_tokens=cap,
                                                                           early_exit=rule), hi=cap))
            continue
        if method != "budget" and not budgets:
            raise S1KitError(f"method {method!r} needs token budgets: set max_thinking_tokens")
        if method == "budget":
            out += _budget_settings(base, max_thinking, min_thinking, waits)
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


def early_exit_label(rule: EarlyExit) -> str:
    """A short name of an early-exit rule: ``every=64,agree=2,probe=16``."""
    return _label([("every", rule.every), ("words", "|".join(rule.words)), ("agree", rule.agree),
                   ("conf", rule.confidence), ("probe", rule.probe_tokens)])


def parse_early_exit(spec: str) -> EarlyExit:
    """``"every=64,agree=2"`` / ``"words=Wait|Hmm,confidence=0.9,probe=16"`` -> an ``EarlyExit``."""
    names = {"every": "every", "words": "words", "agree": "agree", "confidence": "confidence", "conf": "confidence",
             "probe": "probe_tokens", "probe_tokens": "probe_tokens"}
    fields: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in names:
            raise ValueError(f"early exit {spec!r}: expected key=value pairs with keys every, words, agree, "
                             "confidence, probe (e.g. every=64,agree=2)")
        name = names[key]
        try:
            fields[name] = (tuple(w for w in value.split("|") if w) if name == "words" else
                            float(value) if name == "confidence" else None if value.lower() == "none" else int(value))
        except ValueError:
            raise ValueError(f"early exit {spec!r}: {key} must be a number, got {value!r}") from None
    try:
        return EarlyExit(**fields)
    except ValueError as e:
        raise ValueError(f"early exit {spec!r}: {e}") from None


def _budget_settings(base: BudgetPolicy, caps: Sequence[int | None], minimums: Sequence[int],
                     waits: Sequence[int]) -> list[Setting]:
    """Budget forcing's grid: every cap x minimum x number of Waits, but minimums above the cap."""
    for name, values in (("max_thinking_tokens", caps), ("min_thinking_tokens", minimums), ("num_waits", waits)):
        for v in values:
            replace(base, **{name: v})  # each value must be valid on its own before combinations are judged
    out = []
    for cap, lo, k in itertools.product(caps, minimums, waits):
        if cap is not None and lo > cap:
            continue
        # wait strings only matter when a stop can be suppressed: elsewhere the default keeps settings comparable
        ws = base.wait_strings if k or lo else _DEFAULT.wait_strings
        policy = replace(base, max_thinking_tokens=cap, min_thinking_tokens=lo, num_waits=k, wait_strings=ws)
        label = _label([("max", cap), ("min", lo), ("waits", k), ("wait", "|".join(ws) if ws != ("Wait",) else "")])
        out.append(Setting("budget", label, policy, lo=lo, hi=cap))
    unused = [lo for lo in minimums if not any(s.lo == lo for s in out)]
    if unused:
        caps_given = ", ".join(str(c) for c in caps)
        raise S1KitError(f"min_thinking_tokens {unused[0]} exceeds every max_thinking_tokens ({caps_given}): "
                         "no setting would run")
    return out


SAMPLE_KEYS = ("setting", "item_id", "sample")  # what keys a stored sample


class SampleStore:
    """Append-only JSONL of graded samples keyed by (setting, item, sample)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        repair_appended(path)
        self.records: dict[tuple[str, str, int], dict] = {
            (rec["setting"], rec["item_id"], rec["sample"]): rec for rec in read_appended(path, SAMPLE_KEYS)}
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


def _template_error() -> type[BaseException]:
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - chat templates need jinja2
        return S1KitError
    return TemplateError


# What preparing a request raises when it cannot run: too long for the context, a bad format, a chat template that
# refuses the messages (jinja2's TemplateError).
CANNOT_RUN = (S1KitError, ValueError, _template_error())


def cannot_run(e: BaseException) -> str:
    """Why a request cannot run, in one line."""
    if isinstance(e, (S1KitError, ValueError)):
        return str(e)
    return f"the model's chat template refused it: {e}"


def _seed(base: int, *parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, (base, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def setting_to_json(s: Setting) -> dict:
    """A JSON-ready form of a setting, complete: every field of it and of its policy (kept in ``config.json`` so
    that ``s1kit report`` can rebuild it and a rerun can compare all of it)."""
    return _jsonable(asdict(s))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def setting_from_json(d: dict) -> Setting:
    """Inverse of ``setting_to_json``; a field that an older record lacks takes its default (the value runs had
    before the field existed)."""
    policy = dict(d["policy"])
    if policy.get("early_exit") is not None:
        policy["early_exit"] = EarlyExit(**policy["early_exit"])
    return Setting(**{**d, "policy": BudgetPolicy(**policy)})


class Sweep:
    """The samples a sweep still needs, and how each finished one is graded and stored."""

    def __init__(self, benchmark: Benchmark, settings: Sequence[Setting], store: SampleStore,
                 fmt: ThinkingFormat | str, samples: int, sampling: SamplingParams, max_tries: int, grader: Grader,
                 on_sample: Callable[[dict], None] | None = None) -> None:
        self.store, self.fmt, self.sampling, self.max_tries = store, fmt, sampling, max_tries
        self.grader, self.on_sample = grader, on_sample
        self.queue = deque(_Job(s, it, k) for s in settings for it in benchmark.items for k in range(samples)
                           if (s.key, it.id, k) not in store)

    def request(self, job: _Job) -> Request:
        """The engine request of one job."""
        return _request(job, self.fmt, self.sampling)

    def finish(self, job: _Job, c: Completion, prompt: str | None = None) -> dict | None:
        """Grade one finished sample, append it to ``samples.jsonl`` and flush (the engine calls this as each row
        ends); a sample that rejection sampling rejects is queued again instead (None). ``prompt``: the rendered
        prompt the model saw, kept with the sample."""
        if self._rejected(job, c):
            return None
        [graded] = grade_samples(self.grader, [(c.answer, c.thinking, job.item, job.item.gold)])
        return self._store(job, c, *graded, prompt=prompt)

    def _rejected(self, job: _Job, c: Completion) -> bool:
        if job.setting.accept_max is None or c.thinking_tokens <= job.setting.accept_max or job.tries >= self.max_tries:
            return False
        self.queue.append(replace(job, tries=job.tries + 1))  # rejected: sample again
        return True

    def _store(self, job: _Job, c: Completion, pred: str, source: str, ok: bool, prompt: str | None = None) -> dict:
        gold = job.item.gold if isinstance(job.item.gold, str) else list(job.item.gold)
        rec = {
            "setting": job.setting.key, "method": job.setting.method, "label": job.setting.label,
            "item_id": job.item.id, "sample": job.sample, "gold": gold, "prediction": pred,
            "graded": source, "correct": ok, "thinking_tokens": c.thinking_tokens,
            "answer_tokens": c.answer_tokens, "waits_used": c.waits_used, "hit_cap": c.hit_cap,
            "finish_reason": c.finish_reason, "tries": job.tries, "probe_tokens": c.probe_tokens,
            "early_exit": c.early_exit, "answer": c.answer, "thinking": c.thinking,
        }
        if prompt is not None:
            rec["prompt"] = prompt
        self.store.add(rec)
        if self.on_sample:
            self.on_sample(rec)
        return rec

    def fail(self, job: _Job, reason: str) -> dict:
        """Store an error row for a job that cannot run (its item, e.g. too long for the model's context): it is
        done (a rerun does not retry it), shown by the report and left out of accuracy."""
        gold = job.item.gold if isinstance(job.item.gold, str) else list(job.item.gold)
        rec = {"setting": job.setting.key, "method": job.setting.method, "label": job.setting.label,
               "item_id": job.item.id, "sample": job.sample, "gold": gold, "error": reason, "tries": job.tries}
        self.store.add(rec)
        if self.on_sample:
            self.on_sample(rec)
        return rec

    def run(self, engine: Engine, chunk: int) -> None:
        """Generate every queued job, ``chunk`` requests per engine call (mixed settings decode together); each
        sample is graded and stored the moment its row ends (a kill loses only the rows still decoding). A job
        whose request the engine cannot prepare (its item too long, a template refusing it) becomes an error row
        and the others run; a setting that no item could run (e.g. an answer budget beyond the context) stops
        the run before anything is stored."""
        prepare = getattr(engine, "prepare", None)
        if prepare is not None:
            self._check_settings(prepare)
        while self.queue:
            jobs = [self.queue.popleft() for _ in range(min(chunk, len(self.queue)))]
            runnable = []
            for j in jobs:
                request, prompt = self.request(j), None
                if prepare is not None:
                    try:
                        prompt = _rendered(engine, prepare(request))
                    except CANNOT_RUN as e:
                        self.fail(j, cannot_run(e))
                        continue
                runnable.append((j, request, prompt))
            if runnable:
                engine.generate([r for _, r, _ in runnable],
                                on_complete=lambda c, runnable=runnable: self.finish(runnable[c.request_index][0], c,
                                                                                     runnable[c.request_index][2]),
                                on_error=lambda i, e, runnable=runnable: self.fail(runnable[i][0], str(e)))

    def _check_settings(self, prepare: Callable[[Request], Any]) -> None:
        """Prepare a one-line question under every setting still to run: what fails there is the setting's (its
        format, its answer budget), not an item's, and is an error for the whole run."""
        for setting in {j.setting.key: j.setting for j in self.queue}.values():
            probe = _Job(setting, Item("check", "What is 1+1?", "2"), 0)
            try:
                prepare(self.request(probe))
            except CANNOT_RUN as e:
                raise S1KitError(f"setting {setting.key} cannot run on this model: {cannot_run(e)}") from None


def _rendered(engine: Engine, prepared: Any) -> str | None:
    """The prompt text the model sees (chat template and thinking opener applied), from prepared prompt ids."""
    ids = getattr(prepared, "prompt_ids", None)
    tokenizer = getattr(engine, "tokenizer", None)
    return None if ids is None or tokenizer is None else tokenizer.decode(ids, skip_special_tokens=False)


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
    """Generate, grade and store every (setting, item, sample) not yet in ``out/samples.jsonl``; returns the
    records of exactly these settings, items and samples.

    ``engine`` may be a zero-argument factory: it is called only if something is left to compute."""
    sampling = sampling or SamplingParams()
    check_samples(samples, sampling)
    own_grader = grader is None
    grader = grader or Grader()
    store = SampleStore(out / "samples.jsonl")
    sweep = Sweep(benchmark, settings, store, fmt, samples, sampling, max_tries, grader, on_sample)
    try:
        if sweep.queue:
            sweep.run(engine() if callable(engine) and not hasattr(engine, "generate") else engine, chunk)
    finally:
        store.close()
        if own_grader:
            grader.close()
    return selected(store.records.values(), settings, [it.id for it in benchmark.items], samples)


def check_samples(samples: int, sampling: SamplingParams) -> None:
    """``ValueError`` unless ``samples`` per item can differ: at least 1, and more only when sampling."""
    require_int("samples", samples)
    if samples > 1 and sampling.greedy:
        raise S1KitError("samples > 1 needs temperature > 0 (greedy decoding repeats the same sample)")


def is_error(rec: dict) -> bool:
    """Whether a stored record is an error row (a sample that could not run) rather than a graded sample."""
    return "error" in rec


def selected(records: Iterable[dict], settings: Sequence[Setting], item_ids: Iterable[str] | None = None,
             samples: int | None = None) -> list[dict]:
    """The records of these settings (and, when given, these items and the first ``samples`` samples)."""
    keys = {s.key for s in settings}
    ids = None if item_ids is None else set(item_ids)
    return [r for r in records if r["setting"] in keys and (ids is None or r["item_id"] in ids)
            and (samples is None or r["sample"] < samples)]


def _request(job: _Job, fmt: ThinkingFormat | str, sampling: SamplingParams) -> Request:
    s = job.setting
    question = job.item.question if not s.instruction else f"{job.item.question}\n\n{s.instruction}"
    sp = sampling
    if s.accept_max is not None and sp.greedy:
        sp = replace(sp, temperature=1.0)  # rejection sampling needs diverse samples
    if not sp.greedy:
        sp = replace(sp, seed=_seed(sp.seed or 0, s.key, job.item.id, job.sample, job.tries), n=1)
    return Request(question, s.policy, fmt, sp)


def _numeric(gold: str) -> bool:
    return bool(gold) and gold.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


def _extract(text: str, item: Item, gold: str) -> str:
    """The answer in ``text`` as ``gold`` is written: a letter, a number (the last one) or an expression."""
    if item.kind == "mc":
        return extract_choice(text, MC_LETTERS[: item.meta.get("options", 4)]) or ""
    return extract_answer(text, numeric=_numeric(gold))


def _graded_text(answer: str, thinking: str) -> tuple[str, str]:
    """The text a sample is graded from: its answer, or its thinking when the answer is blank (a model that ends
    its turn while thinking, e.g. one not trained on the format, answered there)."""
    return (answer, "answer") if answer.strip() or not thinking.strip() else (thinking, "thinking")


def prediction(answer: str, thinking: str, item: Item) -> tuple[str, str]:
    """The extracted answer (read as the item's first gold is written) and where it came from."""
    text, source = _graded_text(answer, thinking)
    return _extract(text, item, golds_of(item.gold)[0]), source


def grade_samples(grader: Grader, samples: Sequence[tuple[str, str, Item, Gold]]) -> list[tuple[str, str, bool]]:
    """``(prediction, source, correct)`` per ``(answer, thinking, item, gold)``. Each listed gold is tried with the
    answer read as that gold is written (a number, an expression); the prediction shown is the one that matched."""
    pairs: list[tuple[int, str, str, str]] = []  # (sample, prediction, gold, kind)
    sources = []
    for i, (answer, thinking, item, gold) in enumerate(samples):
        text, source = _graded_text(answer, thinking)
        sources.append(source)
        pairs += [(i, _extract(text, item, g), g, item.kind) for g in golds_of(gold)]
    ok = grader.grade_many([p for _, p, _, _ in pairs], [g for _, _, g, _ in pairs], [k for *_, k in pairs])
    shown: dict[int, tuple[str, bool]] = {}
    for (i, pred, _, _), right in zip(pairs, ok):
        if i not in shown or right and not shown[i][1]:
            shown[i] = (pred, right)
    return [(shown[i][0], sources[i], shown[i][1]) for i in range(len(samples))]
