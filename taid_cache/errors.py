"""The one exception type for user mistakes, and the wrapper that prints its message as one line and exits 2."""

from __future__ import annotations

import functools
import os
import sys
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


def run_and_exit(entry: Callable[[], object]) -> None:
    """A console entry point: run it, then end the process with its exit status. Once vLLM has run in this
    process, the interpreter's teardown is skipped (os._exit after flushing): vLLM leaves daemon threads
    blocked in native calls, and one that wakes during teardown aborts the finished process (seen as
    "terminate called without an active exception", exit 134, after a complete dump)."""
    try:
        entry()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    if "vllm" not in sys.modules:
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
