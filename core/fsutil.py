"""Atomic, durable writes and hashing: a failed step never leaves a half-written file behind, and a
file renamed into place has its bytes on disk first (fsync of the file, then of its folder)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.errors import InputError


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise one clear InputError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"output folder {path} cannot be written: {exc.strerror or exc}") from None
    return path


def check_writable_target(path: Path) -> Path:
    """Prove ``path`` (a folder) could be created or written, creating nothing: a run that fails later must
    not leave an empty folder behind (``bench`` on a model folder that does not exist)."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise InputError(f"output folder {path} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output folder {path} cannot be written: {existing} is not writable")
    return path


def check_output_file(path: Path, flag: str, example: str) -> Path:
    """Prove ``path`` can be written as a file (its folder created if needed), creating nothing: a folder
    there is one clear InputError naming ``flag`` and an ``example`` file name, before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; expected the path of the file to write, e.g. "
                         f"{path / example}")
    check_writable_target(path.parent)
    return path


def check_not_an_input(path: Path, flag: str, inputs: Iterable[Path]) -> Path:
    """Refuse an output path that is one of the command's inputs, by any name (``a/../a``, a symlink, a hard
    link): writing it would destroy the input (``report RUN/results.json --html RUN/results.json``)."""
    path = Path(path)
    for src in map(Path, inputs):
        if _same_file(path, src):
            raise InputError(f"{flag} {path} is also an input ({src}): writing it would destroy that file; choose "
                             f"another path")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto ``final`` only on success.

    The temporary name keeps the final suffix so that libraries which look at the extension
    (onnx, torch.save) behave the same.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # ONNX external-data side files written next to the temp model.
        for side in final.parent.glob(f"{tmp.name}*"):
            with contextlib.suppress(OSError):
                side.unlink()
        raise


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (after a rename into it); a no-op where folders cannot be opened (Windows)."""
    if os.name != "nt":
        fsync_file(path)


def fsync_tree(root: Path) -> None:
    """Every file and folder under ``root`` (included), deepest first: a staged set is durable before its swap."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(Path(folder) / name):
                fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def scratch_cwd() -> Iterator[None]:
    """Run inside a temporary working directory, removed afterwards: ONNX Runtime's symbolic shape inference
    writes ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` into the current directory when it fails (the
    quantization pre-processing and bench's MAC count both call it), and nothing may be left in the user's
    folder. Paths given to the tools must be absolute."""
    with tempfile.TemporaryDirectory(prefix=".onnxkit-scratch-") as tmp, contextlib.chdir(tmp):
        yield
