"""The one exception type of the command line's own checks (kept apart so every room can raise it)."""


class UsageError(Exception):
    """A problem with the command line, the environment or an input file: reported as one line
    without a traceback, exit code 2."""
