"""FP16, dynamic INT8 and static INT8 variants, each checked against FP32 on held-out inputs.

Static INT8 (``--int8``) follows ONNX Runtime's recipe: ``quant_pre_process`` (shape inference and
optimization), then QDQ ``quantize_static`` with per-channel weights and a calibration method
(MinMax, Entropy, Percentile). Calibration streams: this module runs ONNX Runtime's calibrator one
batch at a time (``collect_data`` per batch merges ranges/histograms), saves the ranges with
``save_tensors_data`` and hands them to ``quantize_static(calibration_cache_path=...)``, so peak
memory does not grow with the number of calibration images and ``--auto`` re-quantizes without
re-calibrating. On x86-64 without VNNI, ``reduce_range`` is switched on (ONNX Runtime's guidance for
U8S8 there), and the user is told when INT8 is not expected to be faster than FP32 on this CPU.

The ranges are kept in the output folder (``calib.<key>.json``, keyed by the model, the data, the
method, the batch and ONNX Runtime's version) and reused by the next conversion that matches.

For TensorRT (``convert --trt --int8``), the same ranges also give ``int8_trt``: a Q/DQ model that
follows TensorRT's explicit-quantization rules (signed symmetric INT8 activations and weights with
zero point 0, per-channel weights, FP32 bias, the full 8-bit range). TensorRT 11 removed implicit
INT8 calibration, so that Q/DQ model is how an INT8 engine gets its scales on TensorRT 10 and 11.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from calibration.cpu import cpu_features
from calibration.sources import (
    DEFAULT_SYNTHETIC_SIZE,
    Source,
    count_samples,
    open_source,
    resolve_preprocessing,
)
from convert.gates import (
    GateConfig,
    HeldOutEvaluator,
    NodeScore,
    Trial,
    auto_search,
    gate_verdict,
    rank_nodes,
    summary_line,
)
from core.errors import BackendUnavailableError, InputError, ToolkitError, first_line
from core.fsutil import atomic_path, atomic_write_text
from core.manifest import Precision
from reports.models import AccuracyStats

if TYPE_CHECKING:
    from convert.pipeline import ConvertContext

CalibMethod = Literal["minmax", "entropy", "percentile"]
CALIB_METHODS: tuple[CalibMethod, ...] = ("minmax", "entropy", "percentile")
QType = Literal["uint8", "int8"]


class QuantizeError(ToolkitError):
    """ONNX Runtime's quantization tooling failed on this model."""


def parse_methods(text: str) -> list[CalibMethod]:
    """``minmax,entropy`` -> ["minmax", "entropy"]; an unknown name is one clear InputError."""
    items = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in CALIB_METHODS]
    if bad or not items:
        raise InputError(f"unknown --calib-method {text!r}; choose from {', '.join(CALIB_METHODS)} "
                         "(comma-separated for one variant each)")
    return list(dict.fromkeys(items))  # type: ignore[arg-type]


def parse_floats(text: str, what: str) -> list[float]:
    """``0.5,0.5,0.5`` -> [0.5, 0.5, 0.5], or one clear InputError."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise InputError(f"{what} is empty")
    return values


def parse_qtype(text: str, what: str) -> QType:
    t = text.strip().lower().removeprefix("q")
    if t in ("uint8", "u8"):
        return "uint8"
    if t in ("int8", "s8", "i8"):
        return "int8"
    raise InputError(f"unknown {what} {text!r}; choose uint8 or int8")


class CalibConfig(BaseModel):
    """Where calibration samples come from and how they are read."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(default=None, description="Image folder, .npy/.npz keyed by input name, "
                                                       "'imagenet_subset' (built in) or 'synthetic'")
    size: int = Field(default=100, ge=1, description="At most this many calibration samples")
    batch: int = Field(default=8, ge=1, description="Calibration batch size")
    methods: list[CalibMethod] = Field(default=["minmax"], min_length=1, description="One static variant each")
    resize: int | None = Field(default=None, ge=1, description="Images: shorter side before the center crop")
    mean: list[float] | None = Field(default=None, description="Images: per-channel mean (0-1 scale)")
    std: list[float] | None = Field(default=None, description="Images: per-channel std (0-1 scale)")
    seed: int = Field(default=0, description="Seed of the shuffle that picks calibration/held-out samples")


