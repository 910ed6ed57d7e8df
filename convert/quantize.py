"""FP16, dynamic INT8 and static INT8 variants, each checked against FP32 on held-out inputs.

Static INT8 (``--int8``) follows ONNX Runtime's recipe: ``quant_pre_process`` (shape inference and
optimization), then QDQ ``quantize_static`` with per-channel weights and a calibration method
(MinMax, Entropy, Percentile) whose ranges :mod:`convert.calibrate` computes batch by batch and
caches in the output folder. Which op types it quantizes, :func:`convert.ort_quant.static_op_types` chooses
(``--int8-ops``; by default only Conv/Gemm/MatMul where the graph has attention) and the manifest records with why.
On x86-64 without VNNI, ``reduce_range`` is switched on (ONNX Runtime's
guidance for U8S8 there), and the user is told when INT8 is not expected to be faster than FP32 on
this CPU. For TensorRT (``convert --trt --int8``), the same ranges also give ``int8_trt``
(:mod:`convert.trt_qdq`).

The steps are plain functions over one explicit :class:`QuantState`, built once by
:func:`setup_quant` after the FP32 model exists (held-out and calibration data, the held-out
evaluator with its FP32 reference) and completed by the first INT8 step (:func:`prepare_int8`: the
pre-processed model, the calibration runs by method).
:func:`convert.variants.run_quant` runs the steps the table ``convert.variants.VARIANTS`` lists, inside a
work folder under the output folder that is removed when they end, also when one fails. Each variant is optional (:func:`convert.context.attempt_variant`): one that ONNX
Runtime cannot make (a quantizer that rejects the model or the settings, a pre-processing that fails) is recorded
as failed with its reason and the others are still made; ``int8_trt`` is skipped when static INT8 failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from calibration.cpu import CpuFeatures, cpu_features
from calibration.ort_reader import OrtCalibrationReader
from calibration.sources import Source
from convert.calibrate import Calibrations, QuantData, open_quant_data
from convert.config import CALIB_METHODS, CalibMethod, Int8Layout, QuantConfig
from convert.config import parse_floats as parse_floats
from convert.config import parse_methods as parse_methods
from convert.config import parse_qtype as parse_qtype
from convert.context import ConvertContext, attempt_variant, skip_variant
from convert.gates import NodeScore, Trial, auto_search, gate_verdict, rank_nodes, summary_line
from convert.heldout import HeldOutEvaluator, keep_heldout
from convert.ort_quant import (
    OpChoice,
    QuantizeError,
    check_exclusions,
    preprocess_for_quantization,
    quantizable_op_types,
    quantize_dynamic_file,
    quantize_static_file,
    static_op_types,
)
from convert.precision import convert_fp16
from convert.trt_qdq import quantize_trt_file, trt_op_types, trt_qdq_problems
from convert.validate import structural_checks
from core.manifest import Precision
from core.metrics import AccuracyStats
from core.models import is_random_init
from core.onnxfile import copy_onnx
from core.records import (
    ArtifactMetrics,
    AutoRecord,
    DataRecord,
    DynamicQuantParams,
    Fp16Params,
    StaticQuantParams,
    StepParams,
    TrtQdqParams,
)


# -- the state the steps share -----------------------------------------------------------------------
@dataclass
class QuantState:
    """What the FP16/INT8 steps of one conversion share, built once by :func:`setup_quant`."""

    cfg: QuantConfig
    work: Path  # the work folder; removed when the steps end, also on failure
    cpu: CpuFeatures
    reference: str  # the FP32 artifact every variant derives from and is compared with
    reference_file: Path
    evaluator: HeldOutEvaluator  # the held-out inputs and the reference's outputs on them
    selection: HeldOutEvaluator | None  # --auto: the part its trials are graded on, disjoint from held-out
    calib: Source | None  # static INT8's calibration data (never a held-out sample)
    random_init: bool = False  # random weights: gated on output cosine, not on class agreement
    prepped: Path | None = None  # the reference after quant_pre_process (by the first INT8 step, prepare_int8)
    calibrations: Calibrations | None = None  # static INT8: the calibration run of each method (prepare_int8)
    static_ops: OpChoice | None = None  # static INT8: the op types it quantizes, and why (prepare_int8)
    extra_ops: list[OpChoice] = field(default_factory=list)  # --int8-ops' further sets whose op types differ
    prepare_error: Exception | None = None  # why prepare_int8 failed: every INT8 variant fails with it

    @property
    def reduce_range(self) -> bool:
        return self.cpu.needs_reduce_range if self.cfg.reduce_range is None else self.cfg.reduce_range

    def prepped_model(self) -> Path:
        if self.prepped is None:
            raise RuntimeError("no INT8 variant was asked for: the model was not pre-processed")
        return self.prepped

    def static(self) -> Calibrations:
        if self.calibrations is None:
            raise RuntimeError("static INT8 was not asked for: there is no calibration")
        return self.calibrations

    def static_op_types(self) -> list[str]:
        return self.static_op_choice().ops

    def static_op_choice(self) -> OpChoice:
        """The op types static INT8 quantizes and why (:func:`convert.ort_quant.static_op_types`)."""
        if self.static_ops is None:
            raise RuntimeError("static INT8 was not asked for: its op types were not chosen")
        return self.static_ops


def _open_data(ctx: ConvertContext, cfg: QuantConfig) -> QuantData:
    data = open_quant_data(cfg, ctx.spec, ctx.manifest.source.preprocessing)
    parts: list[tuple[str, Source | None]] = [("calibration", data.calib), ("held-out", data.held),
                                              ("--auto selection", data.selection)]
    for what, src in parts:
        if src is not None:
            ctx.log(f"{what} data: {src.describe()}")
    for w in [w for _, src in parts if src is not None for w in src.warnings]:
        ctx.log(f"warning: {w}")
    return data


def _prepare(ctx: ConvertContext, cfg: QuantConfig, src: Path, work: Path) -> tuple[Path, Any]:
    """The pre-processed model's path and its graph (an ONNX GraphProto without its weights' data)."""
    import onnx

    out = work / "prepped.onnx"
    ctx.log("quantization pre-processing (ONNX Runtime quant_pre_process: shape inference, optimization)")
    if note := preprocess_for_quantization(src, out):
        ctx.log(f"quantization pre-processing: {note}")
    graph = onnx.load(str(out), load_external_data=False).graph
    check_exclusions(graph, cfg)
    return out, graph


def _choose_op_sets(ctx: ConvertContext, cfg: QuantConfig, graph: Any) -> tuple[OpChoice, list[OpChoice]]:
    """``--int8-ops``: the main variant's op types, and each further set's whose op types differ from those before it
    (``auto,weighted`` on a model with attention is one set: said in one line)."""
    main = static_op_types(graph, cfg.int8_ops, cfg.exclude_op_types)
    ctx.log(f"static INT8 quantizes {len(main.ops)} op type(s): {main.why}")
    extra: list[OpChoice] = []
    for op_set in cfg.extra_int8_ops:
        choice = static_op_types(graph, op_set, cfg.exclude_op_types)
        if any(set(choice.ops) == set(c.ops) for c in [main, *extra]):
            ctx.log(f"--int8-ops {op_set}: the same op types as an earlier set ({choice.why}); no variant of its own")
            continue
        ctx.log(f"--int8-ops {op_set}: also int8_static_<method>_{choice.set}, {len(choice.ops)} op type(s): "
                f"{choice.why}")
        extra.append(choice)
    return main, extra


def setup_quant(ctx: ConvertContext, cfg: QuantConfig, work: Path) -> QuantState:
    """Open the data, run the FP32 reference on the held-out inputs (the INT8 pre-processing is done by the first
    INT8 step, :func:`prepare_int8`, so that its failure leaves FP16 alone)."""
    data = _open_data(ctx, cfg)
    reference = ctx.best_fp32()
    ref_art = ctx.manifest.artifacts[reference]
    ref_file = ctx.out / ref_art.file.path
    evaluator = HeldOutEvaluator(data.held, cfg.gate.eval_batch, ctx.spec.fixed_batch())
    ctx.log(f"held-out reference: {reference} (FP32) on {data.held.num_samples} sample(s)")
    evaluator.set_reference(ref_file, reference)
    keep_heldout(ctx, evaluator)
    selection = None
    if data.selection is not None:
        selection = HeldOutEvaluator(data.selection, cfg.gate.eval_batch, ctx.spec.fixed_batch())
        selection.set_reference(ref_file, reference)
    return QuantState(cfg=cfg, work=work, cpu=cpu_features(), reference=reference, reference_file=ref_file,
                      evaluator=evaluator, selection=selection, calib=data.calib,
                      random_init=is_random_init(ctx.manifest.source))


def prepare_int8(ctx: ConvertContext, state: QuantState) -> None:
    """The model pre-processed for INT8 and, for static INT8, its calibration: once, by the first INT8 step; a
    failure is kept and raised again by every INT8 step (each is then recorded failed with the same reason)."""
    if state.prepare_error is not None:
        raise state.prepare_error
    if state.prepped is not None:
        return
    cfg = state.cfg
    try:
        prepped, graph = _prepare(ctx, cfg, state.reference_file, state.work)
        if cfg.int8_static:
            state.static_ops, state.extra_ops = _choose_op_sets(ctx, cfg, graph)
    except Exception as exc:
        state.prepare_error = exc
        raise
    state.prepped = prepped
    if cfg.int8_static and state.calib is not None:
        state.calibrations = Calibrations(
            model=prepped, model_sha256=ctx.manifest.artifacts[state.reference].file.sha256, source=state.calib,
            cfg=cfg.calib, fixed_batch=ctx.spec.fixed_batch(), op_types=quantizable_op_types(cfg.exclude_op_types),
            out=ctx.out, work=state.work, log=ctx.log)


# -- recording ---------------------------------------------------------------------------------------
def record_variant(ctx: ConvertContext, state: QuantState, built: Path, *, name: str, precision: Precision,
            params: StepParams, stats: AccuracyStats, notes: list[str]) -> None:
    """Copy ``built`` into the output folder and record it with its held-out statistics and gate."""
    target = ctx.path(f"model.{name}.onnx")
    copy_onnx(built, target)  # with its external-data file, for a model past 2 GiB
    _, failures = structural_checks(target)
    gate = gate_verdict(stats, state.cfg.gate, state.random_init)
    metrics = ArtifactMetrics(accuracy=stats, gate=gate, summary=summary_line(stats, gate),
                              checker="ok" if not failures else "failed", held_out=state.evaluator.record())
    art = ctx.manifest.record(ctx.out, target, name=name, kind="onnx", precision=precision,
                              parent=state.reference, params=params, metrics=metrics, notes=[*notes, *failures])
    if gate.passed is False or failures:
        art.status = "failed"
    ctx.log(f"{name}: {metrics.summary}")


def _cpu_note(ctx: ConvertContext, advice: str | None) -> list[str]:
    if advice:
        ctx.log(f"[yellow]warning:[/] {advice}")
        return [advice]
    return []


# -- steps -------------------------------------------------------------------------------------------
def step_fp16(ctx: ConvertContext, state: QuantState) -> None:
    if not state.cfg.fp16:
        return
    ctx.log("FP16 conversion (ONNX Runtime's float16 converter, FP32 inputs/outputs kept)")
    built = state.work / "fp16.onnx"
    info = convert_fp16(state.reference_file, built)
    record_variant(ctx, state, built, name="fp16", precision="fp16",
            params=Fp16Params(**info.model_dump(), cpu=state.cpu.summary), stats=state.evaluator.evaluate(built),
            notes=_cpu_note(ctx, state.cpu.fp16_advice()))


def step_int8_dynamic(ctx: ConvertContext, state: QuantState) -> None:
    cfg = state.cfg
    if not cfg.int8_dynamic:
        return
    ctx.log(f"dynamic INT8 (ONNX Runtime quantize_dynamic, weights {cfg.weight_type}, "
            f"per-channel {cfg.per_channel}, reduce_range {state.reduce_range})")
    prepare_int8(ctx, state)
    built = state.work / "int8_dynamic.onnx"
    quantize_dynamic_file(state.prepped_model(), built, cfg, state.reduce_range)
    params = DynamicQuantParams(weight_type=cfg.weight_type, activation_type="uint8 (at run time)",
                                per_channel=cfg.per_channel, reduce_range=state.reduce_range,
                                exclude_nodes=cfg.exclude_nodes, exclude_op_types=cfg.exclude_op_types,
                                cpu=state.cpu.summary)
    record_variant(ctx, state, built, name="int8_dynamic", precision="int8", params=params,
            stats=state.evaluator.evaluate(built), notes=_cpu_note(ctx, state.cpu.int8_advice(dynamic=True)))


def _build_static(state: QuantState, method: CalibMethod, fp32_nodes: list[str],
                  on: HeldOutEvaluator | None = None, layout: Int8Layout | None = None,
                  ops: OpChoice | None = None) -> Trial:
    """Static INT8 from ``method``'s ranges with ``fp32_nodes`` left in FP32, in ``layout`` (default: the
    config's), of the op types of ``ops`` (default: the main set's), graded on ``on`` (default: the held-out data)."""
    cal = state.static()
    run = cal.run(method)
    layout = layout or state.cfg.layout
    ops = ops or state.static_op_choice()
    out = state.work / f"int8_static_{method}_{len(fp32_nodes)}_{layout.name}_{ops.set}.onnx"
    quantize_static_file(cal.model, out, run.method, run.cache, state.cfg, state.reduce_range, fp32_nodes,
                         ops.ops, layout)
    stats = (on or state.evaluator).evaluate(out)
    return Trial(method=method, fp32_nodes=fp32_nodes, stats=stats,
                 gate=gate_verdict(stats, state.cfg.gate, state.random_init), path=out)


def _regrade(state: QuantState, trial: Trial) -> Trial:
    """``trial`` with its statistics and gate on the held-out data (an --auto choice was made on another part)."""
    stats = state.evaluator.evaluate(trial.path)
    return replace(trial, stats=stats, gate=gate_verdict(stats, state.cfg.gate, state.random_init))


def _rank(ctx: ConvertContext, state: QuantState, trial: Trial) -> list[NodeScore]:
    cal = state.static()
    ctx.log("  --auto: ranking quantized nodes by the error each adds (FP32 vs QDQ, on calibration samples)")
    reader = OrtCalibrationReader(cal.source, 4, ctx.spec.fixed_batch(), limit_batches=4)
    return rank_nodes(cal.model, trial.path, iter(reader.get_next, None))


def _one_method(state: QuantState, method: CalibMethod) -> list[tuple[Trial, AutoRecord | None]]:
    """Without --auto: the trial of one --calib-method, every node quantized."""
    return [(_build_static(state, method, []), None)]


def _choose_static(ctx: ConvertContext, state: QuantState) -> list[tuple[Trial, AutoRecord | None]]:
    """--auto: the one variant ``auto_search`` chose."""
    c, g = state.cfg.calib, state.cfg.gate
    if state.selection is None:
        raise RuntimeError("--auto needs its selection data (open_quant_data)")
    sel = state.selection
    order = list(dict.fromkeys([*c.methods, *CALIB_METHODS]))
    ctx.log(f"  --auto: choosing on {sel.data.describe()}; the gate is then checked on the held-out data")
    result = auto_search(order, g.max_accuracy_drop, lambda m, keep: _build_static(state, m, keep, sel),
                         lambda t: _rank(ctx, state, t), ctx.log)
    ctx.log(f"  --auto chose {result.best.method} with {len(result.best.fp32_nodes)} node(s) in FP32: {result.reason}")
    record = result.record().model_copy(update={"selected_on": DataRecord.model_validate(sel.data.manifest_record())})
    return [(_regrade(state, result.best), record)]  # the gate: on held-out data the choice never saw


def step_int8_static(ctx: ConvertContext, state: QuantState) -> None:
    cfg = state.cfg
    if not cfg.int8_static:
        return
    advised = ", as ONNX Runtime advises for U8S8 without VNNI" if state.reduce_range and cfg.reduce_range is None \
        else ""
    ctx.log(f"static INT8 (QDQ, activations {cfg.activation_type}, weights {cfg.weight_type}, "
            f"per-channel {cfg.per_channel}, reduce_range {state.reduce_range}{advised})")
    notes = _cpu_note(ctx, state.cpu.int8_advice(dynamic=False)) + list(state.calib.warnings if state.calib else [])
    chosen: list[Trial] = []

    def make(pick: Callable[[], list[tuple[Trial, AutoRecord | None]]]) -> None:
        prepare_int8(ctx, state)
        for trial, auto in pick():
            for layout in dict.fromkeys([cfg.layout, *cfg.extra_layouts]):
                _record_static(ctx, state, trial, auto, layout, notes)
            for ops in state.extra_ops:
                _record_static(ctx, state, trial, auto, cfg.layout, notes, ops)
            chosen.append(trial)

    # one attempt per calibration method (its layouts with it); --auto's choice is one attempt
    if cfg.gate.auto:
        attempt_variant(ctx, "int8_static", "quantize_static", lambda: make(lambda: _choose_static(ctx, state)),
                        parent=state.reference)
    for m in [] if cfg.gate.auto else cfg.calib.methods:
        attempt_variant(ctx, f"int8_static_{m}", "quantize_static", partial(make, partial(_one_method, state, m)),
                        parent=state.reference)
    if cfg.trt_qdq:
        if chosen:
            trial = chosen[0]
            attempt_variant(ctx, "int8_trt", "quantize_static_trt", lambda: step_int8_trt(ctx, state, trial),
                            parent=f"int8_static_{trial.method}")
        else:
            skip_variant(ctx, "int8_trt", "quantize_static_trt",
                         "int8_static" if cfg.gate.auto else f"int8_static_{cfg.calib.methods[0]}")


def _record_static(ctx: ConvertContext, state: QuantState, trial: Trial, auto: AutoRecord | None, layout: Int8Layout,
                   notes: list[str], ops: OpChoice | None = None) -> None:
    """``trial`` (the config's own layout and op set: int8_static_METHOD) or, for another layout, the same method's
    ranges and FP32 nodes quantized in that layout (int8_static_METHOD_LAYOUT) or, for another op set (``ops``, in
    the config's layout), of those op types (int8_static_METHOD_SET), graded on the same held-out data."""
    cfg = state.cfg
    main = layout == cfg.layout and ops is None
    fmt: Literal["QOperator", "QDQ"] = "QOperator" if layout.quant_format == "qoperator" else "QDQ"
    suffix = ""
    if ops is not None:
        ctx.log(f"  {trial.method}: op set {ops.set} ({len(ops.ops)} op type(s))")
        trial, suffix = _build_static(state, trial.method, trial.fp32_nodes, ops=ops), f"_{ops.set}"
    elif not main:
        ctx.log(f"  {trial.method}: layout {layout.name} ({fmt}, per-channel {layout.per_channel}, "
                f"activations {layout.activation_type})")
        trial, suffix = _build_static(state, trial.method, trial.fp32_nodes, layout=layout), f"_{layout.name}"
    choice = ops or state.static_op_choice()
    params = StaticQuantParams(
        method=trial.method, quant_format=fmt, layout=layout.name, activation_type=layout.activation_type, weight_type=cfg.weight_type,
        per_channel=layout.per_channel, reduce_range=state.reduce_range, exclude_nodes=cfg.exclude_nodes,
        exclude_op_types=cfg.exclude_op_types, op_types=choice.ops, op_types_reason=choice.why,
        fp32_nodes=trial.fp32_nodes,
        cpu=state.cpu.summary, calibration=state.static().record(trial.method), auto=auto)
    name = f"int8_static_{trial.method}{suffix}"
    record_variant(ctx, state, trial.path, name=name, precision="int8", params=params, stats=trial.stats, notes=notes)


def step_int8_trt(ctx: ConvertContext, state: QuantState, trial: Trial) -> None:
    """``int8_trt``: the chosen method's ranges (and --auto's FP32 nodes), quantized by TensorRT's rules."""
    cfg, cal = state.cfg, state.static()
    run = cal.run(trial.method)
    ops = trt_op_types(state.static_op_types())
    ctx.log(f"INT8 Q/DQ for TensorRT ({trial.method} ranges: signed symmetric INT8, per-channel "
            f"{cfg.per_channel}, FP32 bias, ops {', '.join(ops)})")
    out = state.work / "int8_trt.onnx"
    quantize_trt_file(cal.model, out, run.method, run.cache, cfg, trial.fp32_nodes, ops)
    if problems := trt_qdq_problems(out):
        raise QuantizeError("the TensorRT Q/DQ model breaks TensorRT's rules: " + "; ".join(problems))
    # Judged as TensorRT computes it (Q/DQ simulated, INT32-exact): ONNX Runtime's fused x86 kernels
    # saturate with full-range signed INT8 weights, which TensorRT's do not.
    params = TrtQdqParams(method=trial.method, weight_type="int8", per_channel=cfg.per_channel, reduce_range=False,
                          op_types=ops, exclude_nodes=cfg.exclude_nodes, fp32_nodes=trial.fp32_nodes,
                          calibration=cal.record(trial.method),
                          accuracy_evaluated_as="simulated Q/DQ (ONNX Runtime, graph optimizations off)")
    record_variant(ctx, state, out, name="int8_trt", precision="int8", params=params,
            stats=state.evaluator.evaluate(out, simulate_qdq=True),
            notes=["Q/DQ for a TensorRT INT8 engine (convert --trt --int8). For ONNX Runtime on CPU use "
                   "int8_static_*: its fused x86 kernels can saturate with this variant's full-range "
                   "signed INT8 weights, and lose accuracy TensorRT does not"])
