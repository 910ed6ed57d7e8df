"""Export a PyTorch module to ONNX with the IOSpec's names and dynamic axes."""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from core.errors import InputError, ToolkitError
from core.fsutil import atomic_path
from core.iospec import BATCH, IOSpec, TensorSpec

Exporter = Literal["torchscript", "dynamo"]


class ExportError(InputError):
    """torch.onnx could not export the model (its forward failed, an op or opset it cannot export):
    a problem of the input model, so exit code 2."""


def _summary(exc: BaseException) -> str:
    """The informative line of an exporter error (torch.onnx wraps the cause in a long report)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0]
    return lines[0] if lines else type(exc).__name__


def export_onnx(module: Any, spec: IOSpec, out: Path, *, opset: int, exporter: Exporter,
                sample: dict[str, Any] | None = None) -> None:
    """Write ``out`` atomically, with every symbolic dim of the IOSpec dynamic. ``sample``: the inputs to
    trace with, by name (default: seeded random ones at batch 2 when the batch is dynamic, so that no
    exporter specialises on a batch of 1)."""
    import numpy as np
    import torch

    if sample is None:
        sample = spec.random_feed(2 if spec.dynamic_batch else (spec.fixed_batch() or 1), seed=0)
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[n])) for n in spec.input_names)
    # A private folder: past 2 GiB the exporters write tensors as side files next to the model.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.export-") as d:
        tmp = Path(d) / out.name
        notes = _export(module, spec, args, tmp, opset=opset, exporter=exporter)
        _check_traced(tmp, spec, notes)
        _place(tmp, out)


def _check_traced(exported: Path, spec: IOSpec, notes: list[str]) -> None:
    """An input missing from the exported graph means the trace lost track of it: forward() left PyTorch
    (``.numpy()``, ``.item()``, Python arithmetic on values), so its result was frozen as a constant. That
    model cannot be exported faithfully: one clear ExportError saying so, and why when the tracer said."""
    import onnx

    graph = onnx.load(str(exported), load_external_data=False).graph
    missing = [n for n in spec.input_names if n not in {i.name for i in graph.input}]
    if missing:
        why = (f"forward() leaves PyTorch (the tracer: {notes[0].split('. ')[0]}), so the result was recorded as a "
               "constant" if notes else "forward() ignores it or leaves PyTorch (e.g. .numpy(), .item(), .tolist())")
        raise ExportError(f"the model cannot be traced for export: the traced graph does not use input(s) {missing}; "
                          f"{why}; keep forward() in torch operations, or try --exporter dynamo")


def _place(exported: Path, out: Path) -> None:
    """Move an inline model into place; one with external data (or too big) is re-saved as ``out`` +
    ``out.data`` by :func:`core.onnxfile.save_onnx`."""
    from core import onnxfile

    if os.listdir(exported.parent) == [exported.name] and exported.stat().st_size < onnxfile.MAX_INLINE_BYTES:
        with atomic_path(out) as tmp:
            os.replace(exported, tmp)
        return
    import onnx

    onnxfile.save_onnx(onnx.load(str(exported)), out)


def _export(module: Any, spec: IOSpec, args: tuple[Any, ...], tmp: Path, *, opset: int,
            exporter: Exporter) -> list[str]:
    """Export to ``tmp``; return the first line of each TracerWarning (what the trace may have got wrong)."""
    import torch

    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        try:
            if exporter == "dynamo":
                # Positional form: torch.export matches dict keys to forward()'s arg names, not ours. One
                # Dim object per name, so a dim shared by several inputs is one dim.
                named = {d: torch.export.Dim(d, min=1, max=65536) for d in spec.symbolic_dims()}
                per_input = tuple({i: named[d] for i, d in enumerate(t.shape) if isinstance(d, str)}
                                  for t in spec.inputs)
                dyn = per_input if any(per_input) else None
                prog = torch.onnx.export(module, args, None, input_names=spec.input_names,
                                         output_names=spec.output_names, opset_version=opset, dynamo=True,
                                         dynamic_shapes=dyn, optimize=True)
                if prog is None:
                    raise ExportError("the dynamo exporter returned no program")
                prog.save(str(tmp))  # external data by itself past 2 GiB
            else:
                torch.onnx.export(module, args, str(tmp), input_names=spec.input_names,
                                  output_names=spec.output_names, opset_version=opset, dynamo=False,
                                  dynamic_axes=spec.dynamic_axes() or None, do_constant_folding=True)
        except ToolkitError:
            raise
        except Exception as exc:
            msg = _summary(exc)
            raise ExportError(f"ONNX export ({exporter}, opset {opset}) failed: {type(exc).__name__}: {msg}") from exc
    return [str(w.message).strip().splitlines()[0] for w in caught
            if type(w.message).__name__ == "TracerWarning" and str(w.message).strip()]


def complete_output_spec(spec: IOSpec, onnx_model: Any) -> IOSpec:
    """Fill the output names/shapes from the exported graph (e.g. the number of classes), and what the graph
    says of the inputs' meaning (token ids: the vocabulary their embedding table has; masks)."""
    from core.iospec import spec_from_onnx

    graph_spec = spec_from_onnx(onnx_model)
    outputs: list[TensorSpec] = []
    for t in graph_spec.outputs:
        shape = list(t.shape)
        if spec.dynamic_batch and shape and not isinstance(shape[0], int):
            shape[0] = BATCH
        outputs.append(TensorSpec(name=t.name, shape=shape, dtype=t.dtype))
    hints = {t.name: t for t in graph_spec.inputs}
    inputs = [t.model_copy(update={"int_range": hints[t.name].int_range or t.int_range, "fill": hints[t.name].fill})
              if t.name in hints else t for t in spec.inputs]
    return spec.model_copy(update={"inputs": inputs, "outputs": outputs})