class QuantConfig(BaseModel):
    """Which reduced-precision variants to build, and how."""

    model_config = ConfigDict(extra="forbid")

    fp16: bool = Field(default=False, description="FP16 weights/compute, FP32 inputs/outputs")
    int8_static: bool = Field(default=False, description="QDQ static INT8 with calibration")
    int8_dynamic: bool = Field(default=False, description="Dynamic INT8 (weights int8, activations at run time)")
    calib: CalibConfig = Field(default_factory=CalibConfig)
    activation_type: QType = Field(default="uint8", description="Static INT8 activations")
    weight_type: QType = Field(default="int8", description="INT8 weights")
    per_channel: bool = Field(default=True, description="Per-output-channel weight scales")
    reduce_range: bool | None = Field(default=None, description="7-bit weights; None = on where ONNX Runtime "
                                                                "advises it (x86-64 without VNNI)")
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names kept in FP32")
    exclude_op_types: list[str] = Field(default_factory=list, description="Op types kept in FP32")
    trt_qdq: bool = Field(default=False, description="Also write int8_trt from the same calibration: Q/DQ by "
                                                     "TensorRT's rules, for an INT8 engine (convert --trt --int8)")
    gate: GateConfig = Field(default_factory=GateConfig)

    @property
    def any_variant(self) -> bool:
        return self.fp16 or self.int8_static or self.int8_dynamic


def _qtype(name: QType) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def _ort_method(name: CalibMethod) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools print progress and log warnings per tensor: keep them out."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def preprocess_for_quantization(src: Path, out: Path) -> None:
    """ONNX Runtime's ``quant_pre_process``: symbolic + ONNX shape inference and graph optimization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(out))
    except Exception as exc:
        raise QuantizeError(f"ONNX Runtime's quantization pre-processing failed on {src.name}: "
                            f"{first_line(exc, with_type=True)}") from exc


def quantizable_op_types(exclude: list[str]) -> list[str]:
    """Every op type ONNX Runtime can quantize (static QDQ or QOperator) minus ``exclude``."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - set(exclude))


@dataclass
class CalibrationRun:
    """Ranges of one calibration method, saved where ``quantize_static`` reads them."""

    method: CalibMethod
    cache: Path
    seconds: float
    samples: int
    batches: int
    dropped: int
    peak_rss_mb: float  # process peak during calibration
    rss_growth_mb: float  # that peak minus the RSS when calibration started
    reused: bool = False  # read from an earlier conversion's cache, no calibration run

    def record(self) -> dict[str, Any]:
        return {"images_used": self.samples, "batches": self.batches, "dropped_short_batch": self.dropped,
                "seconds": round(self.seconds, 3), "peak_rss_mb": self.peak_rss_mb,
                "rss_growth_mb": self.rss_growth_mb, "cache": self.cache.name, "cache_reused": self.reused}


def calibration_cache_path(out: Path, model_sha256: str, data_digest: str, method: CalibMethod, batch: int,
                           op_types: list[str]) -> Path:
    """One ranges file per (model, data, method, batch, op types, ONNX Runtime version)."""
    import onnxruntime

    key = "|".join([model_sha256, data_digest, method, str(batch), ",".join(op_types), onnxruntime.__version__])
    return out / f"calib.{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _meta_path(cache: Path) -> Path:
    return cache.with_suffix(".meta.json")


def reuse_calibration(cache: Path, method: CalibMethod) -> CalibrationRun | None:
    """The run recorded with ``cache`` by an earlier conversion, or None (absent or unreadable: calibrate)."""
    meta = _meta_path(cache)
    if not (cache.is_file() and meta.is_file()):
        return None
    try:
        from onnxruntime.quantization import load_tensors_data

        load_tensors_data(cache)  # a cache ONNX Runtime cannot read is recomputed, not trusted
        m = json.loads(meta.read_text(encoding="utf-8"))
        return CalibrationRun(method=method, cache=cache, seconds=float(m["seconds"]), samples=int(m["samples"]),
                              batches=int(m["batches"]), dropped=int(m["dropped"]), peak_rss_mb=0.0,
                              rss_growth_mb=0.0, reused=True)
    except Exception:
        return None


