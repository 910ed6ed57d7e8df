"""``convert``'s flags as one pydantic model, and the one mapping from them to a :class:`ConvertConfig`.

``cli.py convert`` and ``sweep`` (a plan's conversion sets) both build a :class:`ConvertFlags` and call
:meth:`ConvertFlags.to_config`. The model holds the rules about flags: a value parsed from its text (one clear
line naming the flag), and a flag given without the one it needs (it would do nothing). Which flags were given is
the model's ``model_fields_set``: pass only those. The rules that combine sections of the config are
``ConvertConfig``'s own validators (``convert/config.py``), shared with the Python API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    Int8Layout,
    QType,
    QuantConfig,
    SparsityConfig,
    SparsityPattern,
    TrainConfig,
    TrainDevice,
    variant_flags,
)
from convert.export import Exporter
from core.errors import InputError

InputShape = tuple[int, ...] | dict[str, tuple[int, ...]]

#: Flags that tune the FP16/INT8 variants: without one of them asked for they act on nothing.
#: (--eval-data is not one of them: the sparse/pruned variants are measured on it too.)
QUANT_ONLY_FLAGS = ("calib", "calib_size", "calib_method", "calib_batch", "size", "mean", "std", "activation_type",
                    "weight_type", "per_channel", "reduce_range", "exclude_nodes", "exclude_op_types", "auto",
                    "eval_size", "int8_layouts")

#: Flags that tune training: without --train-data they act on nothing.
TRAIN_FLAGS = ("epochs", "lr", "temperature", "label_weight", "patience", "train_time", "train_device")


def flag_name(field: str) -> str:
    """``calib_method`` -> ``--calib-method``."""
    return "--" + field.replace("_", "-")


def csv_items(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise InputError(f"{what} is empty")
    return items


def _choice(value: Any, flag: str, choices: tuple[str, ...]) -> Any:
    if isinstance(value, str) and value not in choices:
        raise InputError(f"unknown {flag} {value!r}; choose {' or '.join(choices)}")
    return value


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

    # -- values parsed from their text, in the order the flags are listed -------------------------------------
    @field_validator("input_shape", mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        from core.shapes import parse_input_shapes

        if not isinstance(value, str):
            return value
        shapes = parse_input_shapes(value)
        return shapes[None] if None in shapes else {str(k): v for k, v in shapes.items()}

    @field_validator("exporter", mode="before")
    @classmethod
    def _exporter(cls, value: Any) -> Any:
        return _choice(value, "--exporter", ("torchscript", "dynamo"))

    @field_validator("sparsity", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> Any:
        from convert.sparsity import parse_sparsity_pattern

        return parse_sparsity_pattern(value) if isinstance(value, str) else value

    @field_validator("prune_channels", mode="before")
    @classmethod
    def _ratio(cls, value: Any) -> Any:
        from convert.sparsity import parse_prune_ratio

        return parse_prune_ratio(value) if isinstance(value, str) else value

    @field_validator("calib_method", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        from convert.quantize import parse_methods

        return parse_methods(value) if isinstance(value, str) else value

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _floats(cls, value: Any, info: Any) -> Any:
        from convert.quantize import parse_floats

        return parse_floats(value, flag_name(info.field_name)) if isinstance(value, str) else value

    @field_validator("activation_type", "weight_type", mode="before")
    @classmethod
    def _qtype(cls, value: Any, info: Any) -> Any:
        from convert.quantize import parse_qtype

        return parse_qtype(value, flag_name(info.field_name)) if isinstance(value, str) else value

    @field_validator("int8_layouts", mode="before")
    @classmethod
    def _layouts(cls, value: Any) -> Any:
        return [Int8Layout.parse(t) for t in csv_items(value, "--int8-layouts")] if isinstance(value, str) else value

    @field_validator("exclude_nodes", "exclude_op_types", mode="before")
    @classmethod
    def _names(cls, value: Any, info: Any) -> Any:
        return csv_items(value, flag_name(info.field_name)) if isinstance(value, str) else value

    @field_validator("dim_range", mode="before")
    @classmethod
    def _dim_ranges(cls, value: Any) -> Any:
        from convert.trt_profile import parse_dim_ranges

        return parse_dim_ranges(value) if isinstance(value, str) else value

    @field_validator("recover", mode="before")
    @classmethod
    def _recover(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() != "distill":
            raise InputError(f"unsupported --recover {value!r}: only 'distill' (fine-tuning with the FP32 model as "
                             "teacher) is supported")
        return "distill" if isinstance(value, str) else value

    @field_validator("train_device", mode="before")
    @classmethod
    def _train_device(cls, value: Any) -> Any:
        return _choice(value, "--train-device", ("cpu", "cuda"))

    # -- flags given without the flag they need ----------------------------------------------------------------
    def given(self, names: tuple[str, ...]) -> list[str]:
        """The spelling of each of ``names`` given explicitly (not left at its default), in that order."""
        return [flag_name(n) for n in names if n in self.model_fields_set]

    @property
    def asks_quant(self) -> bool:
        return self.fp16 or self.int8 or self.int8_dynamic

    @model_validator(mode="after")
    def _flags_need_their_variant(self) -> ConvertFlags:
        if not self.asks_quant and (stray := self.given(QUANT_ONLY_FLAGS)):
            raise InputError(f"{', '.join(stray)} appl{'ies' if len(stray) == 1 else 'y'} to FP16/INT8 variants: "
                             f"add {variant_flags()}")
        if not self.trt and "dim_range" in self.model_fields_set:
            raise InputError("--dim-range sets a TensorRT profile: add --trt")
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
                              eval_size=self.eval_size)
            quant = QuantConfig(fp16=self.fp16, int8_static=self.int8, int8_dynamic=self.int8_dynamic, calib=calib,
                                gate=gate, activation_type=self.activation_type, weight_type=self.weight_type,
                                per_channel=self.per_channel, reduce_range=self.reduce_range,
                                exclude_nodes=self.exclude_nodes, exclude_op_types=self.exclude_op_types,
                                extra_layouts=self.int8_layouts)
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
