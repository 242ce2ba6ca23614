"""The one exception type for user mistakes: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or settings; the message names the problem and is shown without a traceback."""
