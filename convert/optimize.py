"""Graph optimization: onnxslim (constant folding, dead-node and redundancy removal, fusions that stay
standard ONNX) followed by ONNX Runtime's offline *basic* optimizations.

Basic-level ORT optimizations are hardware-independent and keep standard ONNX ops, so the
optimized model still runs on TensorRT and other runtimes; extended/layout levels would bake
CPU-specific contrib ops into the file.

Each step goes file to file in a private folder beside ``out``: onnxslim's result is saved and dropped before
ONNX Runtime reads it from its path, and ONNX Runtime's output is moved into place, not loaded again. Models
past 2 GiB (weights in a ``.data`` file) skip onnxslim, which holds several copies of the weights at once
(vit_h_14, 2.5 GB of weights: over 20 GB resident, ended by the OOM killer on a 24 GB machine); ONNX Runtime's
basic level still folds constants and removes redundant nodes. The skip is recorded with its reason.
"""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
from pathlib import Path

from core import onnxfile
from core.errors import ToolkitError
from core.onnxfile import data_name, move_into_place, save_onnx
from core.records import OptimizeInfo
from runtimes.ort import session_options

SLIM_SKIPPED = ("model past 2 GiB: onnxslim holds several copies of its weights at once (over 20 GB for vit_h_14); "
                "ONNX Runtime's basic optimizations still ran")


class OptimizeError(ToolkitError):
    """The graph optimizer failed on this model."""


def optimize_onnx(src: Path, out: Path, *, slim: bool = True, ort_basic: bool = True) -> OptimizeInfo:
    """Write the optimized model to ``out`` (with its ``.data`` file past 2 GiB) atomically and return what was
    done (node counts)."""
    before = after_slim = _node_count(src)
    steps: list[str] = []
    skipped: dict[str, str] = {}
    if slim and _needs_external_data(src):
        slim, skipped["onnxslim"] = False, SLIM_SKIPPED
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.opt-") as d:
        current = src
        if slim:
            current, after_slim = _slim(src, Path(d) / "slim" / out.name)
            steps.append("onnxslim")
        if ort_basic:
            current = _ort_basic(current, Path(d) / "ort" / out.name, src)
            steps.append("ort_basic")
        if current == src:  # no step: a copy whose data file is named after ``out``
            _resave(src, out)
        else:
            _move_into_place(current, out)
    return OptimizeInfo(steps=steps, nodes_before=before, nodes_after_slim=after_slim, nodes_after=_node_count(out),
                        skipped=skipped)


def _resave(src: Path, out: Path) -> None:
    import onnx

    save_onnx(onnx.load(str(src)), out)


def _node_count(path: Path) -> int:
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node)
    except Exception as exc:
        raise OptimizeError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc


def _slim(src: Path, staged: Path) -> tuple[Path, int]:
    """onnxslim on ``src``, saved to ``staged`` (inline or with external data, by size); the loaded copies are
    dropped before returning."""
    import onnx
    import onnxslim

    staged.parent.mkdir()
    try:
        model = onnx.load(str(src))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = onnxslim.slim(model)
    except Exception as exc:
        raise OptimizeError(f"onnxslim failed on {src.name}: {type(exc).__name__}: {exc}") from exc
    nodes = len(model.graph.node)
    save_onnx(model, staged)
    del model
    gc.collect()
    return staged, nodes


def _ort_basic(given: Path, optimized: Path, src: Path) -> Path:
    """ONNX Runtime's basic offline optimizations of the file ``given``, written to ``optimized`` (past the inline
    limit with its tensors in ``optimized``'s ``.data`` file). Weight prepacking is off: the session is only
    built to write the optimized graph, and prepacked copies would hold the weights twice more."""
    import onnxruntime as ort

    optimized.parent.mkdir()
    so = session_options(optimization="basic")
    so.optimized_model_filepath = str(optimized)
    so.add_session_config_entry("session.disable_prepacking", "1")
    if _needs_external_data(given):
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    data_name(optimized))
    try:
        session = ort.InferenceSession(str(given), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OptimizeError(f"ONNX Runtime offline optimization failed on {src.name}: {exc}") from exc
    del session
    gc.collect()
    return optimized


def _needs_external_data(path: Path) -> bool:
    size = path.stat().st_size + sum(p.stat().st_size for p in onnxfile.external_data_files(path))
    return size >= onnxfile.MAX_INLINE_BYTES


def _move_into_place(staged: Path, out: Path) -> None:
    """Move a model written in the private folder, with its ``.data`` file (named after ``out``), to ``out``."""
    side = onnxfile.external_data_files(staged)
    if any(p.name != data_name(out) for p in side):
        raise OptimizeError(f"{staged.name}: unexpected external data files {[p.name for p in side]}")
    move_into_place(staged, out, side)
