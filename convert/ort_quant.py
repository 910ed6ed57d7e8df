"""ONNX Runtime's quantization tools, wrapped: pre-processing, dynamic INT8 and QDQ static INT8.

Each wrapper keeps the tools' per-tensor printing out of the console and turns their failures into
one :class:`QuantizeError` line. Static quantization reads calibration ranges saved by
:mod:`convert.calibrate` (``quantize_static(calibration_cache_path=...)``): it never calibrates.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from convert.attention import onnx_attention
from convert.config import CalibMethod, Int8Layout, Int8OpSet, QType, QuantConfig
from core.errors import InputError, ToolkitError, first_line
from core.fsutil import scratch_cwd


class QuantizeError(ToolkitError):
    """ONNX Runtime's quantization tooling failed on this model."""


def ort_qtype(name: QType) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def ort_method(name: CalibMethod) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools print progress and log warnings per tensor: keep them out."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def preprocess_for_quantization(src: Path, out: Path) -> str | None:
    """ONNX Runtime's ``quant_pre_process``: symbolic + ONNX shape inference and graph optimization. Where the
    symbolic shape inference cannot finish (e.g. a transformer's mask arithmetic traced by the TorchScript
    exporter), it is skipped, as ONNX Runtime's docs advise; the returned note says so (None otherwise)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = src.resolve(), out.resolve()
    external = {"save_as_external_data": True, "all_tensors_to_one_file": True} if large(src) else {}
    try:
        with quiet(), scratch_cwd():
            quant_pre_process(str(src), str(out), **external)
        return None
    except Exception as exc:
        first = first_line(exc, with_type=True)
    try:
        with quiet(), scratch_cwd():
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True, **external)
    except Exception as exc:
        raise QuantizeError(f"ONNX Runtime's quantization pre-processing failed on {src.name}: "
                            f"{first_line(exc, with_type=True)}") from exc
    return f"symbolic shape inference skipped ({first}); ONNX shape inference and optimization ran"


def quantizable_op_types(exclude: list[str]) -> list[str]:
    """Every op type ONNX Runtime can quantize (static QDQ or QOperator) minus ``exclude``."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - set(exclude))


#: --int8-ops weighted: the op types static INT8 quantizes in a model with attention (their inputs and, as ONNX
#: Runtime's QDQ quantizer does, their outputs: the MatMuls around the Softmax read and write INT8 as in NNCF's
#: transformer type). ONNX Runtime's own default quantizes every type it can, the layer norms, the residual Adds and
#: GELU's Muls included, and torchvision's vit_b_16 (random init, seeded head) lost 17.4 points of top-1 agreement on the
#: held-out photos that way, 0.26 with only these (``benchmarks/results/int8_ops_cpu.md``: 20 architectures, latency).
#: NNCF's transformer model type keeps the same ops float.
WEIGHTED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class OpChoice(NamedTuple):
    """What static INT8 quantizes for one ``--int8-ops`` set: the set it came to (auto resolves to all or weighted),
    its op types, and why."""

    set: Literal["all", "weighted"]
    ops: list[str]
    why: str


def static_op_types(graph: Any, op_set: Int8OpSet, exclude: list[str]) -> OpChoice:
    """The op types static INT8 quantizes in ``graph`` (an ONNX GraphProto; minus ``exclude``) for ``--int8-ops
    op_set``, and why; an InputError where the graph has none of them (ONNX Runtime would write an FP32 copy, or read
    an empty list as every type)."""
    everything = quantizable_op_types(exclude)
    weighted = [t for t in WEIGHTED_OP_TYPES if t not in exclude]
    choice: OpChoice
    if op_set == "all":
        choice = OpChoice("all", everything, "--int8-ops all: every op type ONNX Runtime can quantize")
    elif op_set == "weighted":
        choice = OpChoice("weighted", weighted, "--int8-ops weighted: " + "/".join(weighted) + " only")
    elif (count := onnx_attention(graph)).found:
        choice = OpChoice("weighted", weighted, f"auto: attention in the graph {count.describe()}: "
                                                f"{'/'.join(weighted)} only; layer norms, residual Adds and GELU stay "
                                                "float")
    else:
        choice = OpChoice("all", everything, f"auto: no attention in the graph {count.describe()}: every op type "
                                             "ONNX Runtime can quantize")
    if not {n.op_type for n in graph.node} & set(choice.ops):
        raise InputError(f"static INT8 has nothing to quantize: the graph has no op of "
                         f"{', '.join(choice.ops) or 'no type'} ({choice.why}"
                         f"{'; --exclude-op-types ' + ','.join(exclude) if exclude else ''})")
    return choice


