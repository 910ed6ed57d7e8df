"""The toolkit's few domain exceptions.

The CLI turns every ``ToolkitError`` into one clear line and a non-zero exit; a traceback is
shown only with ``--debug``. Library code never uses ``assert`` for user input.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class: an error the user can act on, with a message that says how."""

    exit_code = 1


class InputError(ToolkitError):
    """Bad user input: unknown name, missing or unreadable file, malformed flag value."""

    exit_code = 2


class BackendUnavailableError(ToolkitError):
    """A runtime, device or optional library that the request needs is not present here."""

    exit_code = 3


class ValidationError(ToolkitError):
    """One or more checks failed; every failure is listed, not only the first."""

    exit_code = 4

    def __init__(self, what: str, failures: list[str]) -> None:
        self.what = what
        self.failures = list(failures)
        lines = "; ".join(self.failures)
        super().__init__(f"{what}: {len(self.failures)} check(s) failed: {lines}")


class AccuracyGateError(ToolkitError):
    """A variant lost more accuracy than the user's budget allows."""

    exit_code = 5


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (libraries often append pages of context), or its
    type name when the message is empty. ``with_type`` prefixes the type: ``DecodeError: ...``."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return f"{type(exc).__name__}: {line}" if with_type else line
