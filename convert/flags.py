"""``convert``'s flags as one pydantic model, and the one mapping from them to a :class:`ConvertConfig`.

``cli.py convert`` and ``sweep`` (a plan's conversion sets) both build a :class:`ConvertFlags` and call
:meth:`ConvertFlags.to_config`. The model holds the rules about flags: a value parsed from its text (one clear
line naming the flag), and a flag given without the one it needs (it would do nothing). Which flags were given is
the model's ``model_fields_set``: pass only those. The rules that combine sections of the config are
``ConvertConfig``'s own validators (``convert/config.py``), shared with the Python API.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from calibration.text import check_text_source
from convert.config import (
    DEFAULT_OPSET,
    RECOVER_NEEDS_VARIANT,
    Budget,
    CalibConfig,
    CalibMethod,
    ConvertConfig,
    DistillConfig,
    EngineConfig,
    ExportConfig,
    GateConfig,
    GenerationGate,
    Int4Algorithm,
    Int4Config,
    Int8Layout,
    Int8OpSet,
    NncfModelType,
    QType,
    QuantConfig,
    SparsityConfig,
    SparsityPattern,
    TrainConfig,
    TrainDevice,
    flag_fields,
    parse_floats,
    parse_methods,
    parse_prune_ratio,
    parse_qtype,
    parse_sparsity_pattern,
    variant_flags,
)
from convert.export import Exporter
from convert.trt_profile import parse_dim_ranges
from core.errors import InputError
from core.flagtext import csv_items, flag_name
from core.shapes import parse_input_shapes

InputShape = tuple[int, ...] | dict[str, tuple[int, ...]]

#: Flags that tune the FP16/INT8 variants: without one of them asked for they act on nothing.
#: (--eval-data is not one of them: the sparse/pruned variants are measured on it too.)
QUANT_ONLY_FLAGS = ("calib", "calib_size", "calib_method", "calib_batch", "size", "mean", "std", "activation_type",
                    "weight_type", "per_channel", "reduce_range", "exclude_nodes", "exclude_op_types", "auto",
                    "eval_size", "int8_layouts", "min_token_agreement", "eval_text", "max_perplexity_increase")
#: Flags that tune --trt's engines: without it they act on nothing.
TRT_ONLY_FLAGS = ("trt_from", "min_batch", "opt_batch", "max_batch", "workspace", "builder_opt_level", "timing_cache")
#: Flags that tune --int4: without it they act on nothing.
INT4_FLAGS = ("int4_algorithm", "int4_accuracy_level")
#: Flags that tune --int4 or --int4-ov (NNCF's, convert/int4_ov.py); --int4-ratio only --int4-ov.
INT4_ANY_FLAGS = ("int4_block_size", "int4_symmetric")
INT4_OV_FLAGS = ("int4_ratio",)
#: Flags that tune --int8-nncf: without it they act on nothing.
INT8_NNCF_FLAGS = ("nncf_model_type",)
#: Flags that tune --int8 (ONNX Runtime's static INT8) only.
INT8_STATIC_FLAGS = ("int8_ops",)

#: Flags that tune training: without --train-data they act on nothing.
TRAIN_FLAGS = ("epochs", "lr", "temperature", "label_weight", "patience", "train_time", "train_device")


#: (the flag's text, the flag) -> the value of its field, or one clear line naming the flag
TextParser = Callable[[str, str], Any]


def _choice(*choices: str) -> TextParser:
    def parse(text: str, flag: str) -> str:
        if text not in choices:
            raise InputError(f"unknown {flag} {text!r}; choose {' or '.join(choices)}")
        return text
    return parse


def _op_sets(items: list[str], flag: str) -> list[str]:
    """``--int8-ops auto,all``: each of auto/all/weighted, once; the first is the main variant's."""
    pick = _choice("auto", "all", "weighted")
    sets = [pick(t, flag) for t in items]
    if len(set(sets)) < len(sets):
        raise InputError(f"{flag} {','.join(items)!r} names an op set twice")
    return sets


