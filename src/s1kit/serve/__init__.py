"""OpenAI-compatible server with per-request thinking budgets (``s1kit serve``)."""

from .app import create_app
from .schemas import EFFORT_BUDGETS
from .worker import EngineWorker, Job

__all__ = ["EFFORT_BUDGETS", "EngineWorker", "Job", "create_app"]
