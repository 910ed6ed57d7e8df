"""IOSpec: input/output names, shapes with symbolic dims, dtypes — declared once.

It drives the export's dynamic axes, dummy and random inputs, input checks, TensorRT optimization
profiles and the Triton configuration.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError

BATCH = "batch"
_DTYPES = {"float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"}


class TensorSpec(BaseModel):
    """One tensor: a name, a shape whose entries are ints or symbolic names, and a dtype."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tensor name as it appears in the ONNX graph")
    shape: list[int | str] = Field(description="Dimensions; strings are symbolic (e.g. 'batch')")
    dtype: str = Field(default="float32", description="NumPy dtype name")

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        dims: list[int] = []
        for d in self.shape:
            if isinstance(d, int):
                dims.append(d)
            elif d == BATCH:
                dims.append(batch)
            else:
                raise InputError(f"tensor {self.name!r} has an unbound symbolic dim {d!r}")
        return tuple(dims)

    @property
    def has_dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] == BATCH


class IOSpec(BaseModel):
    """The model's inputs and outputs."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = Field(default_factory=list)

    @classmethod
    def for_image_model(
        cls, shape: tuple[int, ...], dynamic_batch: bool = True, input_name: str = "input",
        output_name: str = "logits",
    ) -> IOSpec:
        """A single-image-input model: NCHW input, one output whose other dims are filled after export."""
        dims: list[int | str] = list(shape)
        if dynamic_batch:
            dims[0] = BATCH
        # Only the batch dim is declared; the rest of the output shape is read back from the export.
        out: list[int | str] = [BATCH if dynamic_batch else shape[0]]
        return cls(inputs=[TensorSpec(name=input_name, shape=dims)],
                   outputs=[TensorSpec(name=output_name, shape=out)])

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_batch(self) -> bool:
        return all(t.has_dynamic_batch for t in self.inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The torch.onnx ``dynamic_axes`` mapping for every symbolic dim."""
        axes: dict[str, dict[int, str]] = {}
        for t in [*self.inputs, *self.outputs]:
            sym = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if sym:
                axes[t.name] = sym
        return axes

    def fixed_batch(self) -> int | None:
        """The batch size baked into a static-batch spec, or None when the batch is dynamic."""
        first = self.inputs[0].shape[0] if self.inputs[0].shape else None
        return first if isinstance(first, int) else None

    def random_feed(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded inputs for every input tensor: standard normal for floats, small ints otherwise."""
        self.check_batch(batch)
        rng = np.random.default_rng(seed)
        feed: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = t.concrete_shape(batch)
            if t.dtype.startswith("float") or t.dtype == "bfloat16":
                arr = rng.standard_normal(shape).astype(np.float32)
            elif t.dtype == "bool":
                arr = rng.integers(0, 2, size=shape).astype(bool)
            else:
                arr = rng.integers(0, 100, size=shape).astype(t.dtype)
            feed[t.name] = np.ascontiguousarray(arr)
        return feed

    def check_batch(self, batch: int) -> None:
        fixed = self.fixed_batch()
        if batch < 1:
            raise InputError(f"batch size must be >= 1, got {batch}")
        if fixed is not None and batch != fixed:
            raise InputError(f"this model was exported with a fixed batch of {fixed}; batch {batch} is not possible "
                             "(export again without --no-dynamic-batch)")

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        """Raise one InputError listing every name/shape/dtype mismatch of ``feed``."""
        problems: list[str] = []
        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing:
            problems.append(f"missing inputs {missing}")
        if extra:
            problems.append(f"unexpected inputs {extra} (expected {self.input_names})")
        for t in self.inputs:
            if t.name not in feed:
                continue
            arr = feed[t.name]
            if len(arr.shape) != len(t.shape):
                problems.append(f"{t.name}: rank {len(arr.shape)} != {len(t.shape)} (expected {t.shape})")
                continue
            for got, want in zip(arr.shape, t.shape, strict=True):
                if isinstance(want, int) and got != want:
                    problems.append(f"{t.name}: shape {list(arr.shape)} does not match {t.shape}")
                    break
        if problems:
            raise InputError("input does not match the model's IOSpec: " + "; ".join(problems))


_SHAPE_RE = re.compile(r"^\d+(x\d+)*$")


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``1x3x224x224`` into a tuple, or raise one clear InputError."""
    cleaned = text.strip().lower().replace(",", "x").replace("*", "x")
    if not _SHAPE_RE.match(cleaned):
        raise InputError(f"malformed --input-shape {text!r}: expected dimensions joined by 'x', e.g. 1x3x224x224")
    dims = tuple(int(p) for p in cleaned.split("x"))
    if any(d < 1 for d in dims):
        raise InputError(f"malformed --input-shape {text!r}: every dimension must be >= 1")
    return dims


def feed_digest(feed: dict[str, np.ndarray]) -> str:
    """A short sha256 over names, shapes, dtypes and bytes: proves two backends saw the same inputs."""
    h = hashlib.sha256()
    for name in sorted(feed):
        arr = np.ascontiguousarray(feed[name])
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(str(arr.dtype).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def onnx_opset(model: Any) -> int | None:
    """The default-domain opset an ``onnx.ModelProto`` imports (None when it imports none)."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def spec_from_onnx(model: Any) -> IOSpec:
    """Read an IOSpec from an ``onnx.ModelProto`` (graph inputs that are not initializers)."""
    from onnx import helper

    init_names = {i.name for i in model.graph.initializer}

    def tensors(values: Any) -> list[TensorSpec]:
        out: list[TensorSpec] = []
        for v in values:
            if v.name in init_names:
                continue
            tt = v.type.tensor_type
            dims: list[int | str] = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                else:
                    # The first symbolic dim is the batch by convention; others keep their names.
                    dims.append(BATCH if i == 0 else (d.dim_param or f"dim{i}"))
            np_dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            out.append(TensorSpec(name=v.name, shape=dims, dtype=np.dtype(np_dtype).name))
        return out

    return IOSpec(inputs=tensors(model.graph.input), outputs=tensors(model.graph.output))