def _shapes(text: str, _flag: str) -> InputShape:
    shapes = parse_input_shapes(text)
    return shapes[None] if None in shapes else {str(k): v for k, v in shapes.items()}


def _recover(text: str, flag: str) -> str:
    if text.strip().lower() != "distill":
        raise InputError(f"unsupported {flag} {text!r}: only 'distill' (fine-tuning with the FP32 model as teacher) "
                         "is supported")
    return "distill"


#: The flags whose text is parsed, by field name; every other flag's text is its field's type's (pydantic).
TEXT_PARSERS: dict[str, TextParser] = {
    "input_shape": _shapes,
    "exporter": _choice("torchscript", "dynamo"),
    "sparsity": lambda text, _: parse_sparsity_pattern(text),
    "prune_channels": lambda text, _: parse_prune_ratio(text),
    "calib_method": lambda text, _: parse_methods(text),
    "mean": parse_floats,
    "std": parse_floats,
    "activation_type": parse_qtype,
    "weight_type": parse_qtype,
    "int8_layouts": lambda text, flag: [Int8Layout.parse(t) for t in csv_items(text, flag)],
    "exclude_nodes": csv_items,
    "exclude_op_types": csv_items,
    "dim_range": lambda text, _: parse_dim_ranges(text),
    "recover": _recover,
    "train_device": _choice("cpu", "cuda"),
    "int4_algorithm": _choice("rtn", "hqq", "gptq"),
    "nncf_model_type": _choice("auto", "transformer", "generic"),
    "int8_ops": lambda text, flag: _op_sets(csv_items(text, flag), flag),
}


