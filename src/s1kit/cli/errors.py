"""One way to fail: a single ``error:`` line on stderr, exit code 2. Library errors speak in library terms
(``max_answer_tokens``, ``question_field``); this is the one place that turns them into this command line's flags."""

from __future__ import annotations

import re
from typing import Mapping, NoReturn

import typer

# Library parameter names -> flags. Names with an underscore (and phrases) are renamed wherever they stand as
# words; plain words ("temperature") only where they stand as a parameter: before "must", a comparison or "=".
FLAGS = {
    "max_thinking_tokens": "--max-thinking", "min_thinking_tokens": "--min-thinking", "num_waits": "--waits",
    "wait_strings": "--wait-string", "answer_prefix": "--answer-prefix", "max_answer_tokens": "--max-answer",
    "top_p": "--top-p", "top_k": "--top-k", "question_field": "--question-field", "answer_field": "--answer-field",
    "base_url": "--base-url", "per_pool": "--pool-sample", "min_overlap": "--min-overlap",
    "eval_sets": "--decontaminate", "batch_size": "--batch-size", "micro_batch_size": "--micro-batch-size",
    "block_size": "--block-size", "lora_rank": "--lora-rank", "save_steps": "--save-steps",
    "max_steps": "--max-steps", "learning_rate": "--lr", "the remote engine": "--engine remote",
    "tokenizer is only used": "--tokenizer is only used", "bf16=False": "--fp32", "overwrite=True": "--overwrite",
    "resume=True": "--resume", "fsdp=True": "--fsdp", "num_gpus": "--num-gpus", "thinking_field": "--thinking-field",
    "attempt_field": "--attempt-field", "truncate=True": "--truncate", "lora=True": "--lora",
    "output directory": "--out",
    "temperature": "--temperature", "samples": "--samples", "limit": "--limit", "seed": "--seed", "size": "--size",
    "selection": "--selection", "classifier": "--domain-classifier", "concurrency": "--concurrency", "n": "--n",
    "epochs": "--epochs", "dtype": "--dtype", "cap_grace": "--cap-grace", "early_exit rules": "--early-exit rules",
}
_AS_PARAMETER = r"(?=\s*(?:must\b|[<>=]))"


def _pattern(name: str) -> str:
    word = rf"(?<![\w-]){re.escape(name)}(?![\w-])"
    return word if not name.isalnum() else word + _AS_PARAMETER  # a name_with_underscores or a phrase


_LIBRARY_TERMS = re.compile("|".join(f"(?P<t{i}>{_pattern(n)})" for i, n in enumerate(FLAGS)))
_BY_GROUP = {f"t{i}": flag for i, flag in enumerate(FLAGS.values())}


def in_flag_terms(message: str) -> str:
    """``message`` with the library's parameter names replaced by the flags that set them."""
    return _LIBRARY_TERMS.sub(lambda m: _BY_GROUP[m.lastgroup], message)


def fail(message: str) -> NoReturn:
    """Print one ``error:`` line and exit with code 2."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(2)


def explain(error: BaseException, hints: Mapping[type, str] | None = None) -> str:
    """The line a user sees for a library error: in flag terms, with the command's remedy for its kind."""
    if isinstance(error, OSError) and error.filename is not None:
        message = f"{error.filename}: {error.strerror or error}"
    else:
        message = in_flag_terms(str(error))
    for kind, hint in (hints or {}).items():
        if isinstance(error, kind):
            return f"{message}; {hint}"
    return message
