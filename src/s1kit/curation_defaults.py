"""Curation defaults, outside the curate package so that the CLI can show them without the curate extra (pyarrow,
datasets), which the package imports."""

from .budget import BudgetPolicy

NGRAM = 8
MIN_OVERLAP = 0.5  # share of an evaluation question's n-grams a pool question must repeat
DEFAULT_EVAL_SETS = ("math500", "gsm8k")
DEFAULT_TOKENIZER = "smollm2-135m"  # measures trace lengths
REFERENCE_POLICY = BudgetPolicy(max_thinking_tokens=1024, max_answer_tokens=256)  # the model that grades difficulty
TEACHER_POLICY = BudgetPolicy(max_thinking_tokens=4096, max_answer_tokens=1024)  # the model that distills traces
