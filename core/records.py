"""Typed records of what each step did (``Artifact.params``) and what was measured (``Artifact.metrics``).

Every field is declared once here, with ``extra="forbid"``, so a reader in another package gets an
attribute (``art.params.calibration.sha256``), never a string key that may or may not be there.
``params`` is one model per step, told apart by its ``step`` field; ``metrics`` is one model whose
parts are filled by the steps that measure them. ``migrate_v1_artifact`` reads the free dicts of
manifest schema 1 into these records.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, SerializeAsAny, Tag

from core.metrics import AccuracyStats, LatencyStats, ParityStats
from core.training import TrainingRecord


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- step parameters ---------------------------------------------------------------------------------
class CopyParams(Record):
    """An existing ONNX file taken as is."""

    step: Literal["copy"] = "copy"
    copied_from: str = Field(default="", description="The input file's path as given")


class ExportParams(Record):
    step: Literal["export"] = "export"
    exporter: str
    opset: int
    dynamic_batch: bool


class WeightsParams(Record):
    """The PyTorch weights (or TorchScript copy) the eager/TorchScript runners rebuild the model from."""

    step: Literal["save_weights"] = "save_weights"
    weights: str | None = Field(default=None, description="What they are, e.g. 'random init (seed 0)'")


class OptimizeInfo(Record):
    steps: list[str]
    nodes_before: int
    nodes_after_slim: int
    nodes_after: int
    skipped: dict[str, str] = {}  # step -> why it did not run


class OptimizeParams(OptimizeInfo):
    step: Literal["optimize"] = "optimize"


class Fp16Info(Record):
    """What the FP16 conversion did (``convert.precision.convert_fp16``)."""

    converter: str
    keep_io_types: bool
    casts_added: int


class Fp16Params(Fp16Info):
    step: Literal["fp16"] = "fp16"
    cpu: str | None = Field(default=None, description="The CPU it was made on, for the speed advice")
    sparsity: Literal["2:4"] | None = Field(default=None, description="Set when converted from a 2:4 variant: "
                                                                       "its zeros stay zeros in FP16")


class DataRecord(Record):
    """The data a variant was calibrated or checked on (``calibration.sources.Source.manifest_record``)."""

    source: str
    kind: str
    sha256: str
    num_samples: int | None
    skipped: int
    labels: bool
    warnings: list[str] = Field(default_factory=list)
    split_by: str | None = Field(default=None, description="What a split keeps on one side: the source photo "
                                                           "(built-in set), the file content (image folder), the row")
    members: list[str] = Field(default_factory=list, description="Every sample read: file path in the folder, "
                                                                 "or row")
    groups: list[str] = Field(default_factory=list, description="Their split keys (source photo, content sha256, "
                                                                "row): disjoint parts of one source share none")


class CalibrationRecord(DataRecord):
    images_used: int
    batches: int
    dropped_short_batch: int
    seconds: float
    peak_rss_mb: float
    rss_growth_mb: float
    cache: str = Field(description="The ranges file (calib.<key>.json) in the artifact folder")
    cache_reused: bool
    batch_size: int
    seed: int


class TrialRecord(Record):
    """One ``--auto`` try."""

    method: str
    fp32_nodes: int
    drop_points: float | None
    passed: bool | None
    cosine: float


class NodeRank(Record):
    node: str
    op_type: str
    added_error: float
    kept_fp32: bool


class AutoRecord(Record):
    """``--auto``: its trials are graded on ``selected_on``; the artifact's gate (``metrics.gate``) on
    ``metrics.held_out``, a part it never looked at."""

    chosen_method: str
    fp32_nodes: list[str]
    reason: str
    trials: list[TrialRecord]
    ranking_top: list[NodeRank]
    selected_on: DataRecord | None = Field(default=None, description="The data the trials were graded on: "
                                                                     "disjoint from calibration and held-out")


class _QuantCommon(Record):
    weight_type: str
    per_channel: bool
    reduce_range: bool
    exclude_nodes: list[str] = Field(default_factory=list)
    preprocess: str = "onnxruntime quant_pre_process"


class DynamicQuantParams(_QuantCommon):
    step: Literal["quantize_dynamic"] = "quantize_dynamic"
    method: Literal["dynamic"] = "dynamic"
    activation_type: str
    exclude_op_types: list[str] = Field(default_factory=list)
    cpu: str


class StaticQuantParams(_QuantCommon):
    step: Literal["quantize_static"] = "quantize_static"
    method: str
    quant_format: Literal["QDQ", "QOperator"] = "QDQ"
    layout: str | None = Field(default=None, description="Int8Layout name (qdq_pc_u8, qop_pt_u8, ...)")
    activation_type: str
    exclude_op_types: list[str] = Field(default_factory=list)
    op_types: list[str] | None = Field(default=None, description="The op types quantized (--int8-ops); None in "
                                                                  "manifests before it was recorded")
    op_types_reason: str | None = Field(default=None, description="Why those op types (--int8-ops auto: attention)")
    fp32_nodes: list[str] = Field(default_factory=list)
    cpu: str
    calibration: CalibrationRecord
    auto: AutoRecord | None = None


class TrtQdqParams(_QuantCommon):
    """``int8_trt``: Q/DQ by TensorRT's explicit-quantization rules."""

    step: Literal["quantize_static_trt"] = "quantize_static_trt"
    method: str
    quant_format: Literal["QDQ"] = "QDQ"
    target: Literal["tensorrt"] = "tensorrt"
    activation_type: Literal["int8"] = "int8"
    symmetric: bool = True
    bias: Literal["fp32"] = "fp32"
    op_types: list[str]
    fp32_nodes: list[str] = Field(default_factory=list)
    calibration: CalibrationRecord
    accuracy_evaluated_as: str