class ConvertFlags(BaseModel):
    """Every ``convert`` flag by its name (``--calib-method`` is ``calib_method``), as given on the command line:
    text values are parsed here, each into the type its config field has."""

    model_config = ConfigDict(extra="forbid")

    model: str
    weights: str | None = None
    input_shape: InputShape | None = None
    sample_inputs: str | None = None
    task: str | None = None
    opset: int = DEFAULT_OPSET
    exporter: Exporter = "torchscript"
    dynamic_batch: bool = True
    optimize: bool = True
    out: Path | None = None
    seed: int = 0
    sparsity: SparsityPattern | None = None
    prune_channels: float | None = None
    fp16: bool = False
    int8: bool = False
    int8_dynamic: bool = False
    int8_nncf: bool = False
    nncf_model_type: NncfModelType = "auto"
    int4: bool = False
    int4_algorithm: Int4Algorithm = "rtn"
    int4_block_size: int = 32
    int4_accuracy_level: int | None = None
    int4_ov: bool = False
    int4_symmetric: bool = False
    int4_ratio: float = 1.0
    min_token_agreement: float = 0.9
    eval_text: str | None = None
    max_perplexity_increase: float = 0.05
    calib: str | None = None
    calib_size: int = 100
    calib_method: list[CalibMethod] = Field(default=["minmax"])
    calib_batch: int = 8
    size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    activation_type: QType = "uint8"
    weight_type: QType = "int8"
    per_channel: bool = True
    reduce_range: bool | None = None
    int8_layouts: list[Int8Layout] = Field(default_factory=list)
    exclude_nodes: list[str] = Field(default_factory=list)
    exclude_op_types: list[str] = Field(default_factory=list)
    int8_ops: list[Int8OpSet] = Field(default=["auto"], min_length=1)
    max_accuracy_drop: float = 1.0
    min_cosine: float = 0.99
    auto: bool = False
    eval_data: str | None = None
    eval_size: int = 200
    trt: bool = False
    trt_from: str | None = None
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    dim_range: dict[str, tuple[int, int, int]] = Field(default_factory=dict)
    tf32: bool = True
    workspace: int | None = None
    builder_opt_level: int | None = None
    timing_cache: Path | None = None
    recover: Literal["distill"] | None = None
    distill_into: str | None = None
    train_data: str | None = None
    epochs: int = 20
    lr: float = 1e-3
    temperature: float = 4.0
    label_weight: float | None = None
    patience: int = 4
    train_time: float | None = None
    train_device: TrainDevice = "cpu"

    # -- values parsed from their text (TEXT_PARSERS) ----------------------------------------------------------
    @field_validator("*", mode="before")
    @classmethod
    def _parse_text(cls, value: Any, info: ValidationInfo) -> Any:
        parse = TEXT_PARSERS.get(info.field_name or "")
        return parse(value, flag_name(info.field_name or "")) if parse is not None and isinstance(value, str) else value

    # -- flags given without the flag they need ----------------------------------------------------------------
    def given(self, names: tuple[str, ...]) -> list[str]:
        """The spelling of each of ``names`` given explicitly (not left at its default), in that order."""
        return [flag_name(n) for n in names if n in self.model_fields_set]

    @property
    def asks_quant(self) -> bool:
        return any(self.quant_variants.values())

    @property
    def quant_variants(self) -> dict[str, Any]:
        """QuantConfig's variant fields (the rows of convert.variants.VARIANTS) as their flags set them: ``int8_static``
        from ``--int8`` (the flag ``--x-y`` is this model's field ``x_y``)."""
        return {name: bool(getattr(self, flag.removeprefix("--").replace("-", "_"), False))
                for name, flag in flag_fields(QuantConfig).items()}

    @model_validator(mode="after")
    def _flags_need_their_variant(self) -> ConvertFlags:
        if not self.asks_quant and (stray := self.given(QUANT_ONLY_FLAGS)):
            raise InputError(f"{', '.join(stray)} appl{'ies' if len(stray) == 1 else 'y'} to FP16/INT8 variants: "
                             f"add {variant_flags()}")
        if not self.int4 and (stray := self.given(INT4_FLAGS)):
            raise InputError(f"{', '.join(stray)} tune{'s' if len(stray) == 1 else ''} INT4: add --int4")
        if not (self.int4 or self.int4_ov) and (stray := self.given(INT4_ANY_FLAGS)):
            raise InputError(f"{', '.join(stray)} tune{'s' if len(stray) == 1 else ''} INT4: add --int4 or --int4-ov")
        if not self.int4_ov and (stray := self.given(INT4_OV_FLAGS)):
            raise InputError(f"{', '.join(stray)} tunes NNCF's INT4 for OpenVINO: add --int4-ov")
        if not self.int8_nncf and (stray := self.given(INT8_NNCF_FLAGS)):
            raise InputError(f"{', '.join(stray)} tunes NNCF's INT8 for OpenVINO: add --int8-nncf")
        if not self.int8 and (stray := self.given(INT8_STATIC_FLAGS)):
            raise InputError(f"{', '.join(stray)} tunes static INT8 (ONNX Runtime's quantize_static): add --int8")
        if self.eval_text is None and "max_perplexity_increase" in self.model_fields_set:
            raise InputError("--max-perplexity-increase gates perplexity on held-out text: add --eval-text FILE|stdlib")
        if self.eval_text is not None:  # before the export, not after the variants are built
            check_text_source(self.eval_text, "--eval-text")
        if not self.trt and "dim_range" in self.model_fields_set:
            raise InputError("--dim-range sets a TensorRT profile: add --trt")
        if not self.trt and (stray := self.given(TRT_ONLY_FLAGS)):
            raise InputError(f"{', '.join(stray)} appl{'ies' if len(stray) == 1 else 'y'} to TensorRT engines: "
                             "add --trt")
        if self.train_data is None and (given := self.given(TRAIN_FLAGS)):
            raise InputError(f"{', '.join(given)} tune training: add --recover distill or --distill-into with "
                             "--train-data")
        if self.recover is not None and self.sparsity is None and self.prune_channels is None:
            raise InputError(RECOVER_NEEDS_VARIANT)
        wants = [f for f, v in (("--recover distill", self.recover), ("--distill-into", self.distill_into))
                 if v is not None]
        if wants and self.train_data is None:
            raise InputError(f"{' and '.join(wants)} needs --train-data DATA (an image folder or .npz keyed by input "
                             "name; labels optional)")
        if self.train_data is not None and not wants:
            raise InputError("--train-data trains something: add --recover distill (with --sparsity/--prune-channels) "
                             "or --distill-into STUDENT")
        return self

    # -- the one mapping -------------------------------------------------------------------------------------
    def to_config(self) -> ConvertConfig:
        """The ConvertConfig these flags ask for (its own validators then check how the sections combine)."""
        export = ExportConfig(model=self.model, weights=self.weights, task=self.task, input_shape=self.input_shape,
                              sample_inputs=self.sample_inputs, opset=self.opset, exporter=self.exporter,
                              dynamic_batch=self.dynamic_batch, optimize=self.optimize, seed=self.seed)
        budget = Budget(max_accuracy_drop=self.max_accuracy_drop, min_cosine=self.min_cosine)
        quant = None
        if self.asks_quant:
            calib = CalibConfig(data=self.calib, size=self.calib_size, batch=self.calib_batch,
                                methods=self.calib_method, resize=self.size, mean=self.mean, std=self.std,
                                seed=self.seed)
            gate = GateConfig(**budget.model_dump(), auto=self.auto, eval_data=self.eval_data,
                              eval_size=self.eval_size,
                              generation=GenerationGate(min_token_agreement=self.min_token_agreement,
                                                        text=self.eval_text,
                                                        max_perplexity_increase=self.max_perplexity_increase).model_copy(
                                  update={"min_cosine": self.min_cosine} if "min_cosine" in self.model_fields_set
                                  else {}))
            quant = QuantConfig(**self.quant_variants, calib=calib, gate=gate, activation_type=self.activation_type,
                                weight_type=self.weight_type, per_channel=self.per_channel,
                                reduce_range=self.reduce_range,
                                exclude_nodes=self.exclude_nodes, exclude_op_types=self.exclude_op_types,
                                int8_ops=self.int8_ops[0], extra_int8_ops=self.int8_ops[1:], extra_layouts=self.int8_layouts,
                                nncf_model_type=self.nncf_model_type,
                                int4_options=Int4Config(algorithm=self.int4_algorithm, block_size=self.int4_block_size,
                                                        symmetric=self.int4_symmetric, ratio=self.int4_ratio,
                                                        accuracy_level=self.int4_accuracy_level))
        engine = None
        if self.trt:
            engine = EngineConfig(fp16=self.fp16, int8=self.int8, source=self.trt_from, tf32=self.tf32,
                                  min_batch=self.min_batch, opt_batch=self.opt_batch, max_batch=self.max_batch,
                                  workspace_mb=self.workspace, builder_opt_level=self.builder_opt_level,
                                  timing_cache=self.timing_cache, dim_ranges=self.dim_range)
        train = None
        if self.train_data is not None:
            train = TrainConfig(data=self.train_data, epochs=self.epochs, lr=self.lr, temperature=self.temperature,
                                label_weight=self.label_weight, patience=self.patience, max_seconds=self.train_time,
                                device=self.train_device, seed=self.seed)
        sparsity = SparsityConfig(pattern=self.sparsity, prune_channels=self.prune_channels,
                                  eval_data=self.eval_data, budget=budget,
                                  recover=train if self.recover is not None else None)
        distill = DistillConfig(student=self.distill_into, train=train) \
            if self.distill_into is not None and train is not None else None
        return ConvertConfig(export=export, out=self.out, quant=quant, engine=engine, sparsity=sparsity,
                             distill=distill)



def from_flags(**given: Any) -> ConvertConfig:
    """The ConvertConfig of ``convert``'s flags (only those given: a flag's rule may depend on it being given)."""
    return ConvertFlags(**given).to_config()
