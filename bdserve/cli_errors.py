"""Every failure of a bdserve command ends as one line on stderr: what was wrong and what to do.

Commands raise ``CommandError`` for mistakes they can explain; ``ValueError`` and
``FileNotFoundError`` from the library already carry a sentence for the user. Anything
else is unexpected: its type and message, and a pointer to ``--debug``, which shows the
full traceback instead.
"""

from __future__ import annotations

import sys

DEBUG_HINT = "run with --debug for the traceback"


class CommandError(Exception):
    """A mistake the user can fix; the message says how. ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException) -> tuple[str, int]:
    """The line to print (without 'error: ') and the exit status."""
    if isinstance(exc, CommandError):
        return one_line(exc), exc.code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, OSError) and exc.strerror:  # errno errors: the sentence, and the file where there is one
        where = f"{exc.filename}: " if exc.filename else ""
        return one_line(where + exc.strerror), 2 if isinstance(exc, FileNotFoundError) else 1
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return one_line(exc), 2
    text = one_line(exc) or "(no message)"
    return f"{type(exc).__name__}: {text} ({DEBUG_HINT})", 1


def report(exc: BaseException) -> int:
    line, code = describe(exc)
    print(f"error: {line}", file=sys.stderr, flush=True)
    return code
