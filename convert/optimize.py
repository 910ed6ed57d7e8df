"""Graph optimization: onnxslim (constant folding, dead-node and redundancy removal, fusions that stay
standard ONNX) followed by ONNX Runtime's offline *basic* optimizations.

Basic-level ORT optimizations are hardware-independent and keep standard ONNX ops, so the
optimized model still runs on TensorRT and other runtimes; extended/layout levels would bake
CPU-specific contrib ops into the file.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from core.errors import ToolkitError
from core.fsutil import atomic_path
from core.records import OptimizeInfo
from runtimes.ort import session_options


class OptimizeError(ToolkitError):
    """The graph optimizer failed on this model."""


def optimize_onnx(src: Path, out: Path, *, slim: bool = True, ort_basic: bool = True) -> OptimizeInfo:
    """Write the optimized model to ``out`` atomically and return what was done (node counts)."""
    import onnx
    import onnxruntime as ort

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
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
        if ort_basic:
            # ORT writes the optimized graph to its own file; it replaces tmp, which atomic_path renames.
            ort_out = tmp.with_name(tmp.stem + ".ort.onnx")
            so = session_options(optimization="basic")
            so.optimized_model_filepath = str(ort_out)
            try:
                ort.InferenceSession(str(tmp), sess_options=so, providers=["CPUExecutionProvider"])
                os.replace(ort_out, tmp)
            except Exception as exc:
                ort_out.unlink(missing_ok=True)
                raise OptimizeError(f"ONNX Runtime offline optimization failed on {src.name}: {exc}") from exc
            steps.append("ort_basic")
    final = onnx.load(str(out))
    return OptimizeInfo(steps=steps, nodes_before=before, nodes_after_slim=after_slim,
                        nodes_after=len(final.graph.node))
