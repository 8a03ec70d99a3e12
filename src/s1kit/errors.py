"""Errors that s1kit reports to users as one clear line (the CLI exits with code 2)."""


class S1KitError(Exception):
    """A user-facing error: bad input, a missing model package, an unreachable server."""