class _VariantExport(Record):
    exporter: str
    opset: int
    optimize: OptimizeInfo | None = Field(default=None, description="None when --no-optimize")
    fine_tuned: bool = False
    training: TrainingRecord | None = Field(default=None, description="The fine-tuning/distillation run, if any")


class SkippedLayer(Record):
    layer: str
    reason: str


class SparsityParams(_VariantExport):
    step: Literal["sparsity"] = "sparsity"
    sparsity: Literal["2:4"] = "2:4"
    method: str
    group_axis: str
    layers_pruned: int
    layers_skipped: list[SkippedLayer]


class PruneParams(_VariantExport):
    step: Literal["prune_channels"] = "prune_channels"
    method: str
    pruning_ratio: float
    round_to: int | None
    ignored_layers: list[str]


class DistillParams(_VariantExport):
    """A smaller student trained to mimic the teacher (``convert --distill-into``)."""

    step: Literal["distill"] = "distill"
    student: str = Field(description="torchvision name or path/to/file.py:factory of the student")
    params_teacher: int | None = None
    params_student: int


class EngineParams(Record):
    """How a TensorRT engine was built (what ``convert --trt`` asked for, resolved)."""

    step: Literal["build_engine"] = "build_engine"
    source: str
    precision: str
    strongly_typed: bool = True
    int8_mode: str | None = None
    sparse_weights: bool
    min_batch: int
    opt_batch: int
    max_batch: int
    tf32: bool
    workspace_mb: int | None = None
    builder_optimization_level: int | None = None


class FusionParams(Record):
    """ONNX Runtime's transformer optimizer: which contrib ops it fused, and how many."""

    step: Literal["fuse_transformer"] = "fuse_transformer"
    model_type: str
    fused_ops: dict[str, int]


class VariantParams(Record):
    """The parameters of a variant step whose record is not one of the steps above: a step added by its own
    module and one row of ``convert.variants.VARIANTS``. Its record subclasses this one (with its ``step`` name and
    its own typed fields); a manifest read back gives this class, its fields as attributes."""

    model_config = ConfigDict(extra="allow")

    step: str


