"""OpenAI-compatible server with per-request thinking budgets (``s1kit serve``)."""

from .app import create_app
from .batcher import Batcher, Job
from .schemas import EFFORT_BUDGETS

__all__ = ["Batcher", "EFFORT_BUDGETS", "Job", "create_app"]
