"""The typer app, the decorator every command registers with (its one error handler) and the console entry."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Mapping

import typer

from ..errors import S1KitError
from .errors import explain, fail

app = typer.Typer(
    name="s1kit",
    help="Test-time scaling for reasoning LMs: budget forcing, sweeps, curation, training, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" in them is text, not a rich markup tag
)

# What a command turns into one error line: the library's user-facing errors, its validation (ValueError) and
# files that cannot be read or written. Anything else is a bug and keeps its traceback.
USER_ERRORS = (S1KitError, ValueError, OSError)


def command(epilog: str, name: str | None = None, hints: Mapping[type, str] | None = None) -> Callable:
    """Register a command (``epilog``: its example) whose library errors become one ``error:`` line, exit 2;
    ``hints`` add a remedy in flag terms to errors of the given kinds."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                fail(explain(e, hints))

        app.command(name, epilog=epilog)(run)
        return fn

    return register


def main() -> None:
    """Console-script entry point: a usage error (unknown flag, a value of the wrong type) is one line too."""
    command_line = typer.main.get_command(app)
    try:
        code = command_line.main(standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # typer vendors click: its usage errors carry format_message() and an exit code
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # the help is printed already
            sys.exit(2)
        typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def require_extra(extra: str, *modules: str) -> None:
    """Refuse a command whose optional extra is not installed, naming the pip line that installs it."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise S1KitError(f"s1kit {extra} needs the {extra} extra ({e}): pip install 's1kit[{extra}]'") from None
