"""User-facing errors.

Anything a user can cause (a bad argument, a bad file, an unknown model) is raised as a
:class:`PixifyError`. The CLI prints it as one line and exits with code 2; the Python API lets it
propagate. Bugs stay ordinary exceptions.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes a library put into its own message


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """``TypeName: first line of the message`` (cut to ``limit`` characters), or the type name alone: how a
    library's or torch's exception is quoted inside a one-line error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PixifyError(Exception):
    """An error caused by the user's input, with a one-line message and an optional hint."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = re.sub(r"\s*[\r\n]+\s*", " ", _ANSI.sub("", message)).strip()
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RuleError(PixifyError):
    """A rules file is malformed: names the file, the line and the reason."""

    def __init__(self, path: str, line: int | None, reason: str):
        where = f"{path}:{line}" if line else str(path)
        if str(path).startswith("<"):  # a rule given in Python, not read from a file
            super().__init__(f"invalid rule {where}: {reason}")
        else:
            super().__init__(f"invalid rules file {where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class CheckpointError(PixifyError):
    """A checkpoint cannot be read or does not reproduce."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with one line saying what was kept (the CLI prints it and exits with 130)."""


class PixifyWarning(UserWarning):
    """Something the user should know that does not stop the work (one line)."""
