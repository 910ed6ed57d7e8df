"""What OpenVINO-IR variants share (``--int4-ov``: :mod:`convert.int4_ov`, ``--int8-nncf``: :mod:`convert.int8_nncf`):
the check that NNCF and OpenVINO are installed, NNCF's output kept out of our log, the versions recorded, the IR's
constant element types, and recording an IR in the manifest as kind ``openvino_ir`` with its ``.bin`` hashed as the
file's data file (so ``verify`` catches a changed ``.bin``). Only ``runtimes.openvino.OpenVinoRunner`` lists that
kind; every other backend asked for it skips it with the reason.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.manifest import ArtifactKind, DataFile, Manifest
from core.quiet import quiet_loggers

if TYPE_CHECKING:
    from convert.context import ConvertContext

#: the artifact kind the only backend that runs it lists (runtimes.openvino.OpenVinoRunner.artifact_kinds)
KIND: ArtifactKind = "openvino_ir"


def nncf_problem(flag: str) -> str | None:
    """None when NNCF and OpenVINO import, else the one line saying what ``flag`` needs installed."""
    for module, extra in (("openvino", "openvino"), ("nncf", "ovgenai")):
        try:
            __import__(module)
        except ImportError:
            return f"{flag} needs {module} (pip install '.[{extra}]')"
    return None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """NNCF logs its tables and draws progress bars on stdout: none of it reaches our log."""
    with quiet_loggers("nncf"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def versions() -> tuple[str, str]:
    """NNCF's and OpenVINO's versions, as recorded."""
    from importlib import metadata

    return metadata.version("nncf"), metadata.version("openvino")


def constant_types(xml: Path) -> dict[str, int]:
    """How many Constant nodes of each element type (``u4``, ``i4``, ``u8``, ``f32``, ...) the IR holds."""
    import openvino as ov

    counts: dict[str, int] = {}
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() == "Constant":
            t = op.get_element_type().get_type_name()
            counts[t] = counts.get(t, 0) + 1
    return counts


def record_ir(ctx: ConvertContext, xml: Path, **record: Any) -> Any:
    """Record the IR ``xml`` as kind ``openvino_ir``, its ``.bin`` (hashed) as the file's data file."""
    art = ctx.manifest.record(ctx.out, xml, kind=KIND, **record)
    bin_rec = Manifest.file_record(ctx.out, xml.with_suffix(".bin"), onnx=False)
    art.file.external_data = [DataFile(path=bin_rec.path, sha256=bin_rec.sha256, size_bytes=bin_rec.size_bytes)]
    return art
