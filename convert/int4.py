"""INT4 weight-only quantization (``--int4``): ONNX Runtime's own ``MatMulNBitsQuantizer``.

Every MatMul whose weight is a constant becomes a ``com.microsoft.MatMulNBits``: the weight in 4-bit blocks of
``block_size`` values along K (K zero-padded to a multiple), one scale per block (and a zero point unless symmetric);
activations stay FP32 (``accuracy_level`` lets the kernel compute in lower precision). The algorithms are ONNX
Runtime's: ``rtn`` round to nearest per block (``DefaultWeightOnlyQuantConfig``, its C++ blockwise quantizer, the one
ONNX Runtime GenAI's model builder uses), ``hqq`` half-quadratic quantization (``HQQWeightOnlyQuantConfig``, no data,
asymmetric with float zero points), ``gptq`` (``GPTQWeightOnlyQuantConfig``, its bundled Neural Compressor code, offline)
on calibration inputs: ``--calib`` when given, else seeded random inputs of the model's IOSpec (token ids inside the
vocabulary), said in the record.

The quantizer only rewrites MatMul: a ``Gemm`` with a constant weight (GPT-2's Conv1D layers export as one, with their
bias) is first rewritten as MatMul + Add (:func:`gemm_to_matmul`), so those layers are quantized too. Embedding
tables (Gather) stay FP32: their INT4 form (GatherBlockQuantized) needs opset 21, which the quantizer forces on
the graph with a warning that the result may be invalid.

The variant is one row of ``convert.variants.VARIANTS``; it is graded on held-out inputs like every variant and, for a
decoder with a KV cache, by greedy decoding against the FP32 model (:mod:`convert.genvalidate`). A model exported as
several files gets it per component (:data:`INT4_PER_COMPONENT`, ``rtn`` and ``hqq``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field

from convert.component_variants import ComponentState, PerComponent
from convert.config import Int4Config, QuantConfig
from convert.context import ConvertContext
from convert.quantize import QuantState, record_variant
from core.errors import InputError, ToolkitError, first_line
from core.onnxfile import external_data_files, save_onnx
from core.quiet import quiet_loggers
from core.records import StepParams, VariantParams

BITS = 4
#: what the manifest names as the quantizer
QUANTIZER = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"
#: ONNX Runtime's config class of each algorithm
ALGORITHM_CONFIGS = {"rtn": "DefaultWeightOnlyQuantConfig", "hqq": "HQQWeightOnlyQuantConfig",
                     "gptq": "GPTQWeightOnlyQuantConfig"}
#: GPTQ without --calib: this many seeded random inputs of the IOSpec
GPTQ_SEEDED_SAMPLES = 8


class Int4Error(ToolkitError):
    """ONNX Runtime's INT4 quantizer failed on this model."""


class Int4Params(VariantParams):
    """What ``--int4`` did (``Artifact.params`` of ``int4``)."""

    model_config = ConfigDict(extra="forbid")

    step: Literal["quantize_int4"] = "quantize_int4"
    quantizer: str = QUANTIZER
    algorithm: str = Field(description="rtn, hqq or gptq")
    algorithm_config: str = Field(description="ONNX Runtime's config class for it")
    bits: int = BITS
    block_size: int
    symmetric: bool
    accuracy_level: int | None
    matmuls_quantized: int = Field(description="MatMul nodes now MatMulNBits (over every component)")
    matmuls_kept: int = Field(description="MatMul nodes left in FP32: no constant 2-D weight")
    gemms_rewritten: int = Field(description="Gemm nodes with a constant weight rewritten as MatMul + Add first")
    embeddings: str = "FP32 (Gather not quantized)"
    calibration: str | None = Field(default=None, description="GPTQ: the inputs it was calibrated on")
    source_bytes: int = Field(description="The FP32 file(s) it was made from")
    size_bytes: int = Field(description="The INT4 file(s)")
    size_ratio: float = Field(description="size_bytes / source_bytes")


@dataclass
class Int4Info:
    """What :func:`quantize_int4_file` did to one file."""

    quantized: int
    kept: int
    gemms: int
    source_bytes: int
    size_bytes: int


