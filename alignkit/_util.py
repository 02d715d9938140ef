"""Small helpers shared by the modules that turn exceptions into one-line user errors."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when the message is empty (an
    error handler must never fail on an exception without a message)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class AlignkitWarning(UserWarning):
    """Warnings alignkit raises about a user's configuration (printed as one line by the CLI)."""
