"""The ``s1kit`` command line: one module per command over the library, shared options declared once
(``options.py``), one error handler (``app.command``): bad input is one ``error:`` line and exit code 2."""

# Each module registers its command; the import order is the order of ``s1kit --help``.
from . import generate, chat, eval, report, models, serve, curate, train, bench  # noqa: F401, I001
from .app import app, main

__all__ = ["app", "main"]
