"""A sweep plan: models x conversions x variants x backends x devices x batch sizes, read from YAML.

Every field is described and unknown keys are refused (``extra="forbid"``), so a typo is one clear line
instead of a silently ignored option. The plan expands into cells (``sweep.cells``): one convert cell per
(model, conversion) and one bench cell per (convert cell, backend, variant, device, batch size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from convert.config import DEFAULT_OPSET, CalibMethod, ConvertConfig
from core.errors import InputError


class ModelEntry(BaseModel):
    """One model, as ``convert`` takes it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="torchvision name, path/to/file.py:factory, TorchScript .pt, .onnx, or hf:folder")
    name: str | None = Field(default=None, description="Label in the results (default: the model as given)")
    weights: str | None = Field(default=None, description="torchvision weights name or local state-dict file")
    input_shape: str | None = Field(default=None, description="As convert's --input-shape, e.g. 1x3x224x224")

    @property
    def label(self) -> str:
        return self.name or self.model


class Conversion(BaseModel):
    """The conversion options of one convert cell (convert's flags of the same names)."""

    model_config = ConfigDict(extra="forbid")

    fp16: bool = Field(default=False, description="Also write an FP16 variant (fp16)")
    int8: bool = Field(default=False, description="Also write a static INT8 variant (int8_static_<method>; needs calib)")
    int8_dynamic: bool = Field(default=False, description="Also write a dynamic INT8 variant (int8_dynamic)")
    int8_nncf: bool = Field(default=False, description="Also write OpenVINO's own INT8 IR (int8_nncf; needs calib)")
    int4: bool = Field(default=False, description="Also write an INT4 weight-only variant (int4)")
    int4_ov: bool = Field(default=False, description="Also write OpenVINO's own INT4 IR (int4_ov; KV-cache decoders)")
    # one bool per convert flag of a row of convert.variants.VARIANTS (tests/test_sweep.py checks they match)
    calib: str | None = Field(default=None, description="Calibration data: image folder, .npy/.npz, "
                                                        "imagenet_subset (built in) or synthetic")
    calib_size: int = Field(default=100, ge=1, description="Calibration samples (at most)")
    calib_methods: list[CalibMethod] = Field(default=["minmax"], min_length=1, description="One static variant each")
    eval_data: str | None = Field(default=None, description="Held-out data for the variants' accuracy gates")
    eval_size: int = Field(default=200, ge=1, description="Held-out samples (at most)")
    max_accuracy_drop: float = Field(default=1.0, ge=0, description="The variants' gate: top-1 points they may lose")
    min_cosine: float = Field(default=0.99, ge=-1, le=1, description="The variants' gate: smallest output cosine")
    opset: int = Field(default=DEFAULT_OPSET, ge=7, le=23, description="ONNX opset")
    exporter: Literal["torchscript", "dynamo"] = Field(default="torchscript", description="torch.onnx exporter")
    optimize: bool = Field(default=True, description="Write model.opt.onnx (the opt variant)")
    seed: int = Field(default=0, description="Seed for random init and test inputs")

    def to_config(self, entry: ModelEntry, out: Path) -> ConvertConfig:
        """The ConvertConfig ``convert`` builds from the same flags (``convert.flags``: one mapping, the same
        rules)."""
        from convert.flags import from_flags

        given = {("calib_method" if k == "calib_methods" else k): getattr(self, k) for k in self.model_fields_set}
        return from_flags(model=entry.model, weights=entry.weights, input_shape=entry.input_shape, out=out, **given)


class PlanConfig(BaseModel):
    """A sweep plan (YAML). See examples/sweep.yaml."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1, description="Models: a string (MODEL) or a mapping")
    conversions: dict[str, Conversion] = Field(
        default_factory=lambda: {"default": Conversion()}, min_length=1,
        description="Named conversion option sets; each model is converted once per set")
    variants: list[str] = Field(default=["opt"], min_length=1,
                                description="Artifacts to bench on ONNX backends, e.g. opt, int8_dynamic, "
                                            "int8_static_minmax (PyTorch backends run the model's weights)")
    backends: list[str] = Field(default=["ort"], min_length=1, description="Names from runtimes.RUNNERS")
    batch_sizes: list[int] = Field(default=[1], min_length=1, description="One bench cell each")
    devices: list[Literal["cpu", "cuda"]] = Field(default=["cpu"], min_length=1, description="cpu and/or cuda")
    threads: int = Field(default=1, ge=1, description="Intra-op threads of every bench (and convert) cell; on Ray "
                                                      "also each task's num_cpus, so measurements never share cores")
    warmup: int = Field(default=10, ge=0, description="Untimed warm-up runs per cell")
    iters: int = Field(default=100, ge=1, description="Timed runs per cell")
    rounds: int = Field(default=5, ge=1, description="Interleaved rounds the timed runs are split over")
    accuracy_samples: int = Field(default=32, ge=1, description="Inputs of each cell's accuracy check")
    data: str | None = Field(default=None, description="Image folder for the accuracy checks, or imagenet_subset "
                                                       "(built in); default: random inputs")

    @field_validator("models", mode="before")
    @classmethod
    def _strings_are_models(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value):
            raise ValueError(f"batch sizes must be >= 1, got {value}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _known(self) -> PlanConfig:
        from runtimes import unknown_backends

        if (why := unknown_backends(self.backends)) is not None:
            raise ValueError(why)
        labels = [m.label for m in self.models]
        if dupes := sorted({x for x in labels if labels.count(x) > 1}):
            raise ValueError(f"model(s) {dupes} listed twice: give each a distinct name")
        return self


def _where(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or "plan"


def parse_plan(data: Any, source: str = "plan") -> PlanConfig:
    """A plan from parsed YAML/JSON; anything wrong is one InputError naming the key."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with at least 'models', got {type(data).__name__}")
    try:
        return PlanConfig.model_validate(data)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        msg = str(err["msg"]).removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InputError(f"{source}: {_where(loc)}: {msg}{more}") from None


def load_plan(path: Path) -> PlanConfig:
    """Read PLAN.yaml (or .json: YAML is a superset) into a PlanConfig, or one clear InputError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"plan file {path} does not exist" if not path.exists() else f"plan {path} is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"plan {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"plan {path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return parse_plan(data, str(path))