_KnownParams = Annotated[
    CopyParams | ExportParams | WeightsParams | OptimizeParams | Fp16Params | DynamicQuantParams
    | StaticQuantParams | TrtQdqParams | SparsityParams | PruneParams | DistillParams | EngineParams | FusionParams,
    Field(discriminator="step"),
]
_KNOWN_STEPS = frozenset(m.model_fields["step"].default for m in (
    CopyParams, ExportParams, WeightsParams, OptimizeParams, Fp16Params, DynamicQuantParams, StaticQuantParams,
    TrtQdqParams, SparsityParams, PruneParams, DistillParams, EngineParams, FusionParams))


def _params_tag(value: Any) -> str:
    step = value.get("step") if isinstance(value, dict) else getattr(value, "step", None)
    return "known" if step in _KNOWN_STEPS else "variant"


StepParams = Annotated[
    Annotated[_KnownParams, Tag("known")] | Annotated[SerializeAsAny[VariantParams], Tag("variant")],
    Discriminator(_params_tag),
]


class EngineBuild(Record):
    """What a TensorRT engine is tied to (it runs only where it was built) and its profile."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    engine_sha256: str
    profile: dict[str, dict[str, list[int]]] = Field(description="input -> min/opt/max shape")
    timing_cache: str | None = None
    calibration: CalibrationRecord | None = None


# -- measurements ------------------------------------------------------------------------------------
class GateResult(Record):
    """An accuracy gate's verdict: the drop against FP32 in points and the output cosine, and the budget."""

    drop_points: float | None
    basis: str
    budget_points: float | None
    passed: bool | None = Field(description="None when there was no budget (or nothing to compare)")
    samples: int
    cosine: float | None = Field(default=None, description="Worst output cosine with FP32")
    min_cosine: float | None = Field(default=None, description="The smallest cosine the budget allows")
    reason: str | None = Field(default=None, description="Why the gate failed, in one line")


class HeldOutRecord(DataRecord):
    used: int


class SparsityInfo(Record):
    """How well the weights in the ONNX file satisfy 2:4 along their input channels."""

    pattern: Literal["2:4"] = "2:4"
    checked_in: str
    fraction_groups_2of4: float
    fraction_weights_2of4: float
    groups: int
    weights: int
    zero_fraction: float
    ineligible_weights: list[str]
    violating_weights: list[str]


class AccuracyChange(AccuracyStats):
    """A variant against the FP32 model on held-out inputs, with the drops in points."""

    inputs: str
    agreement_drop_points: float | None = None
    accuracy_drop_points: float | None = None


class LatencyChange(Record):
    """A variant's ONNX Runtime CPU latency against the FP32 model, timed interleaved."""

    backend: str
    device: str
    batch_size: int
    baseline: str
    timing: str
    p50_ms_before: float
    p50_ms_after: float
    speedup_p50: float
    before: LatencyStats
    after: LatencyStats


class PruneStats(Record):
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    flops_note: str


class GenerationCompare(Record):
    """A model's greedy decoding against a reference's, step by step along the reference's tokens
    (``convert.genvalidate``)."""

    reference: str = Field(description="fp32/opt ONNX, or eager (transformers)")
    steps: int = Field(description="Steps compared per prompt: the prefill's token, then each decode step's")
    token_agreement: float = Field(description="Share of (prompt, step) whose greedy token equals the reference's")
    min_cosine: float = Field(description="Worst logits cosine with the reference at any step of any prompt")
    mean_cosine: float
    step_cosines: list[float] = Field(description="Per step, the worst over prompts")
    free_run_match: float | None = Field(default=None, description="Its own greedy continuation: share of the "
                                                                   "reference's tokens reproduced before the first "
                                                                   "difference (mean over prompts)")


class CacheCheck(Record):
    """The KV-cache path (prefill, then one token per step) against one forward over the whole sequence without a
    past: the logits at every position the cached steps produced."""

    positions: int
    max_abs_diff: float
    min_cosine: float


class PerplexityCheck(Record):
    """A decoder's perplexity on held-out text (``convert.genperplexity``), and against FP32's when a variant."""

    perplexity: float
    fp32_perplexity: float | None = Field(default=None, description="The reference's, on the same windows")
    increase: float | None = Field(default=None, description="perplexity / fp32_perplexity - 1")
    max_increase: float | None = Field(default=None, description="The gate's budget")
    basis: str