class _OneBatch:
    """A ``CalibrationDataReader`` holding exactly one batch (ONNX Runtime's ``get_next`` protocol)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self._batch: dict[str, Any] | None = batch

    def get_next(self) -> dict[str, Any] | None:
        batch, self._batch = self._batch, None
        return batch


def calibrate(model: Path, source: Source, method: CalibMethod, batch: int, fixed_batch: int | None,
              work: Path, op_types: list[str], cache: Path) -> CalibrationRun:
    """Run ONNX Runtime's calibrator over ``source`` one batch at a time and save the ranges to ``cache``.

    ``collect_data`` is called once per batch: MinMax merges running ranges, Entropy/Percentile merge
    histograms, and the batch's intermediate outputs are dropped before the next batch is read.
    ``cache`` (ranges JSON) and its ``.meta.json`` are written atomically, only on success.
    """
    try:
        from onnxruntime.quantization import create_calibrator, save_tensors_data
    except ImportError:
        import onnxruntime

        raise BackendUnavailableError(
            f"static INT8 needs ONNX Runtime's calibration cache (save_tensors_data, quantize_static("
            f"calibration_cache_path=...)), which onnxruntime {onnxruntime.__version__} lacks; 1.32 is tested: "
            "pip install -U onnxruntime") from None

    from calibration.ort_reader import OrtCalibrationReader
    from runtimes.harness import ResourceSampler

    reader = OrtCalibrationReader(source, batch, fixed_batch)
    t0 = time.perf_counter()
    with ResourceSampler() as sampler:
        try:
            with _quiet(), atomic_path(cache) as tmp:
                calibrator = create_calibrator(str(model), op_types, augmented_model_path=str(work / f"aug.{method}.onnx"),
                                               calibrate_method=_ort_method(method), extra_options={})
                while (feed := reader.get_next()) is not None:
                    calibrator.collect_data(_OneBatch(feed))
                if reader.batches_read == 0:
                    raise InputError(f"no calibration batch could be read from {source.describe()}"
                                     + (f" (the model's fixed batch is {fixed_batch})" if fixed_batch else ""))
                save_tensors_data(calibrator.compute_data(), tmp)
        except ToolkitError:
            raise
        except Exception as exc:
            raise QuantizeError(f"{method} calibration failed: {first_line(exc, with_type=True)}") from exc
    run = CalibrationRun(method=method, cache=cache, seconds=time.perf_counter() - t0, samples=reader.samples_read,
                         batches=reader.batches_read, dropped=reader.dropped,
                         peak_rss_mb=round(sampler.peak_rss / 2**20, 1),
                         rss_growth_mb=round((sampler.peak_rss - sampler.baseline_rss) / 2**20, 1))
    atomic_write_text(_meta_path(cache), json.dumps({"method": method, "samples": run.samples, "batches": run.batches,
                                                     "dropped": run.dropped, "seconds": round(run.seconds, 3),
                                                     "data": source.describe()}))
    return run


#: Op types whose inputs ``int8_trt`` quantizes: the weighted layers TensorRT runs in INT8, and Add so
#: that a residual add fuses into the preceding INT8 convolution.
TRT_QDQ_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


def _quantize_qdq(model: Path, out: Path, run: CalibrationRun, fp32_nodes: list[str], cfg: QuantConfig,
                  what: str, **settings: Any) -> None:
    """ONNX Runtime's QDQ ``quantize_static`` from ``run``'s saved ranges: ``settings`` choose the types."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    try:
        with _quiet():
            quantize_static(str(model), str(out), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                            per_channel=cfg.per_channel, nodes_to_exclude=[*cfg.exclude_nodes, *fp32_nodes],
                            calibrate_method=_ort_method(run.method), calibration_cache_path=str(run.cache),
                            **settings)
    except Exception as exc:
        raise QuantizeError(f"{what} ({run.method}) failed: {first_line(exc, with_type=True)}") from exc


def quantize_static_file(model: Path, out: Path, run: CalibrationRun, cfg: QuantConfig, reduce_range: bool,
                         fp32_nodes: list[str]) -> None:
    """QDQ static quantization of ``model`` into ``out`` from saved calibration ranges."""
    _quantize_qdq(model, out, run, fp32_nodes, cfg, "static INT8 quantization",
                  op_types_to_quantize=quantizable_op_types(cfg.exclude_op_types), reduce_range=reduce_range,
                  activation_type=_qtype(cfg.activation_type), weight_type=_qtype(cfg.weight_type))