# -- the graph rewrite the quantizer needs --------------------------------------------------------------------
def gemm_to_matmul(model: Any) -> int:
    """Rewrite, in place, each ``Gemm(A, B, C)`` of the main graph whose ``B`` is a 2-D initializer and ``A`` is not
    transposed as ``MatMul(A, B')`` (+ ``Add(., C)``): ``B' = alpha * B`` (transposed when ``transB``), ``C`` scaled
    by ``beta``. Same values (a Gemm's A is 2-D, where MatMul is the same product); returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, added, count = [], [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if b is None or len(b.dims) != 2 or attrs.get("transA", 0):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(b)
        w = (w.T if attrs.get("transB", 0) else w) * np.float32(attrs.get("alpha", 1.0))
        base = node.name or node.output[0]
        w_name = f"{base}_matmul_weight"
        added.append(numpy_helper.from_array(np.ascontiguousarray(w, dtype=w.dtype), w_name))
        has_c = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}_matmul" if has_c else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=f"{base}_MatMul"))
        if has_c:
            c_name = node.input[2]
            beta = float(attrs.get("beta", 1.0))
            if beta != 1.0:
                c = inits.get(c_name)
                if c is None:  # a scaled bias that is not a constant: leave this Gemm alone
                    new_nodes.pop()
                    added.pop()
                    new_nodes.append(node)
                    continue
                c_name = f"{base}_bias_scaled"
                added.append(numpy_helper.from_array(numpy_helper.to_array(c) * np.float32(beta), c_name))
            new_nodes.append(helper.make_node("Add", [product, c_name], [node.output[0]], name=f"{base}_Add"))
        count += 1
    if count:
        graph.ClearField("node")
        graph.node.extend(new_nodes)
        graph.initializer.extend(added)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [i for i in graph.initializer if i.name in used]
        graph.ClearField("initializer")
        graph.initializer.extend(keep)
    return count


# -- ONNX Runtime's quantizer -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer module calls ``logging.basicConfig(level=INFO)`` when imported and logs every node; its HQQ
    path warns about read-only arrays: none of it reaches our log."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its basicConfig, undone below)

        root.handlers[:] = handlers
        root.setLevel(level)
        with quiet_loggers("onnxruntime.quantization.matmul_nbits_quantizer",
                           "onnxruntime.quantization.neural_compressor",
                           "onnxruntime.quantization.neural_compressor.weight_only"), \
                warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class _Feeds:
    """GPTQ's calibration reader (ONNX Runtime's ``CalibrationDataReader`` protocol: ``get_next``; it is deep-copied
    before use, so it keeps a list, not a generator)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.index = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds[self.index:])


def _algo_config(opts: Int4Config, calib: list[dict[str, np.ndarray]] | None) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    if opts.algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=opts.block_size, bits=BITS)
    if opts.algorithm == "gptq":
        if not calib:
            raise InputError("INT4 gptq needs calibration inputs")
        return GPTQWeightOnlyQuantConfig(calibration_data_reader=_Feeds(calib), block_size=opts.block_size)
    return DefaultWeightOnlyQuantConfig(block_size=opts.block_size, is_symmetric=opts.symmetric,
                                        accuracy_level=opts.level or None, bits=BITS)


def _file_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in [path, *external_data_files(path)])


