"""Every configuration of a conversion, in one leaf module: what to export, and which variants to make.

The step modules (export, quantize, gates, sparsity, engine) and the pipeline read these; this module
imports none of them, so a step never needs the pipeline that runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from convert.export import Exporter
from core.errors import InputError
from core.manifest import Precision

DEFAULT_OPSET = 18


class ExportConfig(BaseModel):
    """What to export and how."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="torchvision name, path/to/file.py:factory, TorchScript .pt, .onnx, or hf:folder")
    weights: str | None = Field(default=None, description="torchvision weights name or local state-dict file")
    task: str | None = Field(default=None, description="hf: models: the task (default: from the folder's config)")
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]] | None = Field(
        default=None, description="One input's shape, e.g. (1, 3, 224, 224), or shapes by input name, e.g. "
                                  "{'input_ids': (1, 16)}: they bind the model's symbolic dims")
    sample_inputs: str | None = Field(default=None, description=".npz with one array per input name: the export's "
                                                                "sample inputs, and the values of the symbolic dims")
    opset: int = Field(default=DEFAULT_OPSET, ge=7, le=23, description="ONNX opset")
    exporter: Exporter = Field(default="torchscript", description="torch.onnx exporter")
    dynamic_batch: bool = Field(default=True, description="Symbolic batch dimension")
    optimize: bool = Field(default=True, description="Write model.opt.onnx (onnxslim + ORT basic)")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed for random init and test inputs (PyTorch "
                      "takes 0 to 2**63-1)")
    parity_batches: list[int] = Field(default=[1, 2], description="Batch sizes for the parity check")


CalibMethod = Literal["minmax", "entropy", "percentile"]


CALIB_METHODS: tuple[CalibMethod, ...] = ("minmax", "entropy", "percentile")


QType = Literal["uint8", "int8"]


#: The default budget of every variant against FP32 on held-out data: at most 1 point of top-1 lost
#: (accuracy with labels, agreement without; for outputs that are not class scores, random-init weights, random
#: inputs and a reference whose top-1 is one class for every input, 100 x (1 - centered cosine)),
#: and an output cosine of at least 0.99.
DEFAULT_MAX_ACCURACY_DROP = 1.0
DEFAULT_MIN_COSINE = 0.99


class Budget(BaseModel):
    """What a variant (FP16, INT8, sparse, pruned) must keep against FP32 on held-out data; outside it the
    variant is marked failed, left out of `bench` unless named, and convert exits non-zero."""

    model_config = ConfigDict(extra="forbid")

    max_accuracy_drop: float = Field(
        default=DEFAULT_MAX_ACCURACY_DROP, ge=0,
        description="Allowed top-1 loss in points (agreement with FP32 when there are no labels; 100 x (1 - "
                    "centered cosine) for outputs that are not class scores)")
    min_cosine: float = Field(default=DEFAULT_MIN_COSINE, ge=-1, le=1,
                              description="Smallest output cosine with FP32 allowed (worst output, worst over samples)")


