"""Errors that s1kit reports to users as one clear line (the CLI exits with code 2)."""


class S1KitError(Exception):
    """A user-facing error: bad input, a missing model package, an unreachable server."""


class RequestError(S1KitError):
    """One request cannot run (it cannot be sampled, a server refuses it alone); the engine and the others go on."""


def require_int(name: str, value: object, minimum: int = 1) -> None:
    """``ValueError`` unless ``value`` is an integer (a bool is not one) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