def quantize_int4_file(src: Path, out: Path, opts: Int4Config,
                       calib: list[dict[str, np.ndarray]] | None = None) -> Int4Info:
    """Write the INT4 weight-only model of ``src`` to ``out`` (atomically); ``calib``: GPTQ's inputs."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    gemms = gemm_to_matmul(model)
    before = sum(1 for n in model.graph.node if n.op_type == "MatMul")
    try:
        with _quiet():
            quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=opts.block_size, is_symmetric=opts.symmetric,
                                             accuracy_level=opts.level or None,
                                             algo_config=_algo_config(opts, calib))
            quantizer.process()
            result = quantizer.model.model
    except ToolkitError:
        raise
    except Exception as exc:
        raise Int4Error(f"INT4 quantization ({opts.algorithm}, block {opts.block_size}) of {src.name} failed: "
                        f"{first_line(exc, with_type=True)}") from exc
    quantized = sum(1 for n in _all_nodes(result.graph) if n.op_type == "MatMulNBits")
    if quantized == 0:
        raise Int4Error(f"INT4: {src.name} has no MatMul with a constant 2-D weight to quantize ({before} MatMul, "
                        f"{gemms} Gemm rewritten)")
    save_onnx(result, out)
    kept = sum(1 for n in _all_nodes(result.graph) if n.op_type == "MatMul")
    return Int4Info(quantized=quantized, kept=kept, gemms=gemms, source_bytes=_file_bytes(src),
                    size_bytes=_file_bytes(out))


def _all_nodes(graph: Any) -> Iterable[Any]:
    """Every node, inside subgraphs (a merged decoder's If branches) too."""
    from onnx import AttributeProto

    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


def _params(opts: Int4Config, infos: list[Int4Info], calibration: str | None) -> Int4Params:
    src, size = sum(i.source_bytes for i in infos), sum(i.size_bytes for i in infos)
    return Int4Params(algorithm=opts.algorithm, algorithm_config=ALGORITHM_CONFIGS[opts.algorithm],
                      block_size=opts.block_size, symmetric=opts.symmetric and opts.algorithm != "hqq",
                      accuracy_level=opts.level or None, matmuls_quantized=sum(i.quantized for i in infos),
                      matmuls_kept=sum(i.kept for i in infos), gemms_rewritten=sum(i.gemms for i in infos),
                      calibration=calibration, source_bytes=src, size_bytes=size,
                      size_ratio=round(size / src, 4) if src else 0.0)


def describe(opts: Int4Config) -> str:
    sym = "asymmetric, float zero points" if opts.algorithm == "hqq" else \
        "symmetric" if opts.symmetric else "asymmetric"
    level = f", accuracy level {opts.level}" if opts.level else ""
    return (f"INT4 weight-only (ONNX Runtime MatMulNBitsQuantizer, {opts.algorithm}, block {opts.block_size}, "
            f"{sym}{level})")


# -- the row's step ---------------------------------------------------------------------------------------------
def _gptq_inputs(ctx: ConvertContext, state: QuantState) -> tuple[list[dict[str, np.ndarray]], str]:
    """GPTQ's calibration inputs: the calibration data (--calib) when given, else seeded random inputs of the IOSpec."""
    cfg = state.cfg
    if state.calib is not None:
        from calibration.ort_reader import OrtCalibrationReader

        reader = OrtCalibrationReader(state.calib, cfg.calib.batch, ctx.spec.fixed_batch())
        feeds = list(iter(reader.get_next, None))
        return feeds, state.calib.describe()
    feeds = [ctx.spec.random_feed(1, seed=cfg.calib.seed * 1000 + i) for i in range(GPTQ_SEEDED_SAMPLES)]
    return feeds, (f"{GPTQ_SEEDED_SAMPLES} seeded random inputs of the IOSpec (seed {cfg.calib.seed}; token ids inside "
                   "the vocabulary): no --calib given")


def step_int4(ctx: ConvertContext, state: QuantState) -> None:
    """``int4``: the FP32 reference quantized by :func:`quantize_int4_file`, graded on the held-out inputs."""
    opts = state.cfg.int4_options
    ctx.log(describe(opts))
    calib, calibration = _gptq_inputs(ctx, state) if opts.algorithm == "gptq" else (None, None)
    if calibration:
        ctx.log(f"  GPTQ calibration: {calibration}")
    built = state.work / "int4.onnx"
    info = quantize_int4_file(state.reference_file, built, opts, calib)
    params = _params(opts, [info], calibration)
    notes = [f"{info.quantized} MatMul in INT4 ({info.gemms} Gemm rewritten as MatMul first), {info.kept} left FP32; "
             f"embeddings FP32; file {100 * params.size_ratio:.1f}% of {state.reference}'s"]
    record_variant(ctx, state, built, name="int4", precision="int4", params=params,
                   stats=state.evaluator.evaluate(built), notes=notes)


def check_int4(cfg: QuantConfig) -> None:
    """Before the export: what the INT4 options cannot do."""
    opts = cfg.int4_options
    if opts.algorithm != "gptq" and cfg.calib.data and not (cfg.int8_static or cfg.int8_dynamic):
        raise InputError(f"--calib: INT4 {opts.algorithm} uses no calibration data (only gptq does): drop --calib "
                         "or use --int4-algorithm gptq")


# -- a model exported as several files ----------------------------------------------------------------------------
def _component_build(state: ComponentState, src: Path, out: Path) -> Int4Info:
    opts = state.cfg.int4_options
    if opts.algorithm == "gptq":
        raise InputError("--int4-algorithm gptq: a model exported as several files has no calibration inputs per "
                         "file (its components take each other's outputs); use rtn or hqq")
    return quantize_int4_file(src, out, opts)


def _component_params(state: ComponentState, infos: list[Any]) -> StepParams:
    return _params(state.cfg.int4_options, [i for i in infos if isinstance(i, Int4Info)], None)


#: ``int4`` per component: each file quantized on its own (the merged decoder merged from the two INT4 decoders)
INT4_PER_COMPONENT = PerComponent(step="quantize_int4", describe=lambda state: describe(state.cfg.int4_options)
                                  + " of each component", build=_component_build, params=_component_params,
                                  advice=lambda cpu: None)
