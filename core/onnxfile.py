"""ONNX files of any size: models past protobuf's 2 GiB limit keep their weights in ``FILE.data`` beside them.

``save_onnx`` writes inline below ``MAX_INLINE_BYTES`` and with external data above it (both atomically),
``external_data_files`` names the side files a model reads (the manifest hashes them with the model), and
``copy_onnx`` copies a model together with its side files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from core.errors import InputError
from core.fsutil import atomic_path, fsync_dir, fsync_file

#: protobuf refuses messages of 2 GiB; 64 MiB are left for the graph itself. Tests lower it.
MAX_INLINE_BYTES = 2**31 - 2**26


def data_name(final: Path) -> str:
    """The external-data file of ``final``: ``model.onnx`` -> ``model.onnx.data``."""
    return f"{Path(final).name}.data"


def save_onnx(model: Any, final: Path, max_inline: int | None = None) -> list[Path]:
    """Write ``model`` to ``final`` atomically; return every file written (the model first).

    Above ``max_inline`` bytes (default ``MAX_INLINE_BYTES``) the tensors go to ``final``'s ``.data`` file,
    written first, so that the model never names a data file that is not there yet.
    """
    import onnx

    final = Path(final)
    limit = MAX_INLINE_BYTES if max_inline is None else max_inline
    if model.ByteSize() < limit:
        with atomic_path(final) as tmp:
            onnx.save_model(model, str(tmp))
        return [final]
    data = final.with_name(data_name(final))
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.") as d:
        staged = Path(d) / final.name
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        move_into_place(staged, final, [staged.with_name(data.name)])
    return [final, data]


def move_into_place(staged: Path, final: Path, side: list[Path]) -> None:
    """Move a model staged in a private folder on ``final``'s filesystem, with its external-data files ``side``
    (same names beside ``final``), durably: data first, so that the model never names a file not there yet."""
    for path in [*side, staged]:
        fsync_file(path)
    for path in side:
        os.replace(path, final.with_name(path.name))
    os.replace(staged, final)
    fsync_dir(final.parent)


def external_data_files(path: Path) -> list[Path]:
    """The external-data files ``path``'s tensors point to (none for an inline model), each once.

    A location that is absolute or leaves the model's folder is refused: it would not travel with it.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    found: dict[str, Path] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        rel = PurePosixPath(location.replace("\\", "/"))
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"{path.name}: external data location {location!r} is not inside its folder")
        found.setdefault(rel.as_posix(), path.parent / rel)
    return list(found.values())


def copy_onnx(src: Path, final: Path) -> list[Path]:
    """Copy a model and its external-data files (same relative locations) beside ``final``; return the copies."""
    src, final = Path(src), Path(final)
    copies = [final]
    for data in external_data_files(src):
        target = final.parent / data.relative_to(src.parent)
        if not data.is_file():
            raise InputError(f"{src.name} needs its external data file {data}, which does not exist")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(data, tmp)
        copies.append(target)
    with atomic_path(final) as tmp:
        shutil.copyfile(src, tmp)
    return copies
