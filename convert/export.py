"""Export a PyTorch module to ONNX with the IOSpec's names and dynamic axes."""

from __future__ import annotations

import contextlib
import io
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
                dyn: dict[str, dict[int, Any]] | None = None
                if spec.dynamic_batch:
                    b = torch.export.Dim("batch", min=1, max=4096)
                    dyn = {name: {0: b} for name in spec.input_names}
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
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