class GenerationGate(BaseModel):
    """A model with a KV cache: each variant decodes greedily from seeded prompts along the FP32 ONNX model's tokens
    (convert/genvalidate.py); it must choose the same token and keep its logits close at every step."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(default=2, ge=1, description="Seeded prompts (token ids inside the vocabulary), decoded as "
                                                      "one batch")
    prompt_length: int = Field(default=8, ge=1, description="Tokens per prompt")
    new_tokens: int = Field(default=16, ge=1, description="Greedy decode steps after the prefill")
    min_token_agreement: float = Field(default=0.9, ge=0, le=1, description="Smallest share of steps whose greedy "
                                                                            "token equals FP32's")
    min_cosine: float = Field(default=0.98, ge=-1, le=1, description="Smallest logits cosine with FP32 at any step")
    text: str | None = Field(default=None, description="Held-out text (a UTF-8 file, or 'stdlib'): each variant's "
                                                       "perplexity on it is gated against FP32's "
                                                       "(convert.genperplexity)")
    max_perplexity_increase: float = Field(default=0.05, ge=0, description="With text: the largest relative "
                                                                           "perplexity increase over FP32 (0.05: 5%)")


class GateConfig(Budget):
    """How variants are checked against FP32, and the budget they must meet."""

    auto: bool = Field(default=False, description="Static INT8: try calibration methods, then keep the most "
                                                  "error-adding nodes in FP32 until within budget")
    eval_data: str | None = Field(default=None, description="Held-out data (image folder, .npz with optional "
                                                            "'labels', imagenet_subset); default: a window of "
                                                            "the calibration data that calibration never sees")
    eval_size: int = Field(default=200, ge=1, description="At most this many held-out samples")
    eval_batch: int = Field(default=16, ge=1, description="Batch size for the held-out runs")
    generation: GenerationGate = Field(default_factory=GenerationGate,
                                       description="Models with a KV cache: the greedy-decoding gate (convert.genvalidate)")


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


class Int8Layout(BaseModel):
    """How a static INT8 model is laid out for ONNX Runtime. The numbers barely differ between layouts but the
    kernels do: QDQ runs through ONNX Runtime's fusions, QOperator (QLinearConv/QLinearMatMul) through its
    QLinear kernels directly; per-tensor weight scales and signed activations change which integer kernels run.
    Which is fastest depends on the CPU and the batch size, so `convert --int8-layouts` writes several and
    `bench` / `tune` measure them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quant_format: Literal["qdq", "qoperator"] = Field(description="QDQ pairs, or QLinear operators")
    per_channel: bool = Field(description="Per-output-channel weight scales (else one per tensor)")
    activation_type: QType = Field(description="Activations: uint8 or int8")

    @property
    def name(self) -> str:
        return (f"{'qop' if self.quant_format == 'qoperator' else 'qdq'}_{'pc' if self.per_channel else 'pt'}_"
                f"{'u8' if self.activation_type == 'uint8' else 's8'}")

    @classmethod
    def parse(cls, text: str) -> Int8Layout:
        """``qdq_pc_u8``-style names: format (qdq|qop), weight scales (pc|pt), activations (u8|s8)."""
        parts = text.strip().lower().split("_")
        fmt = {"qdq": "qdq", "qop": "qoperator"}
        scales = {"pc": True, "pt": False}
        acts = {"u8": "uint8", "s8": "int8"}
        if len(parts) != 3 or parts[0] not in fmt or parts[1] not in scales or parts[2] not in acts:
            raise InputError(f"--int8-layouts: bad layout {text!r}; expected FORMAT_SCALES_ACTIVATIONS with FORMAT "
                             "qdq|qop, SCALES pc|pt (per channel/tensor), ACTIVATIONS u8|s8, e.g. qop_pt_u8")
        return cls.model_validate({"quant_format": fmt[parts[0]], "per_channel": scales[parts[1]],
                                   "activation_type": acts[parts[2]]})


Int4Algorithm = Literal["rtn", "hqq", "gptq"]
#: --nncf-model-type: NNCF's model_type for --int8-nncf (auto: transformer where the graph has attention)
NncfModelType = Literal["auto", "transformer", "generic"]
#: --int8-ops: the op types static INT8 quantizes (convert/ort_quant.py:static_op_types). all: every type ONNX Runtime
#: can quantize (its own default); weighted: Conv/ConvTranspose/Gemm/MatMul only; auto: weighted where
#: the graph has attention (convert/attention.py), else all
Int8OpSet = Literal["auto", "all", "weighted"]


#: MatMulNBits' accuracy level when none is given: 4 (activations quantized to int8 per block, int8 dot products), the
#: CPU default of ONNX Runtime GenAI's model builder ("Default is 4 for the CPU EP"); level 0 dequantizes every
#: weight to FP32 per call, which leaves INT4 little faster than FP32 on a CPU. The gate measures what it costs.
CPU_INT4_ACCURACY_LEVEL = 4