class GenerationCheck(Record):
    """A decoder with a KV cache, checked by greedy decoding (``convert.genvalidate``)."""

    prompts: int
    prompt_length: int
    new_tokens: int
    seed: int
    vs_fp32: GenerationCompare | None = Field(default=None, description="A variant against the FP32 ONNX model: "
                                                                        "its gate's basis")
    vs_eager: GenerationCompare | None = Field(default=None, description="Against eager PyTorch (transformers)")
    cache: CacheCheck
    random_init: bool = Field(description="Random weights: agreement and cosine only, no perplexity")
    note: str = ""
    perplexity: PerplexityCheck | None = Field(default=None, description="With convert --eval-text")


class ArtifactMetrics(Record):
    """Everything measured about one artifact; each step fills its part."""

    checker: Literal["ok", "failed"] | None = None
    shape_inference: Literal["ok", "failed"] | None = None
    parity: dict[str, ParityStats] = Field(default_factory=dict, description="batch_N -> parity with the reference")
    parity_reference: str | None = None
    accuracy: AccuracyStats | None = Field(default=None, description="Held-out statistics against FP32 (gates)")
    gate: GateResult | None = None
    summary: str | None = None
    held_out: HeldOutRecord | None = None
    sparsity: SparsityInfo | None = None
    accuracy_vs_fp32: AccuracyChange | None = None
    latency: LatencyChange | None = None
    size_bytes_before: int | None = None
    size_bytes_after: int | None = None
    pruning: PruneStats | None = None
    generation: GenerationCheck | None = Field(default=None, description="KV-cache decoders: greedy decoding "
                                                                         "checks")

    def update(self, other: ArtifactMetrics) -> None:
        """Take every field ``other`` has set (e.g. a validation's checker, shape inference and parity)."""
        for name in other.model_fields_set:
            setattr(self, name, getattr(other, name))


# -- schema 1 ----------------------------------------------------------------------------------------
_V1_STEP = {"quantize_static": "quantize_static", "quantize_dynamic": "quantize_dynamic", "copy": "copy",
            "quantize_static_trt": "quantize_static_trt", "sparsity": "sparsity", "optimize": "optimize",
            "prune_channels": "prune_channels", "build_engine": "build_engine", "fp16": "fp16"}
_PRUNE_KEYS = ("params_before", "params_after", "macs_before", "macs_after", "flops_note")


def _v1_params(art: dict[str, Any]) -> dict[str, Any]:
    params = dict(art.get("params") or {})
    step = art.get("step", "")
    if step == "export":
        step = "export" if art.get("kind") == "onnx" else "save_weights"
    elif step == "copy":
        params = {"copied_from": str(params.get("from", ""))}
    elif step == "fp16":  # an engine's FP16 source kept every param of its own source
        params = {k: params[k] for k in ("converter", "keep_io_types", "casts_added", "cpu", "sparsity") if k in params}
    elif step in ("sparsity", "prune_channels") and not params.get("optimize"):
        params["optimize"] = None
    return {**params, "step": _V1_STEP.get(step, step)}


def _v1_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if k not in _PRUNE_KEYS}
    if all(k in metrics for k in _PRUNE_KEYS):
        out["pruning"] = {k: metrics[k] for k in _PRUNE_KEYS}
    return out


def migrate_v1_artifact(art: dict[str, Any]) -> dict[str, Any]:
    """One artifact of a schema-1 manifest (free ``params``/``metrics``/``extra`` dicts) in schema 2."""
    out = {k: v for k, v in art.items() if k not in ("params", "metrics", "extra", "step")}
    out["params"] = _v1_params(art)
    out["metrics"] = _v1_metrics(art.get("metrics") or {})
    extra = dict(art.get("extra") or {})
    if extra:
        extra.pop("build_flags", None)
        out["engine"] = extra
    return out
