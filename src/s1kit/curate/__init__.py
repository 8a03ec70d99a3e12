"""s1K-style curation: small stages over an Arrow table of questions, each returning the rows it keeps and a
``StageReport`` of what it dropped and why; ``curate`` runs them all with a resumable work directory.

Names load on first use (PEP 562), so importing ``s1kit.curate.defaults`` needs no curate extra."""

from importlib import import_module
from typing import Any

_WHERE = {
    "decontaminate": "decontaminate", "load_eval_sets": "decontaminate",
    "difficulty": "difficulty", "load_tokenizer": "difficulty",
    "distill": "distill", "require_traces": "distill",
    "FieldClassifier": "domains", "KeywordClassifier": "domains", "LLMClassifier": "domains",
    "classify_domains": "domains", "msc_codes": "domains", "parse_classifier": "domains",
    "NamedEngine": "generation",
    "CurationResult": "pipeline", "curate": "pipeline",
    "S1K_COLUMNS": "pool", "as_table": "pool", "load_pool": "pool", "write_s1k": "pool",
    "quality": "quality",
    "DirectPick": "select", "diversity_sample": "select", "select": "select", "select_random": "select",
    "StageReport": "stage",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import the stage module that defines ``name`` when it is first asked for."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
