"""Export a PyTorch module to ONNX with the IOSpec's names and dynamic axes."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from core.errors import ToolkitError
from core.fsutil import atomic_path
from core.iospec import BATCH, IOSpec, TensorSpec

Exporter = Literal["torchscript", "dynamo"]


class ExportError(ToolkitError):
    """torch.onnx could not export the model."""


def _dummy_args(spec: IOSpec, batch: int) -> tuple[Any, ...]:
    import torch

    feed = spec.random_feed(batch, seed=0)
    return tuple(torch.from_numpy(feed[n]) for n in spec.input_names)


def _summary(exc: BaseException) -> str:
    """The informative line of an exporter error (torch.onnx wraps the cause in a long report)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0]
    return lines[0] if lines else type(exc).__name__


def export_onnx(module: Any, spec: IOSpec, out: Path, *, opset: int, exporter: Exporter) -> None:
    """Write ``out`` atomically. The dummy batch is 2 when the batch is dynamic, so that no exporter
    specialises on a batch of 1."""
    import torch

    batch = 2 if spec.dynamic_batch else (spec.fixed_batch() or 1)
    args = _dummy_args(spec, batch)
    with atomic_path(out) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                dyn: tuple[dict[int, Any], ...] | None = None
                if spec.dynamic_batch:
                    # Positional form: torch.export matches dict keys to forward()'s arg names, not ours.
                    b = torch.export.Dim("batch", min=1, max=4096)
                    dyn = tuple({0: b} for _ in spec.input_names)
                prog = torch.onnx.export(module, args, None, input_names=spec.input_names,
                                         output_names=spec.output_names, opset_version=opset, dynamo=True,
                                         dynamic_shapes=dyn, external_data=False, optimize=True)
                if prog is None:
                    raise ExportError("the dynamo exporter returned no program")
                prog.save(str(tmp), external_data=False)
            else:
                torch.onnx.export(module, args, str(tmp), input_names=spec.input_names,
                                  output_names=spec.output_names, opset_version=opset, dynamo=False,
                                  dynamic_axes=spec.dynamic_axes() or None, do_constant_folding=True)
        except ToolkitError:
            raise
        except Exception as exc:
            msg = _summary(exc)
            raise ExportError(f"ONNX export ({exporter}, opset {opset}) failed: {type(exc).__name__}: {msg}") from exc


def complete_output_spec(spec: IOSpec, onnx_model: Any) -> IOSpec:
    """Fill the output names/shapes from the exported graph (e.g. the number of classes)."""
    from core.iospec import spec_from_onnx

    graph_spec = spec_from_onnx(onnx_model)
    outputs: list[TensorSpec] = []
    for t in graph_spec.outputs:
        shape = list(t.shape)
        if spec.dynamic_batch and shape and not isinstance(shape[0], int):
            shape[0] = BATCH
        outputs.append(TensorSpec(name=t.name, shape=shape, dtype=t.dtype))
    return IOSpec(inputs=spec.inputs, outputs=outputs)