def check_exclusions(graph: Any, cfg: QuantConfig) -> None:
    """Unknown ``--exclude-nodes``/``--exclude-op-types`` in ``graph`` (the pre-processed model's GraphProto) are one
    clear InputError naming what exists."""
    import difflib

    names = [n.name for n in graph.node]
    ops = sorted({n.op_type for n in graph.node})
    problems = []
    for n in cfg.exclude_nodes:
        if n not in names:
            close = difflib.get_close_matches(n, names, n=3)
            problems.append(f"no node named {n!r}" + (f" (did you mean {', '.join(close)}?)" if close else
                            f" (this model has {len(names)} nodes, e.g. {', '.join(names[:8])})"))
    bad_ops = [o for o in cfg.exclude_op_types if o not in ops]
    if bad_ops:
        problems.append(f"no node of op type(s) {bad_ops}; this model has {ops}")
    if problems:
        raise InputError("--exclude-nodes/--exclude-op-types: " + "; ".join(problems)
                         + " (names are those of the quantization pre-processed model)")


def large(model: Path) -> bool:
    """A model that keeps (or would need) its weights in an external-data file: its quantized copy must too."""
    from core.onnxfile import MAX_INLINE_BYTES, external_data_files

    return bool(external_data_files(model)) or model.stat().st_size >= MAX_INLINE_BYTES


def quantize_dynamic_file(model: Path, out: Path, cfg: QuantConfig, reduce_range: bool) -> None:
    """Dynamic INT8: weights quantized in the file, activations at run time."""
    from onnxruntime.quantization import quantize_dynamic

    try:
        with quiet():
            quantize_dynamic(str(model), str(out), op_types_to_quantize=quantizable_op_types(cfg.exclude_op_types),
                             per_channel=cfg.per_channel, reduce_range=reduce_range,
                             weight_type=ort_qtype(cfg.weight_type), nodes_to_exclude=list(cfg.exclude_nodes),
                             use_external_data_format=large(model))
    except Exception as exc:
        raise QuantizeError(f"dynamic INT8 quantization failed: {first_line(exc, with_type=True)}") from exc


def quantize_qdq(model: Path, out: Path, method: CalibMethod, cache: Path, fp32_nodes: list[str], cfg: QuantConfig,
                 what: str, layout: Int8Layout | None = None, **settings: Any) -> None:
    """ONNX Runtime's ``quantize_static`` from the ranges ``method`` saved in ``cache``: ``layout`` (default:
    QDQ with the config's weight scales) chooses the format, ``settings`` the types."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    fmt = QuantFormat.QOperator if layout is not None and layout.quant_format == "qoperator" else QuantFormat.QDQ
    per_channel = cfg.per_channel if layout is None else layout.per_channel
    try:
        with quiet():
            quantize_static(str(model), str(out), calibration_data_reader=None, quant_format=fmt,
                            per_channel=per_channel, nodes_to_exclude=[*cfg.exclude_nodes, *fp32_nodes],
                            calibrate_method=ort_method(method), calibration_cache_path=str(cache),
                            use_external_data_format=large(model), **settings)
    except Exception as exc:
        raise QuantizeError(f"{what} ({method}) failed: {first_line(exc, with_type=True)}") from exc


def quantize_static_file(model: Path, out: Path, method: CalibMethod, cache: Path, cfg: QuantConfig,
                         reduce_range: bool, fp32_nodes: list[str], op_types: list[str],
                         layout: Int8Layout | None = None) -> None:
    """Static quantization of ``op_types`` (:func:`static_op_types`) in ``model`` into ``out`` from saved
    calibration ranges, in ``layout`` (default: the config's own, QDQ)."""
    layout = layout or cfg.layout
    quantize_qdq(model, out, method, cache, fp32_nodes, cfg, f"static INT8 quantization ({layout.name})", layout,
                 op_types_to_quantize=op_types, reduce_range=reduce_range,
                 activation_type=ort_qtype(layout.activation_type), weight_type=ort_qtype(cfg.weight_type))
