"""s1kit: test-time scaling for reasoning language models (budget forcing, after "s1: Simple test-time scaling")."""

from .api import generate, get_engine, make_engine
from .budget import BudgetPolicy, BudgetState, ForcingTokens
from .engines.base import Completion, Engine, Request, SamplingParams
from .errors import S1KitError
from .formats import R1, S1, ThinkingFormat, render_example, render_prompt
from .models import BUNDLED, load_model

__version__ = "0.1.0"

__all__ = [
    "BUNDLED",
    "BudgetPolicy",
    "BudgetState",
    "Completion",
    "Engine",
    "ForcingTokens",
    "R1",
    "Request",
    "S1",
    "S1KitError",
    "SamplingParams",
    "ThinkingFormat",
    "generate",
    "get_engine",
    "load_model",
    "make_engine",
    "render_example",
    "render_prompt",
]
