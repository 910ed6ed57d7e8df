"""Transactional folders: a run builds its whole set of files in a staging folder and swaps it in at the end.

``staged_folder(target)`` yields a fresh ``.NAME.staging-<pid>`` folder beside ``target`` (same filesystem,
so the swap is a rename). Leaving the block normally makes the staged set durable (fsync) and swaps it in
(one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux, two renames elsewhere); an exception, SIGINT or SIGTERM
removes the staging folder and leaves ``target`` as it was, byte for byte. Content of ``target`` that the
caller chooses to ``carry`` (bench results, caches, the user's own files) is hard-linked into the staging
folder first, so it survives the swap without the old folder ever being modified.

``staged_files(folder, names)`` is the same for a set of files in a shared folder (``results.json`` with its
.csv/.md/.html): staged in a hidden sub-folder, then renamed into place together, the source of truth last,
with SIGINT/SIGTERM held off while they move.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from core.errors import InputError
from core.fsutil import fsync_dir, fsync_tree

STAGING_TAG = ".staging-"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Guard:
    """SIGINT -> KeyboardInterrupt and SIGTERM -> SystemExit(143) while a run stages, so every ``finally``
    cleans up; inside ``deferred()`` (a swap, a cleanup) a signal is held and raised when it ends."""

    depth = 0
    held: int | None = None
    raised: int | None = None  # the signal last raised as an exception, until the block ends

    @classmethod
    def handler(cls, signum: int, _frame: FrameType | None) -> None:
        if cls.depth:
            cls.held = cls.held or signum
            return
        cls.raised = signum
        _raise_for(signum)

    @classmethod
    def raise_swallowed(cls) -> None:
        """Raise again a signal whose exception was swallowed: Python runs the handler wherever the main thread
        is, and in a finalizer or garbage-collector callback the exception is only printed ("Exception ignored
        in ..."). Called where a block ends normally, which an exception that propagated never reaches."""
        if cls.raised is not None:
            signum, cls.raised = cls.raised, None
            _raise_for(signum)

    @classmethod
    @contextlib.contextmanager
    def deferred(cls) -> Iterator[None]:
        cls.depth += 1
        try:
            yield
        finally:
            cls.depth -= 1
            if not cls.depth and cls.held is not None:
                signum, cls.held = cls.held, None
                _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Install the guard's handlers for the block (main thread only; elsewhere signals are left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Guard.raised = None
    previous = {s: signal.signal(s, _Guard.handler) for s in _SIGNALS}
    hook = sys.unraisablehook

    def quiet(unraisable: Any) -> None:  # the guard's own exception, swallowed: raised again at the block's end
        if not (_Guard.raised is not None and isinstance(unraisable.exc_value, KeyboardInterrupt | SystemExit)):
            hook(unraisable)

    sys.unraisablehook = quiet
    try:
        yield
    finally:
        with _Guard.deferred():
            sys.unraisablehook = hook
            for s, h in previous.items():
                signal.signal(s, h)


def staging_path(target: Path) -> Path:
    return target.parent / f".{target.name}{STAGING_TAG}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: Path) -> None:
    """Staging folders of runs that were killed outright (SIGKILL, power loss) and can no longer clean up."""
    for stale in target.parent.glob(f".{target.name}{STAGING_TAG}*"):
        pid = stale.name.rsplit(STAGING_TAG, 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_into(old: Path, stage: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link (or copy) every file of ``old`` whose relative path ``keep`` accepts into ``stage``.

    Links are safe because every writer replaces files by rename (``atomic_path``), never in place.
    """
    for folder, _dirs, files in os.walk(old):
        rel_dir = Path(folder).relative_to(old)
        for name in files:
            rel = (rel_dir / name).as_posix()
            if keep(rel) and not os.path.islink(Path(folder) / name):
                (stage / rel_dir).mkdir(parents=True, exist_ok=True)
                _link_or_copy(Path(folder) / name, stage / rel)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where that is unsupported."""
    if sys.platform != "linux":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(stage: Path, target: Path) -> None:
    """Make ``stage``'s content ``target``'s; ``stage`` then holds the old content (or nothing), to be removed."""
    if not target.exists():
        os.rename(stage, target)
    elif not _exchange(stage, target):
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        try:
            os.rename(stage, target)
        except OSError:
            os.rename(old, target)
            raise
        os.rename(old, stage)
    fsync_dir(target.parent)


def _missing_parents(target: Path) -> list[Path]:
    """The folders above ``target`` that do not exist yet, outermost first (removed again on failure)."""
    missing = [p for p in target.parents if not p.exists()]
    return list(reversed(missing))


def _make_stage(target: Path, stage: Path) -> None:
    """Create ``stage`` (and ``target``'s missing parents); the caller removes both when this or its block fails."""
    if target.exists() and not target.is_dir():
        raise InputError(f"output folder {target} exists and is not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        stage.mkdir()
    except OSError as exc:
        raise InputError(f"output folder {target} cannot be written: {exc.strerror or exc}") from None


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def staged_folder(target: Path, carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a staging folder for ``target``'s new content; swap it in when the block ends normally.

    ``carry``: which files of the existing ``target`` (relative POSIX paths) the new set keeps.
    """
    target = Path(target)
    # DIR/..: the folder it names, so that the staging folder beside it is not inside it (and copied into itself)
    target = target.resolve() if target.name == ".." else target.absolute()
    with signals_raise():
        # named before they exist, so that a signal arriving while they are made (or just after) still removes them
        stage, created = staging_path(target), _missing_parents(target)
        committed = False
        try:
            _make_stage(target, stage)
            if carry is not None and target.is_dir():
                carry_into(target, stage, carry)
            yield stage
            _Guard.raise_swallowed()
            with _Guard.deferred():
                fsync_tree(stage)
                swap_in(stage, target)
                committed = True
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            if not committed:
                with _Guard.deferred():
                    shutil.rmtree(stage, ignore_errors=True)
                    _remove_empty(created)


@contextlib.contextmanager
def staged_files(folder: Path, names: list[str]) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``folder``; on success move ``names`` from it into ``folder`` in
    that order (put the source of truth last). A name the block did not write is removed from ``folder``, so
    an old file never sits beside a new set it does not belong to."""
    folder = Path(folder)
    with signals_raise():
        created = _missing_parents(folder / "x")
        stage = folder / f"{STAGING_TAG.strip('-')}-{os.getpid()}"
        ok = False
        try:  # from before the folders are made: a signal arriving meanwhile still removes them
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir()
            yield stage
            _Guard.raise_swallowed()
            with _Guard.deferred():
                fsync_tree(stage)
                for name in names:
                    if (stage / name).is_file():
                        os.replace(stage / name, folder / name)
                    else:
                        (folder / name).unlink(missing_ok=True)
                fsync_dir(folder)
                ok = True
        finally:
            with _Guard.deferred():
                shutil.rmtree(stage, ignore_errors=True)
                if not ok:
                    _remove_empty(created)
