"""The toolkit's few domain exceptions.

The CLI turns every ``ToolkitError`` into one clear line and a non-zero exit; a traceback is
shown only with ``--debug``. Library code never uses ``assert`` for user input.
"""

from __future__ import annotations

import errno


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


#: OSError numbers the user can act on, with what to do: one clear line instead of an internal error.
_ACTIONABLE_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space or choose another output folder"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another output folder"),
    errno.EFBIG: ("file too large for the file system", "choose another output folder"),
    errno.EROFS: ("read-only file system", "choose another output folder"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another path"),
}


def as_user_error(exc: BaseException) -> ToolkitError | None:
    """An exception from outside the toolkit that is still the user's to fix, as a ``ToolkitError`` with one
    clear line: a pydantic error from building a config (names the flag: ``--opset: Input should be less than
    or equal to 23``), or a full disk / quota / read-only or forbidden path (also when a library wrapped the
    OSError in its own exception). None for anything else (an internal error)."""
    from pydantic import ValidationError as PydanticValidationError

    if isinstance(exc, PydanticValidationError) and exc.errors():
        err = exc.errors()[0]
        names = [x for x in err["loc"] if isinstance(x, str)]
        return InputError(f"--{names[-1].replace('_', '-')}: {err['msg']}" if names else str(err["msg"]))
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _ACTIONABLE_OS_ERRORS:
            what, todo = _ACTIONABLE_OS_ERRORS[cause.errno]
            where = f" ({cause.filename})" if cause.filename else ""
            return InputError(f"{what}{where}: {todo}; files from earlier runs are left as they were")
        cause = cause.__cause__ or cause.__context__
    return None
