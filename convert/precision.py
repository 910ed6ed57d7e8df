"""FP16: weights and compute in half precision, inputs and outputs kept FP32 (callers change nothing).

Uses ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``, which inserts Cast
nodes at the graph boundary and keeps ops without FP16 kernels in FP32 (its default block list).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

from core.errors import ToolkitError
from core.onnxfile import save_onnx
from core.records import Fp16Info


class PrecisionError(ToolkitError):
    """The FP16 converter failed on this model."""


def convert_fp16(src: Path, out: Path) -> Fp16Info:
    """Write the FP16 model to ``out`` atomically; return what was done (for the manifest)."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # it warns about every value that FP16 clamps
            # Cast stays FP32: the converter retypes a Cast's output to FP16 but keeps its 'to' attribute
            # (FLOAT), which ONNX Runtime refuses (e.g. an attention mask cast from int64 to float).
            fp16 = float16.convert_float_to_float16(model, keep_io_types=True,
                                                    op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Cast"])
    except Exception as exc:
        raise PrecisionError(f"FP16 conversion of {src.name} failed: {type(exc).__name__}: {exc}") from exc
    save_onnx(fp16, out)
    casts = sum(1 for n in fp16.graph.node if n.op_type == "Cast") - sum(1 for n in model.graph.node
                                                                         if n.op_type == "Cast")
    return Fp16Info(converter="onnxconverter_common.float16.convert_float_to_float16", keep_io_types=True,
                    casts_added=casts)
