"""s1K-style curation: small stages over an Arrow table of questions, each returning the rows it keeps and a
``StageReport`` of what it dropped and why; ``curate`` runs them all with a resumable work directory."""

from .decontaminate import decontaminate, load_eval_sets
from .difficulty import difficulty, load_tokenizer
from .distill import distill, require_traces
from .domains import FieldClassifier, KeywordClassifier, LLMClassifier, classify_domains, msc_codes, parse_classifier
from .generation import NamedEngine
from .pipeline import CurationResult, curate
from .pool import S1K_COLUMNS, as_table, load_pool, write_s1k
from .quality import quality
from .select import DirectPick, diversity_sample, select, select_random
from .stage import StageReport

__all__ = [
    "CurationResult", "DirectPick", "FieldClassifier", "KeywordClassifier", "LLMClassifier", "NamedEngine",
    "S1K_COLUMNS", "StageReport", "as_table", "classify_domains", "curate", "decontaminate", "difficulty",
    "distill", "diversity_sample", "load_eval_sets", "load_pool", "load_tokenizer", "msc_codes",
    "parse_classifier", "quality", "require_traces", "select", "select_random", "write_s1k",
]
