"""Graph optimization: onnxslim (constant folding, dead-node and redundancy removal, fusions that stay
standard ONNX) followed by ONNX Runtime's offline *basic* optimizations.

Basic-level ORT optimizations are hardware-independent and keep standard ONNX ops, so the
optimized model still runs on TensorRT and other runtimes; extended/layout levels would bake
CPU-specific contrib ops into the file.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

from core import onnxfile
from core.errors import ToolkitError
from core.onnxfile import data_name, save_onnx
from core.records import OptimizeInfo
from runtimes.ort import session_options


class OptimizeError(ToolkitError):
    """The graph optimizer failed on this model."""


def optimize_onnx(src: Path, out: Path, *, slim: bool = True, ort_basic: bool = True) -> OptimizeInfo:
    """Write the optimized model to ``out`` atomically and return what was done (node counts)."""
    import onnx

    model = onnx.load(str(src))
    before = len(model.graph.node)
    steps: list[str] = []
    if slim:
        import onnxslim

        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                model = onnxslim.slim(model)
        except Exception as exc:
            raise OptimizeError(f"onnxslim failed on {src.name}: {type(exc).__name__}: {exc}") from exc
        steps.append("onnxslim")
    after_slim = len(model.graph.node)
    if ort_basic:
        model = _ort_basic(model, src, out)
        steps.append("ort_basic")
    save_onnx(model, out)
    return OptimizeInfo(steps=steps, nodes_before=before, nodes_after_slim=after_slim,
                        nodes_after=len(model.graph.node))


def _ort_basic(model: Any, src: Path, out: Path) -> Any:
    """ONNX Runtime's basic offline optimizations, in a private folder (a model past 2 GiB goes in and
    comes out with external data)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.ort-") as d:
        given, optimized = Path(d) / "in.onnx", Path(d) / "ort.onnx"
        big = model.ByteSize() >= onnxfile.MAX_INLINE_BYTES
        save_onnx(model, given)
        so = session_options(optimization="basic")
        so.optimized_model_filepath = str(optimized)
        if big:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        data_name(optimized))
        try:
            ort.InferenceSession(str(given), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OptimizeError(f"ONNX Runtime offline optimization failed on {src.name}: {exc}") from exc
        return onnx.load(str(optimized))
