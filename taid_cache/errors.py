"""The one exception type for user mistakes, and the wrapper that prints its message as one line and exits 2."""

from __future__ import annotations

import functools
from typing import Callable

import typer


class UserError(Exception):
    """Bad input or settings; the message names the problem and is shown without a traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (libraries often add pages of context)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def user_errors(fn: Callable) -> Callable:
    """A user mistake becomes one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise SystemExit(2) from None

    return wrapper
