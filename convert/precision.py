"""FP16: weights and compute in half precision, inputs and outputs kept FP32 (callers change nothing).

Uses ONNX Runtime's own converter, ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``
(the one its transformer optimizer and Optimum's ORTOptimizer use): Cast nodes at the graph boundary, ops without
FP16 kernels kept in FP32 (its default block list). onnxconverter-common's copy of it writes files ONNX Runtime
refuses on Optimum's decoder exports (a Transpose typed FP16 whose consumer expects FP32) and retypes a Cast's output
without its ``to`` attribute.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

from core.errors import ToolkitError
from core.onnxfile import save_onnx
from core.records import Fp16Info

#: the converter, as the manifest names it
FP16_CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16"


class PrecisionError(ToolkitError):
    """The FP16 converter failed on this model."""


def convert_fp16(src: Path, out: Path) -> Fp16Info:
    """Write the FP16 model to ``out`` atomically; return what was done (for the manifest)."""
    import onnx
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # it warns about every value that FP16 clamps
            fp16 = float16.convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)
            graph = OnnxModel(fp16)
            graph.topological_sort()  # the converter appends the input casts after their consumers
            fp16 = graph.model
    except Exception as exc:
        raise PrecisionError(f"FP16 conversion of {src.name} failed: {type(exc).__name__}: {exc}") from exc
    save_onnx(fp16, out)
    casts = sum(1 for n in fp16.graph.node if n.op_type == "Cast") - sum(1 for n in model.graph.node
                                                                         if n.op_type == "Cast")
    return Fp16Info(converter=FP16_CONVERTER, keep_io_types=True,
                    casts_added=casts)