class Int4Config(BaseModel):
    """INT4 weight-only (``--int4``): ONNX Runtime's MatMulNBitsQuantizer turns every MatMul with a constant weight
    into a MatMulNBits (4-bit weights in blocks along K, one scale per block; activations stay FP32)."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Int4Algorithm = Field(default="rtn", description="rtn: round to nearest per block; hqq: half-quadratic "
                                                                "(no data; asymmetric); gptq: GPTQ on calibration "
                                                                "inputs (--calib, else seeded inputs of the IOSpec)")
    block_size: int = Field(default=32, ge=16, le=256, description="Weights per scale along K: a power of 2 from 16 "
                                                                   "(K is zero-padded to a multiple)")
    symmetric: bool = Field(default=False, description="Symmetric blocks (no zero points)")
    accuracy_level: int | None = Field(default=None, ge=0, le=4, description="MatMulNBits compute type: 0 FP32 "
                                                                             "(attribute unset), 1 fp32, 2 fp16, 3 "
                                                                             "bf16, 4 int8 activations; None: 4 for "
                                                                             "rtn and gptq (ONNX Runtime GenAI's model "
                                                                             "builder's CPU default), 0 for hqq")
    ratio: float = Field(default=1.0, ge=0, le=1, description="--int4-ov: share of the layers NNCF compresses to INT4 "
                                                               "(the rest INT8); --int4 (ONNX Runtime) has no ratio")

    @model_validator(mode="after")
    def _combine(self) -> Int4Config:
        if self.block_size & (self.block_size - 1):
            raise InputError(f"--int4-block-size must be a power of 2 from 16 to 256, got {self.block_size}")
        if self.ratio <= 0:
            raise InputError(f"--int4-ratio is the share of the layers in INT4: above 0 and at most 1, got {self.ratio:g}")
        if self.algorithm == "hqq" and (self.symmetric or self.accuracy_level):
            raise InputError("INT4 hqq writes asymmetric blocks with float zero points and no accuracy level: drop "
                             "--int4-symmetric/--int4-accuracy-level, or use rtn")
        return self

    @property
    def level(self) -> int:
        """The accuracy level written (0: the attribute left unset, FP32 compute)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 0 if self.algorithm == "hqq" else CPU_INT4_ACCURACY_LEVEL


class QuantConfig(BaseModel):
    """Which reduced-precision variants to build, and how."""

    model_config = ConfigDict(extra="forbid")

    # a variant's own field names its convert flag: messages list them (variant_flags); convert.variants has its step
    fp16: bool = Field(default=False, description="FP16 weights/compute, FP32 inputs/outputs",
                       json_schema_extra={"flag": "--fp16"})
    int8_static: bool = Field(default=False, description="QDQ static INT8 with calibration",
                              json_schema_extra={"flag": "--int8"})
    int8_dynamic: bool = Field(default=False, description="Dynamic INT8 (weights int8, activations at run time)",
                               json_schema_extra={"flag": "--int8-dynamic"})
    int8_nncf: bool = Field(default=False, description="OpenVINO's own INT8 (NNCF quantize, calibrated like --int8), "
                                                       "an OpenVINO IR (convert/int8_nncf.py)",
                            json_schema_extra={"flag": "--int8-nncf"})
    nncf_model_type: NncfModelType = Field(
        default="auto", description="--int8-nncf: NNCF's model type; auto: transformer where the graph has attention "
                                    "(convert/int8_nncf.py)")
    int4: bool = Field(default=False, description="INT4 weight-only (MatMulNBits, convert/int4.py)",
                       json_schema_extra={"flag": "--int4"})
    int4_ov: bool = Field(default=False, description="INT4 weight compression by NNCF for OpenVINO, an OpenVINO IR "
                                                     "(convert/int4_ov.py)", json_schema_extra={"flag": "--int4-ov"})
    int4_options: Int4Config = Field(default_factory=Int4Config, description="How --int4 and --int4-ov quantize "
                                                                             "(block size, symmetry; ratio: --int4-ov)")
    calib: CalibConfig = Field(default_factory=CalibConfig)
    activation_type: QType = Field(default="uint8", description="Static INT8 activations")
    weight_type: QType = Field(default="int8", description="INT8 weights")
    per_channel: bool = Field(default=True, description="Per-output-channel weight scales")
    reduce_range: bool | None = Field(default=None, description="7-bit weights; None = on where ONNX Runtime "
                                                                "advises it (x86-64 without VNNI)")
    extra_layouts: list[Int8Layout] = Field(
        default_factory=list, description="More static INT8 variants from the same calibration and FP32 nodes, one per "
                                          "layout, named int8_static_<method>_<layout>; bench and tune compare them")
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names kept in FP32")
    exclude_op_types: list[str] = Field(default_factory=list, description="Op types kept in FP32")
    int8_ops: Int8OpSet = Field(
        default="auto", description="Static INT8: the op types quantized; auto: only Conv/ConvTranspose/Gemm/MatMul "
                                    "where the graph has attention (its layer norms, residual Adds and GELU stay "
                                    "float), else every type ONNX Runtime can quantize (convert/ort_quant.py)")
    extra_int8_ops: list[Int8OpSet] = Field(
        default_factory=list, description="More static INT8 variants from the same calibration and FP32 nodes, one per "
                                          "op set whose op types differ from int8_ops', in the main layout, named "
                                          "int8_static_<method>_<set> (set: all or weighted); bench and tune compare "
                                          "them")
    trt_qdq: bool = Field(default=False, description="Also write int8_trt from the same calibration: Q/DQ by "
                                                     "TensorRT's rules, for an INT8 engine (convert --trt --int8)")
    gate: GateConfig = Field(default_factory=GateConfig)
    extra_variants: list[str] = Field(
        default_factory=list, description="More variant steps by their name in convert.variants.VARIANTS: a step "
                                          "whose row has no bool field of this section")

    @property
    def any_variant(self) -> bool:
        return any(getattr(self, name) for name in flag_fields(QuantConfig)) or bool(self.extra_variants)

    @property
    def layout(self) -> Int8Layout:
        """The layout of the main static INT8 variants (int8_static_<method>)."""
        return Int8Layout(quant_format="qdq", per_channel=self.per_channel, activation_type=self.activation_type)



