"""The one exception type for user mistakes: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or settings; the message names the problem and is shown without a traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (libraries often add pages of context)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