def trt_op_types(cfg: QuantConfig) -> list[str]:
    """The op types ``int8_trt`` quantizes: ``TRT_QDQ_OP_TYPES`` minus --exclude-op-types."""
    return [t for t in TRT_QDQ_OP_TYPES if t not in cfg.exclude_op_types]


def quantize_trt_file(model: Path, out: Path, run: CalibrationRun, cfg: QuantConfig, fp32_nodes: list[str]) -> None:
    """Q/DQ by TensorRT's explicit-quantization rules, from the same saved ranges as the CPU variants.

    Signed INT8 with zero point 0 on both activations and weights (TensorRT's parser refuses any
    other zero point), FP32 bias (it refuses an INT32 DequantizeLinear and fuses the bias itself),
    the full 8-bit range (no reduce_range: that is a CPU workaround), inputs of ``trt_op_types``.
    """
    _quantize_qdq(model, out, run, fp32_nodes, cfg, "TensorRT Q/DQ quantization",
                  op_types_to_quantize=trt_op_types(cfg), reduce_range=False, activation_type=_qtype("int8"),
                  weight_type=_qtype("int8"),
                  extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})


def trt_qdq_problems(model: Path) -> list[str]:
    """Why TensorRT's explicit quantization would refuse this Q/DQ model; [] when it follows the rules.

    Checked: every Quantize/DequantizeLinear has a positive scale and a signed INT8 zero point of 0,
    and no DequantizeLinear takes an INT32 tensor (ONNX Runtime's default quantized bias).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model), load_external_data=False).graph
    consts: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    found: dict[str, list[str]] = {}

    def note(kind: str, node: onnx.NodeProto) -> None:
        found.setdefault(kind, []).append(node.name or node.output[0])

    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in consts and \
                consts[node.input[0]].data_type == onnx.TensorProto.INT32:
            note("an INT32 input to DequantizeLinear (quantized bias; TensorRT needs FP32 bias)", node)
        scale = consts.get(node.input[1]) if len(node.input) > 1 else None
        if scale is not None and not bool(np.all(numpy_helper.to_array(scale) > 0)):
            note("a scale that is not positive", node)
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            continue
        if zp.data_type != onnx.TensorProto.INT8:
            note(f"a {onnx.TensorProto.DataType.Name(zp.data_type)} zero point (TensorRT needs signed INT8)", node)
        elif np.any(numpy_helper.to_array(zp) != 0):
            note("a non-zero zero point (TensorRT needs symmetric quantization)", node)
    return [f"{len(nodes)} Q/DQ node(s) with {kind}, e.g. {nodes[0]!r}" for kind, nodes in found.items()]


def quantize_dynamic_file(model: Path, out: Path, cfg: QuantConfig, reduce_range: bool) -> None:
    from onnxruntime.quantization import quantize_dynamic

    try:
        with _quiet():
            quantize_dynamic(str(model), str(out), op_types_to_quantize=quantizable_op_types(cfg.exclude_op_types),
                             per_channel=cfg.per_channel, reduce_range=reduce_range,
                             weight_type=_qtype(cfg.weight_type), nodes_to_exclude=list(cfg.exclude_nodes))
    except Exception as exc:
        raise QuantizeError(f"dynamic INT8 quantization failed: {first_line(exc, with_type=True)}") from exc


def check_exclusions(model: Path, cfg: QuantConfig) -> None:
    """Unknown ``--exclude-nodes``/``--exclude-op-types`` are one clear InputError naming what exists."""
    import difflib

    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    names = [n.name for n in graph.node]
    ops = sorted({n.op_type for n in graph.node})
    problems = []
    for n in cfg.exclude_nodes:
        if n not in names:
            close = difflib.get_close_matches(n, names, n=3)
            problems.append(f"no node named {n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    bad_ops = [o for o in cfg.exclude_op_types if o not in ops]
    if bad_ops:
        problems.append(f"no node of op type(s) {bad_ops}; this model has {ops}")
    if problems:
        raise InputError("--exclude-nodes/--exclude-op-types: " + "; ".join(problems)
                         + " (names are those of the quantization pre-processed model)")


def _same_data(a: str, b: str | None) -> bool:
    """Whether two data specs name the same data (then one is split, so that no sample is in both)."""
    if b is None:
        return False
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


class QuantRun:
    """The FP16/INT8 steps of one conversion, sharing the held-out evaluator and calibration data."""

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.calib: Source | None = None
        self.evaluator: HeldOutEvaluator | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._prepped: Path | None = None
        self._calibrations: dict[str, CalibrationRun] = {}
        self.cpu = cpu_features()

    # -- planning --------------------------------------------------------------------------------
    def steps(self) -> list[Callable[[ConvertContext], None]]:
        return [self.step_fp16, self.step_int8_dynamic, self.step_int8_static, self.step_cleanup]

    def check_config(self) -> None:
        """User errors that need no model: say them before the (slow) export runs."""
        c, g = self.cfg.calib, self.cfg.gate
        if not self.cfg.any_variant:
            raise InputError("calibration, precision and accuracy-gate flags apply to a variant: add --fp16, --int8 "
                             "or --int8-dynamic")
        if self.cfg.int8_static and not c.data:
            raise InputError("--int8 needs calibration data: --calib DIR|FILE.npz|imagenet_subset "
                             "(or --calib synthetic, explicitly)")
        if g.auto and not self.cfg.int8_static:
            raise InputError("--auto tunes static INT8: add --int8")
        if g.auto and g.max_accuracy_drop is None:
            raise InputError("--auto needs a budget: add --max-accuracy-drop POINTS")
        if (self.cfg.exclude_nodes or self.cfg.exclude_op_types) and not (self.cfg.int8_static or self.cfg.int8_dynamic):
            raise InputError("--exclude-nodes/--exclude-op-types apply to --int8 and --int8-dynamic")
        count_samples(c.data)  # a missing folder/file or unreadable array fails now
        count_samples(g.eval_data)

    def preflight(self, ctx: ConvertContext) -> None:
        """First step: check the flags, and for PyTorch models (input spec known) open the data now."""
        self.check_config()
        if ctx.loaded.onnx_path is None:
            self._open_data(ctx)

    def _preprocessing(self, ctx: ConvertContext) -> Any:
        c = self.cfg.calib
        try:
            return resolve_preprocessing(ctx.spec, ctx.manifest.source.preprocessing, resize=c.resize, mean=c.mean,
                                         std=c.std)
        except InputError:
            if c.resize is not None or c.mean is not None or c.std is not None:
                raise
            return None  # not an image model: only tensor sources apply, and they say so

    def _open_data(self, ctx: ConvertContext) -> None:
        """Open the calibration source and a held-out source that shares no sample with it."""
        c, g = self.cfg.calib, self.cfg.gate
        pre = self._preprocessing(ctx)
        spec = ctx.spec
        self.calib = None
        if g.eval_data and not _same_data(g.eval_data, c.data):
            held = open_source(g.eval_data, spec, pre, size=g.eval_size, seed=c.seed)
            if c.data:
                self.calib = open_source(c.data, spec, pre, size=c.size, seed=c.seed)
        elif c.data:  # hold a window of the calibration data out: calibration never sees it
            total = count_samples(c.data)
            if total is None:
                n_eval, n_calib = min(g.eval_size, DEFAULT_SYNTHETIC_SIZE), c.size
            else:
                n_eval = g.eval_size if total >= c.size + g.eval_size else min(g.eval_size, max(1, total // 4))
                n_calib = min(c.size, total - n_eval)
                if n_calib < 1:
                    open_source(c.data, spec, pre, size=None, seed=c.seed)  # unreadable data: say that first
                    raise InputError(f"calibration data {c.data} has {total} sample(s): too few to calibrate and "
                                     "hold samples out for the accuracy check; add data or pass --eval-data")
            held = open_source(c.data, spec, pre, size=n_eval, seed=c.seed)
            self.calib = open_source(c.data, spec, pre, size=n_calib, seed=c.seed, offset=n_eval)
        else:  # FP16/dynamic INT8 with no data at all: agreement on random inputs, said loudly
            held = open_source(None, spec, pre, size=min(g.eval_size, DEFAULT_SYNTHETIC_SIZE), seed=c.seed + 1,
                               allow_synthetic=True)
            held.warnings.append("no held-out data given (--eval-data or --calib): accuracy was checked on random "
                                 "inputs, which says little about real ones")
        self.evaluator = HeldOutEvaluator(held, g.eval_batch, spec.fixed_batch())
        if self.calib is not None:
            ctx.log(f"calibration data: {self.calib.describe()}")
        ctx.log(f"held-out data: {held.describe()}")
        for w in [*(self.calib.warnings if self.calib else []), *held.warnings]:
            ctx.log(f"warning: {w}")

    def _ensure_ready(self, ctx: ConvertContext) -> HeldOutEvaluator:
        if self.evaluator is None:
            self._open_data(ctx)  # an ONNX input: its IOSpec is known only after the copy
        assert self.evaluator is not None
        if self.evaluator.reference is None:
            best = ctx.best_fp32()
            ctx.log(f"held-out reference: {best} (FP32) on {self.evaluator.source.num_samples} sample(s)")
            self.evaluator.set_reference(ctx.out / ctx.manifest.artifacts[best].file.path, best)
        return self.evaluator

    def _work(self, ctx: ConvertContext) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=".quant-", dir=ctx.out)
        return Path(self._tmp.name)

    def _prepped_model(self, ctx: ConvertContext) -> Path:
        if self._prepped is None:
            src = ctx.out / ctx.manifest.artifacts[ctx.best_fp32()].file.path
            out = self._work(ctx) / "prepped.onnx"
            ctx.log("quantization pre-processing (ONNX Runtime quant_pre_process: shape inference, optimization)")
            preprocess_for_quantization(src, out)
            check_exclusions(out, self.cfg)
            self._prepped = out
        return self._prepped

    @property
    def reduce_range(self) -> bool:
        return self.cpu.needs_reduce_range if self.cfg.reduce_range is None else self.cfg.reduce_range

    # -- recording -------------------------------------------------------------------------------
    def _record(self, ctx: ConvertContext, built: Path, *, name: str, precision: Precision, step: str,
                params: dict[str, Any], stats: AccuracyStats, notes: list[str]) -> None:
        from convert.validate import structural_checks

        target = ctx.path(f"model.{name}.onnx")
        with atomic_path(target) as tmp:
            shutil.copyfile(built, tmp)
        _, failures = structural_checks(target)
        gate = gate_verdict(stats, self.cfg.gate.max_accuracy_drop)
        assert self.evaluator is not None
        metrics = {"accuracy": stats.model_dump(), "gate": gate, "summary": summary_line(stats, gate),
                   "checker": "ok" if not failures else "failed", "held_out": self.evaluator.record()}
        art = ctx.manifest.record(ctx.out, target, name=name, kind="onnx", step=step, precision=precision,
                                  parent=ctx.best_fp32(), params=params, metrics=metrics,
                                  notes=[*notes, *failures])
        if gate["passed"] is False:
            art.status = "failed"
        ctx.log(f"{name}: {metrics['summary']}")

    def _cpu_note(self, ctx: ConvertContext, advice: str | None) -> list[str]:
        if advice:
            ctx.log(f"[yellow]warning:[/] {advice}")
            return [advice]
        return []

    # -- steps -----------------------------------------------------------------------------------
    def step_fp16(self, ctx: ConvertContext) -> None:
        if not self.cfg.fp16:
            return
        from convert.precision import convert_fp16

        ev = self._ensure_ready(ctx)
        ctx.log("FP16 conversion (onnxconverter-common, FP32 inputs/outputs kept)")
        built = self._work(ctx) / "fp16.onnx"
        info = convert_fp16(ctx.out / ctx.manifest.artifacts[ctx.best_fp32()].file.path, built)
        self._record(ctx, built, name="fp16", precision="fp16", step="fp16", params=info | {"cpu": self.cpu.summary},
                     stats=ev.evaluate(built), notes=self._cpu_note(ctx, self.cpu.fp16_advice()))

    def step_int8_dynamic(self, ctx: ConvertContext) -> None:
        if not self.cfg.int8_dynamic:
            return
        ev = self._ensure_ready(ctx)
        prepped = self._prepped_model(ctx)
        ctx.log(f"dynamic INT8 (ONNX Runtime quantize_dynamic, weights {self.cfg.weight_type}, "
                f"per-channel {self.cfg.per_channel}, reduce_range {self.reduce_range})")
        built = self._work(ctx) / "int8_dynamic.onnx"
        quantize_dynamic_file(prepped, built, self.cfg, self.reduce_range)
        params = {"method": "dynamic", "weight_type": self.cfg.weight_type, "activation_type": "uint8 (at run time)",
                  "per_channel": self.cfg.per_channel, "reduce_range": self.reduce_range,
                  "exclude_nodes": self.cfg.exclude_nodes, "exclude_op_types": self.cfg.exclude_op_types,
                  "preprocess": "onnxruntime quant_pre_process", "cpu": self.cpu.summary}
        self._record(ctx, built, name="int8_dynamic", precision="int8", step="quantize_dynamic", params=params,
                     stats=ev.evaluate(built), notes=self._cpu_note(ctx, self.cpu.int8_advice(dynamic=True)))

    def _calibration(self, ctx: ConvertContext, method: CalibMethod) -> CalibrationRun:
        if method not in self._calibrations:
            assert self.calib is not None
            batch = ctx.spec.fixed_batch() or self.cfg.calib.batch
            op_types = quantizable_op_types(self.cfg.exclude_op_types)
            cache = calibration_cache_path(ctx.out, ctx.manifest.artifacts[ctx.best_fp32()].file.sha256,
                                           self.calib.digest(), method, batch, op_types)
            run = reuse_calibration(cache, method)
            if run is not None:
                ctx.log(f"calibration ({method}): reusing {cache.name} ({run.samples} sample(s), same model and data)")
            else:
                ctx.log(f"calibrating ({method}) on {self.calib.num_samples} sample(s), batch {batch}")
                run = calibrate(self._prepped_model(ctx), self.calib, method, self.cfg.calib.batch,
                                ctx.spec.fixed_batch(), self._work(ctx), op_types, cache)
                ctx.log(f"  {run.samples} sample(s) in {run.seconds:.1f}s, peak RSS {run.peak_rss_mb:.0f} MB "
                        f"(+{run.rss_growth_mb:.0f} MB during calibration); ranges saved to {cache.name}")
            self._calibrations[method] = run
        return self._calibrations[method]

    def _build_static(self, ctx: ConvertContext, method: CalibMethod, fp32_nodes: list[str]) -> Trial:
        assert self.evaluator is not None
        run = self._calibration(ctx, method)
        out = self._work(ctx) / f"int8_static_{method}_{len(fp32_nodes)}.onnx"
        quantize_static_file(self._prepped_model(ctx), out, run, self.cfg, self.reduce_range, fp32_nodes)
        stats = self.evaluator.evaluate(out)
        return Trial(method=method, fp32_nodes=fp32_nodes, stats=stats,
                     gate=gate_verdict(stats, self.cfg.gate.max_accuracy_drop), path=out)

    def _rank(self, ctx: ConvertContext, trial: Trial) -> list[NodeScore]:
        from calibration.ort_reader import OrtCalibrationReader

        assert self.calib is not None
        ctx.log("  --auto: ranking quantized nodes by the error each adds (FP32 vs QDQ, on calibration samples)")
        reader = OrtCalibrationReader(self.calib, 4, ctx.spec.fixed_batch(), limit_batches=4)
        return rank_nodes(self._prepped_model(ctx), trial.path, iter(reader.get_next, None))

    def step_int8_static(self, ctx: ConvertContext) -> None:
        if not self.cfg.int8_static:
            return
        self._ensure_ready(ctx)
        assert self.calib is not None
        c, g = self.cfg.calib, self.cfg.gate
        ctx.log(f"static INT8 (QDQ, activations {self.cfg.activation_type}, weights {self.cfg.weight_type}, "
                f"per-channel {self.cfg.per_channel}, reduce_range {self.reduce_range}"
                + (", as ONNX Runtime advises for U8S8 without VNNI" if self.reduce_range and self.cfg.reduce_range is None
                   else "") + ")")
        notes = self._cpu_note(ctx, self.cpu.int8_advice(dynamic=False)) + list(self.calib.warnings)
        if g.auto:
            assert g.max_accuracy_drop is not None
            order = list(dict.fromkeys([*c.methods, *CALIB_METHODS]))
            result = auto_search(order, g.max_accuracy_drop, lambda m, keep: self._build_static(ctx, m, keep),  # type: ignore[arg-type]
                                 lambda t: self._rank(ctx, t), ctx.log)
            ctx.log(f"  --auto chose {result.best.method} with {len(result.best.fp32_nodes)} node(s) in FP32: "
                    f"{result.reason}")
            chosen: list[tuple[Trial, dict[str, Any] | None]] = [(result.best, result.record())]
        else:
            chosen = [(self._build_static(ctx, m, []), None) for m in c.methods]
        for trial, auto in chosen:
            run = self._calibrations[trial.method]
            params: dict[str, Any] = {
                "method": trial.method, "quant_format": "QDQ", "activation_type": self.cfg.activation_type,
                "weight_type": self.cfg.weight_type, "per_channel": self.cfg.per_channel,
                "reduce_range": self.reduce_range, "exclude_nodes": self.cfg.exclude_nodes,
                "exclude_op_types": self.cfg.exclude_op_types, "fp32_nodes": trial.fp32_nodes,
                "preprocess": "onnxruntime quant_pre_process", "cpu": self.cpu.summary,
                "calibration": self._calibration_record(ctx, run),
            }
            if auto is not None:
                params["auto"] = auto
            self._record(ctx, trial.path, name=f"int8_static_{trial.method}", precision="int8",
                         step="quantize_static", params=params, stats=trial.stats, notes=notes)
        if self.cfg.trt_qdq:
            self._build_trt(ctx, chosen[0][0])

    def _calibration_record(self, ctx: ConvertContext, run: CalibrationRun) -> dict[str, Any]:
        assert self.calib is not None
        return self.calib.manifest_record() | run.record() | {
            "batch_size": ctx.spec.fixed_batch() or self.cfg.calib.batch, "seed": self.cfg.calib.seed}

    def _build_trt(self, ctx: ConvertContext, trial: Trial) -> None:
        """``int8_trt``: the chosen method's ranges (and --auto's FP32 nodes), quantized by TensorRT's rules."""
        assert self.evaluator is not None
        run = self._calibrations[trial.method]
        ctx.log(f"INT8 Q/DQ for TensorRT ({trial.method} ranges: signed symmetric INT8, per-channel "
                f"{self.cfg.per_channel}, FP32 bias, ops {', '.join(trt_op_types(self.cfg))})")
        out = self._work(ctx) / "int8_trt.onnx"
        quantize_trt_file(self._prepped_model(ctx), out, run, self.cfg, trial.fp32_nodes)
        if problems := trt_qdq_problems(out):
            raise QuantizeError("the TensorRT Q/DQ model breaks TensorRT's rules: " + "; ".join(problems))
        params: dict[str, Any] = {
            "method": trial.method, "quant_format": "QDQ", "target": "tensorrt", "activation_type": "int8",
            "weight_type": "int8", "symmetric": True, "bias": "fp32", "per_channel": self.cfg.per_channel,
            "reduce_range": False, "op_types": trt_op_types(self.cfg),
            "exclude_nodes": self.cfg.exclude_nodes, "fp32_nodes": trial.fp32_nodes,
            "preprocess": "onnxruntime quant_pre_process", "calibration": self._calibration_record(ctx, run)}
        # Judged as TensorRT computes it (Q/DQ simulated, INT32-exact): ONNX Runtime's fused x86 kernels
        # saturate with full-range signed INT8 weights, which TensorRT's do not.
        params["accuracy_evaluated_as"] = "simulated Q/DQ (ONNX Runtime, graph optimizations off)"
        self._record(ctx, out, name="int8_trt", precision="int8", step="quantize_static_trt", params=params,
                     stats=self.evaluator.evaluate(out, simulate_qdq=True),
                     notes=["Q/DQ for a TensorRT INT8 engine (convert --trt --int8). For ONNX Runtime on CPU use "
                            "int8_static_*: its fused x86 kernels can saturate with this variant's full-range "
                            "signed INT8 weights, and lose accuracy TensorRT does not"])

    def step_cleanup(self, ctx: ConvertContext) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def quant_steps(cfg: QuantConfig) -> tuple[list[Callable[[ConvertContext], None]], list[Callable[[ConvertContext], None]]]:
    """(steps to run before the export: flag and data checks; steps after the FP32 model exists)."""
    run = QuantRun(cfg)
    return [run.preflight], run.steps()