SparsityPattern = Literal["2:4"]


TrainDevice = Literal["cpu", "cuda"]


class TrainConfig(BaseModel):
    """How a variant is trained to mimic the FP32 teacher (convert/distill.py): KL divergence on
    temperature-softened outputs, plus cross-entropy where the data has labels."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Training data: image folder (class sub-folders = labels) or .npz with one "
                                  "array per input name and optional 'labels'; unlabelled data is enough")
    epochs: int = Field(default=20, ge=1, description="At most this many epochs")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(default=64, ge=1, description="Training batch size")
    temperature: float = Field(default=4.0, gt=0, description="Softmax temperature of the distillation loss")
    label_weight: float | None = Field(default=None, ge=0, le=1,
                                       description="Weight of the cross-entropy term; None: 0.5 when DATA has "
                                                   "labels, else 0. A value above 0 needs labelled DATA")
    heldout_fraction: float = Field(default=0.15, gt=0, lt=1, description="Share of DATA held out for early "
                                                                          "stopping (never trained on)")
    patience: int = Field(default=4, ge=1, description="Stop after this many epochs without a better held-out "
                                                       "agreement")
    max_seconds: float | None = Field(default=None, gt=0, description="Time budget: no new epoch after this")
    max_samples: int | None = Field(default=None, ge=2, description="Read at most this many samples of DATA")
    device: TrainDevice = Field(default="cpu", description="Train on the CPU or on CUDA")
    threads: int | None = Field(default=None, ge=1, description="CPU threads while training (restored after); "
                                                               "None: PyTorch's default. 1 is fastest for small "
                                                               "models on a shared CPU")
    seed: int = Field(default=0, description="Seed of the split, the shuffles and the student's init")


class DistillConfig(BaseModel):
    """``--distill-into``: a smaller student trained to mimic the model, written as ``model.distilled.onnx``."""

    model_config = ConfigDict(extra="forbid")

    student: str = Field(description="torchvision name or path/to/file.py:factory of the student",
                         json_schema_extra={"flag": "--distill-into"})
    train: TrainConfig


class SparsityConfig(BaseModel):
    """Which sparse/pruned variants to make, and how to measure them."""

    model_config = ConfigDict(extra="forbid")

    # a variant's own field names its convert flag (field_flags), as QuantConfig's do
    pattern: SparsityPattern | None = Field(default=None, description="Semi-structured pattern: only '2:4'",
                                            json_schema_extra={"flag": "--sparsity"})
    prune_channels: float | None = Field(default=None, gt=0, lt=1,
                                         description="Fraction of channels to remove per prunable layer",
                                         json_schema_extra={"flag": "--prune-channels"})
    round_to: int | None = Field(default=None, ge=1,
                                 description="Keep pruned channel counts a multiple of this (e.g. 8 for GPUs)")
    eval_data: str | None = Field(default=None, description="Held-out inputs for the accuracy change (--eval-data: "
                                                            "image folder, .npy/.npz with optional 'labels')")
    eval_samples: int = Field(default=64, ge=1, description="Random held-out inputs when there is no eval_data")
    latency_warmup: int = Field(default=5, ge=0, description="ONNX Runtime warm-up runs before timing")
    latency_iters: int = Field(default=30, ge=1, description="Timed ONNX Runtime runs at batch 1")
    budget: Budget = Field(default_factory=Budget, description="The gate the sparse/pruned variants must pass")
    recover: TrainConfig | None = Field(default=None, description="--recover distill: fine-tune each variant with "
                                                                  "the FP32 model as teacher (a *_recovered "
                                                                  "variant of its own)")

    @property
    def enabled(self) -> bool:
        return self.pattern is not None or self.prune_channels is not None


DEFAULT_MAX_BATCH = 32


DEFAULT_OPT_BATCH = 8


class EngineConfig(BaseModel):
    """How to build TensorRT engines (``convert --trt``): one per precision asked for."""

    model_config = ConfigDict(extra="forbid")

    fp16: bool = Field(default=False, description="An FP16 engine, built from the fp16 ONNX variant")
    int8: bool = Field(default=False, description="An INT8 engine, built from int8_trt: Q/DQ by TensorRT's rules "
                                                  "from the static INT8 calibration (needs its --calib data)")
    source: str | None = Field(default=None, description="Manifest ONNX artifact to build one engine from instead, "
                                                         "e.g. sparse24: in its precision, or converted to FP16 "
                                                         "first with fp16")
    tf32: bool = Field(default=True, description="Let FP32 layers use TF32 tensor cores (TensorRT's default; "
                                                 "Polygraphy's is off); the only precision switch left in "
                                                 "TensorRT 11, and what 2:4 sparse FP32 layers need")
    min_batch: int | None = Field(default=None, ge=1, description="Profile min batch (default 1)")
    opt_batch: int | None = Field(default=None, ge=1, description=f"Profile opt batch: the one kernels are tuned "
                                                                  f"for (default {DEFAULT_OPT_BATCH}, clamped to "
                                                                  "min..max)")
    max_batch: int | None = Field(default=None, ge=1, description=f"Profile max batch (default {DEFAULT_MAX_BATCH})")
    workspace_mb: int | None = Field(default=None, ge=1, description="Workspace memory pool limit (MiB); "
                                                                     "default: TensorRT's (all device memory)")
    builder_opt_level: int | None = Field(default=None, ge=0, le=5, description="Builder optimization level 0-5; "
                                                                                "default: TensorRT's (3)")
    timing_cache: Path | None = Field(default=None, description="Tactic timing cache, read if present and updated "
                                                                "after the build; default OUT/timing.cache")

    dim_ranges: dict[str, tuple[int, int, int]] = Field(
        default_factory=dict, description="Profile min/opt/max of each non-batch symbolic dim, e.g. "
                                          "{'sequence': (1, 64, 128)}; default: the dim's bound value throughout")

    def precisions(self) -> list[Precision]:
        """The engines asked for, by precision (FP32 when neither --fp16 nor --int8)."""
        out: list[Precision] = []
        if self.fp16:
            out.append("fp16")
        if self.int8:
            out.append("int8")
        return out or ["fp32"]


class ConvertConfig(BaseModel):
    """A full conversion request."""

    model_config = ConfigDict(extra="forbid")

    export: ExportConfig
    out: Path | None = Field(default=None, description="Output folder; default artifacts/<model name>")
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig,
                                     description="2:4 sparse and channel-pruned variants (convert/sparsity.py)")
    quant: QuantConfig | None = Field(default=None, description="FP16 / dynamic INT8 / static INT8 variants and their "
                                                              "accuracy gates (convert/quantize.py); None = none")
    engine: EngineConfig | None = Field(default=None, description="Also build a TensorRT engine (convert/engine.py); "
                                                                  "None = no engine")
    distill: DistillConfig | None = Field(default=None, description="Also distill into a smaller student "
                                                                    "(convert/recover.py); None = none")

    @model_validator(mode="after")
    def _sections_combine(self) -> ConvertConfig:
        """The rules that combine fields, one line each naming the flags (the API, sweep and the CLI share them):
        the variant flags' rules, recovery, --eval-data. The rules of the variant table's own rows run before the
        export (``convert.variants.check_config``); the engines' need of calibration (``--trt --int8``) at the start
        of the run (``convert.engine.with_source_variants``)."""
        if (q := self.quant) is not None:
            e = self.engine
            engine_int8 = e is not None and e.source is None and e.int8  # its calibration rule is the engine's
            if not q.any_variant and not (e is not None and e.source is None and (e.fp16 or e.int8)):
                raise InputError(f"calibration, precision and accuracy-gate flags apply to a variant: add "
                                 f"{variant_flags()}")
            if q.int8_static and not q.calib.data and not engine_int8:
                raise InputError("--int8 needs calibration data: --calib DIR|FILE.npz|imagenet_subset "
                                 "(or --calib synthetic, explicitly)")
            if q.gate.auto and not q.int8_static:
                raise InputError("--auto tunes static INT8: add --int8")
            if q.extra_layouts and not q.int8_static:
                raise InputError("--int8-layouts are layouts of static INT8: add --int8")
            if (q.exclude_nodes or q.exclude_op_types) and not (q.int8_static or q.int8_dynamic):
                raise InputError("--exclude-nodes/--exclude-op-types apply to --int8 and --int8-dynamic")
        s = self.sparsity
        if s.recover is not None and not s.enabled:
            raise InputError(RECOVER_NEEDS_VARIANT)
        if s.eval_data is not None and self.quant is None and not s.enabled and self.distill is None:
            raise InputError("--eval-data measures variants: add "
                             + join_flags(field_flags(QuantConfig, SparsityConfig, DistillConfig)))
        return self


def flag_fields(section: type[BaseModel]) -> dict[str, str]:
    """Every field of ``section`` that asks for a variant, and its convert flag (its ``json_schema_extra`` names it):
    QuantConfig's are the rows of convert.variants.VARIANTS (``int8_static``: ``--int8``)."""
    return {name: str(f.json_schema_extra["flag"]) for name, f in section.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and "flag" in f.json_schema_extra}


def field_flags(*sections: type[BaseModel]) -> list[str]:
    """The flag of every field of ``sections`` that asks for a variant, in order."""
    return [flag for section in sections for flag in flag_fields(section).values()]


def join_flags(flags: list[str], last: str = " or ") -> str:
    """``["--a", "--b", "--c"]`` -> "--a, --b or --c" (``last`` joins the last two)."""
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])}{last}{flags[-1]}"


def variant_flags(last: str = " or ") -> str:
    """"--fp16, --int8 or --int8-dynamic": the flags of QuantConfig's variants (the rows of convert.variants), for
    messages; ``last`` joins the last two."""
    return join_flags(field_flags(QuantConfig), last)


RECOVER_NEEDS_VARIANT = ("--recover distill fine-tunes a pruned or sparse variant: add --prune-channels F or "
                         "--sparsity 2:4")


# -- the flags' text, parsed into the types above (one clear line naming the flag) --------------------------
def parse_methods(text: str) -> list[CalibMethod]:
    """``minmax,entropy`` -> ["minmax", "entropy"]; an unknown name is one clear InputError."""
    items = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in CALIB_METHODS]
    if bad or not items:
        raise InputError(f"unknown --calib-method {text!r}; choose from {', '.join(CALIB_METHODS)} "
                         "(comma-separated for one variant each)")
    if len(items) < text.count(",") + 1:  # minmax,,entropy: a method left out by mistake
        raise InputError(f"--calib-method {text!r} has an empty item; separate the methods with single commas")
    return [m for x in dict.fromkeys(items) for m in CALIB_METHODS if m == x]


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


def parse_sparsity_pattern(text: str) -> SparsityPattern:
    """The ``--sparsity`` value, or one clear InputError."""
    if text.strip().replace(" ", "") == "2:4":
        return "2:4"
    raise InputError(f"unsupported --sparsity {text!r}: only 2:4 is supported (2 non-zero weights in every "
                     "group of 4 input channels, the pattern TensorRT's sparse kernels use)")


def parse_prune_ratio(text: str) -> float:
    """The ``--prune-channels`` value: a fraction strictly between 0 and 1, or one clear InputError."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise InputError(f"--prune-channels must be a fraction strictly between 0 and 1 (e.g. 0.3 removes 30% of "
                         f"the channels of every prunable layer), got {text!r}")
    return value
