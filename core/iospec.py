"""IOSpec: input/output names, shapes with named symbolic dims, dtypes — declared once.

Every symbolic dimension keeps its name (``batch``, ``sequence``, ``height``, ...) and a name shared by
several inputs is one dim. ``dims`` binds the non-batch dims to a value for a run and ``ranges`` gives a
min/opt/max where a range is needed (TensorRT profiles, parity at two values). The batch is the dim
named ``batch``: the leading symbolic dim of the first input, renamed so wherever it appears.

It drives the export's dynamic axes, dummy and random inputs, parity checks, input checks, TensorRT
optimization profiles and the Triton configuration. Nothing else guesses shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError

BATCH = "batch"
_DTYPES = {"float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"}
Fill = Literal["random", "ones", "zeros"]


def is_derived(dim: str) -> bool:
    """A dim that is the sum of others, e.g. a KV-cache model's 'past_sequence + sequence' (Optimum's axes): its
    value follows from its parts, it is never bound or varied by itself."""
    return "+" in dim


def derived_parts(dim: str) -> list[str]:
    return [p.strip() for p in dim.split("+")]


class TensorSpec(BaseModel):
    """One tensor: a name, a shape whose entries are ints or symbolic names, and a dtype."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tensor name as it appears in the ONNX graph")
    shape: list[int | str] = Field(description="Dimensions; strings are symbolic (e.g. 'batch', 'sequence')")
    dtype: str = Field(default="float32", description="NumPy dtype name")
    int_range: tuple[int, int] | None = Field(
        default=None, description="Integer inputs: random values are drawn from [low, high), e.g. token ids "
                                  "inside the vocabulary (read from the embedding table the ids index)")
    fill: Fill = Field(default="random", description="How random feeds fill it: 'ones' for attention masks, "
                                                     "'zeros' for token type ids")

    @property
    def symbolic_dims(self) -> list[str]:
        """The free symbolic dims (a derived dim such as 'past_sequence + sequence' is not free)."""
        return [d for d in self.shape if isinstance(d, str) and not is_derived(d)]

    def concrete_shape(self, batch: int, dims: Mapping[str, int] | None = None) -> tuple[int, ...]:
        """The shape with ``batch`` and the bound dims filled in; an unbound one is one clear InputError."""
        out: list[int] = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif d == BATCH:
                out.append(batch)
            elif is_derived(d) and all(p == BATCH or p in (dims or {}) for p in derived_parts(d)):
                bound = dict(dims or {})
                out.append(sum(batch if p == BATCH else int(bound[p]) for p in derived_parts(d)))
            elif dims is not None and d in dims:
                out.append(int(dims[d]))
            else:
                example = "x".join(str(batch) if s == BATCH else (s.upper() if isinstance(s, str) else str(s))
                                   for s in self.shape)
                raise InputError(f"tensor {self.name!r} has an unbound symbolic dim {d!r}: give it a value with "
                                 f"--input-shape {self.name}:{example}")
        return tuple(out)

    @property
    def has_dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] == BATCH

    def random(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Seeded values that follow the tensor's meaning: floats normal, ids in range, masks ones."""
        if self.fill != "random":
            return np.full(shape, 1 if self.fill == "ones" else 0, dtype=self.dtype)
        if self.dtype.startswith("float") or self.dtype == "bfloat16":
            return rng.standard_normal(shape).astype(np.float32 if self.dtype == "bfloat16" else self.dtype)
        if self.dtype == "bool":
            return rng.integers(0, 2, size=shape).astype(bool)
        low, high = self.int_range or (0, 100)
        return rng.integers(low, high, size=shape).astype(self.dtype)


class DimRange(BaseModel):
    """The values a symbolic dim takes: the smallest, the one to tune for, the largest."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)


class IOSpec(BaseModel):
    """The model's inputs and outputs, and the values of their symbolic dims."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = Field(default_factory=list)
    dims: dict[str, int] = Field(default_factory=dict, description="Symbolic dim (not the batch) -> its value "
                                                                   "for runs: random feeds, parity, profiles")
    ranges: dict[str, DimRange] = Field(default_factory=dict, description="Symbolic dim -> min/opt/max where a "
                                                                          "range is needed (TensorRT profiles)")
    parity_values: dict[str, int] = Field(
        default_factory=dict, description="Symbolic dim (not the batch) -> the second value parity checks run it at: "
                                          "a value the source model accepts (declared by the loader, e.g. from "
                                          "Optimum's dummy inputs or --sample-inputs, or found by running the source; "
                                          "see convert.validate.parity_spec). Equal to the dim's binding: the dim is "
                                          "not varied (the source runs at no other value tried)")
    parity_notes: dict[str, str] = Field(
        default_factory=dict, description="Symbolic dim -> why parity checks do not vary it, e.g. 'channels not "
                                          "varied: the source does not run at channels=4, 6 or 2'")

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

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise InputError(f"unknown input {name!r}; the model's inputs: {', '.join(self.input_names)}")

    @property
    def dynamic_batch(self) -> bool:
        return all(t.has_dynamic_batch for t in self.inputs)

    def symbolic_dims(self) -> list[str]:
        """Every symbolic dim of the inputs, each once, the batch first."""
        names = list(dict.fromkeys(d for t in self.inputs for d in t.symbolic_dims))
        return sorted(names, key=lambda d: d != BATCH)

    def unbound_dims(self) -> list[str]:
        return [d for d in self.symbolic_dims() if d != BATCH and d not in self.dims]

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

    def bound(self, dims: Mapping[str, int] | None = None) -> dict[str, int]:
        """The dim values for a run: the spec's bindings, overridden by ``dims``."""
        return {**self.dims, **(dims or {})}

    def with_dims(self, dims: Mapping[str, int]) -> IOSpec:
        """A copy with ``dims`` bound (each must be a symbolic dim of an input, other than the batch)."""
        known = set(self.symbolic_dims()) - {BATCH}
        unknown = sorted(set(dims) - known)
        if unknown:
            raise InputError(f"unknown dim(s) {unknown}: the model's symbolic dims are "
                             f"{', '.join(sorted(known)) or 'none (besides the batch)'}")
        bad = {d: v for d, v in dims.items() if v < 1}
        if bad:
            raise InputError(f"dim values must be >= 1, got {bad}")
        return self.model_copy(update={"dims": self.bound(dims)})

    def input_shapes(self, batch: int, dims: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        bound = self.bound(dims)
        return {t.name: t.concrete_shape(batch, bound) for t in self.inputs}

    def random_feed(self, batch: int, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """Seeded inputs for every input tensor (see :meth:`TensorSpec.random`)."""
        self.check_batch(batch)
        rng = np.random.default_rng(seed)
        shapes = self.input_shapes(batch, dims)
        return {t.name: np.ascontiguousarray(t.random(rng, shapes[t.name])) for t in self.inputs}

    def dim_range(self, dim: str, batch: tuple[int, int, int] | None = None) -> DimRange:
        """min/opt/max of ``dim``: ``ranges`` first, else the batch range given, else its binding throughout."""
        if dim in self.ranges:
            return self.ranges[dim]
        if dim == BATCH and batch is not None:
            return DimRange(min=batch[0], opt=batch[1], max=batch[2])
        if dim in self.dims:
            v = self.dims[dim]
            return DimRange(min=v, opt=v, max=v)
        raise InputError(f"symbolic dim {dim!r} has no value: bind it with --input-shape (see `convert --help`)")

    def parity_dims(self) -> list[dict[str, int]]:
        """Dim values for parity checks: the bindings, then every dynamic dim at a second value, so that a graph that
        baked one value in is caught. The second value is the declared ``parity_values`` one (equal to the binding:
        not varied), else the range's other bound, else binding + 1 (see :meth:`parity_candidates`)."""
        base = dict(self.dims)
        second = {d: self.parity_values[d] if d in self.parity_values else self.parity_candidates(d)[0] for d in base}
        return [base, second] if second != base else [base]

    def parity_candidates(self, dim: str) -> list[int]:
        """Second values to try for a bound ``dim`` that declares none, most telling first: the range's other bound,
        binding + 1, twice the binding (a stride-32 detector bound at 320 runs at 640, not 321), binding - 1 (a
        sequence bound at its longest)."""
        v = self.dims[dim]
        out = [self.ranges[dim].max if self.ranges[dim].max != v else self.ranges[dim].min] if dim in self.ranges else []
        return [c for c in dict.fromkeys([*out, v + 1, 2 * v, v - 1]) if c >= 1 and c != v]

    def with_sample_ranges(self, samples: Mapping[str, np.ndarray] | None) -> IOSpec:
        """A copy in which every integer input filled at random whose range is unknown is drawn from the span of the
        ``samples`` values ([min, max + 1)): values the model is known to accept (indices into an axis whose size no
        static shape gives). The spec itself when there is nothing to fill."""
        if not samples:
            return self
        inputs: list[TensorSpec] = []
        for t in self.inputs:
            arr = np.asarray(samples[t.name]) if t.name in samples else None
            if t.int_range is None and t.fill == "random" and np.dtype(t.dtype).kind in "iu" and arr is not None \
                    and arr.size and arr.dtype.kind in "iu":
                t = t.model_copy(update={"int_range": (int(arr.min()), int(arr.max()) + 1)})
            inputs.append(t)
        return self if inputs == self.inputs else self.model_copy(update={"inputs": inputs})

    def check_batch(self, batch: int) -> None:
        fixed = self.fixed_batch()
        if batch < 1:
            raise InputError(f"batch size must be >= 1, got {batch}")
        if fixed is not None and batch != fixed:
            raise InputError(f"this model was exported with a fixed batch of {fixed}; batch {batch} is not possible "
                             "(export again without --no-dynamic-batch)")

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        """Raise one InputError listing every name/shape/dtype mismatch of ``feed`` (a dim shared by several
        inputs must have one value in all of them)."""
        problems: list[str] = []
        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing:
            problems.append(f"missing inputs {missing}")
        if extra:
            problems.append(f"unexpected inputs {extra} (expected {self.input_names})")
        seen: dict[str, tuple[int, str]] = {}
        for t in self.inputs:
            if t.name not in feed:
                continue
            problems += _feed_problems(t, np.asarray(feed[t.name]), seen)
        if problems:
            raise InputError("input does not match the model's IOSpec: " + "; ".join(problems))


def _feed_problems(t: TensorSpec, arr: np.ndarray, seen: dict[str, tuple[int, str]]) -> list[str]:
    if len(arr.shape) != len(t.shape):
        return [f"{t.name}: rank {len(arr.shape)} != {len(t.shape)} (expected {t.shape})"]
    problems: list[str] = []
    for got, want in zip(arr.shape, t.shape, strict=True):
        if isinstance(want, int) and got != want:
            problems.append(f"{t.name}: shape {list(arr.shape)} does not match {t.shape}")
            break
        if isinstance(want, str):
            if want in seen and seen[want][0] != got:
                problems.append(f"dim {want!r} is {seen[want][0]} in {seen[want][1]} but {got} in {t.name}")
            seen.setdefault(want, (int(got), t.name))
    want_kind, got_kind = np.dtype(t.dtype).kind, arr.dtype.kind
    if (want_kind in "iu") != (got_kind in "iu") or (want_kind == "b") != (got_kind == "b"):
        problems.append(f"{t.name}: dtype {arr.dtype} where the model takes {t.dtype}")
    return problems


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
    """Read an IOSpec from an ``onnx.ModelProto`` (graph inputs that are not initializers).

    The leading symbolic dim of the first input is the batch: its name becomes ``batch`` in every tensor
    that uses it. Other named dims keep their names (shared across tensors); an unnamed symbolic dim gets
    a name of its own (``<tensor>_dim<i>``). Integer inputs get the value range their consumer accepts
    (:func:`int_ranges`: the rows of the embedding table token ids index, a Gather's axis, a Reduce's rank).
    """
    from onnx import helper

    init_names = {i.name for i in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in init_names]
    rename: dict[str, str] = {}
    if graph_inputs and graph_inputs[0].type.tensor_type.shape.dim:
        first = graph_inputs[0].type.tensor_type.shape.dim[0]
        if not first.HasField("dim_value"):
            rename[first.dim_param or f"{graph_inputs[0].name}_dim0"] = BATCH
    ranges = int_ranges(model)

    def tensors(values: Any, is_input: bool) -> list[TensorSpec]:
        out: list[TensorSpec] = []
        for v in values:
            tt = v.type.tensor_type
            dims: list[int | str] = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                else:
                    name = d.dim_param or f"{v.name}_dim{i}"
                    dims.append(rename.get(name, name))
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
            out.append(TensorSpec(name=v.name, shape=dims, dtype=dtype,
                                  **(input_semantics(v.name, dtype, ranges) if is_input else {})))
        return out

    return IOSpec(inputs=tensors(graph_inputs, True), outputs=tensors(model.graph.output, False))


def input_semantics(name: str, dtype: str, ranges: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Random-feed hints from what an input is: integers inside the range their consumer accepts (``ranges``: input ->
    [low, high), see :func:`int_ranges`; without it, ids are small non-negative ints); masks are ones; token type
    ids zeros."""
    if np.dtype(dtype).kind not in "iu":
        return {}
    lowered = name.lower()
    if "mask" in lowered:
        return {"fill": "ones"}
    if "token_type" in lowered or "segment" in lowered:
        return {"fill": "zeros"}
    if ranges is None:
        return {"int_range": (0, 10)}
    if name in ranges:
        return {"int_range": ranges[name]}
    return {}


#: Ops that carry an integer input's values on unchanged (through their first input).
_PASS_THROUGH = ("Cast", "Unsqueeze", "Reshape", "Squeeze", "Identity", "Flatten")
#: Ops with an ``axes`` (or ``axis``) input, by its position: values in [-rank, rank) of the op's first input.
_AXES_INPUT = {**{f"Reduce{r}": 1 for r in ("Sum", "Mean", "Max", "Min", "Prod", "L1", "L2", "LogSum", "LogSumExp",
                                             "SumSquare")}, "CumSum": 1}


def int_ranges(model: Any) -> dict[str, tuple[int, int]]:
    """Graph input -> the [low, high) its values must lie in, read from what consumes it (possibly through
    Cast/Unsqueeze/Reshape/...): ``Gather``/``GatherElements`` indices stay inside the gathered axis (the rows of
    an embedding table for token ids), a Reduce*'s or CumSum's ``axes`` inside the data's rank. An input with several
    such consumers gets the intersection; one whose consumer's size is symbolic gets none."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    shapes, inferred = _static_shapes(model, inferred=False), False

    def shape_of(name: str) -> list[int | None] | None:  # an intermediate tensor: shape inference, once
        nonlocal shapes, inferred
        if name not in shapes and not inferred:
            shapes, inferred = _static_shapes(model, inferred=True), True
        return shapes.get(name)

    out: dict[str, tuple[int, int]] = {}
    for v in model.graph.input:
        found: list[tuple[int, int]] = []
        frontier, seen = [v.name], set()
        while frontier:
            t = frontier.pop()
            seen.add(t)
            for node in consumers.get(t, []):
                slot = [i for i, name in enumerate(node.input) if name == t]
                if 0 in slot and node.op_type in _PASS_THROUGH:
                    frontier += [o for o in node.output if o not in seen]
                    continue
                if node.op_type in ("Gather", "GatherElements") and 1 in slot:
                    data = shape_of(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    size = data[axis] if data is not None and -len(data) <= axis < len(data) else None
                    if isinstance(size, int) and size > 0:
                        found.append((0, size))
                elif _AXES_INPUT.get(node.op_type) in slot:
                    data = shape_of(node.input[0])
                    if data is not None and data:
                        found.append((-len(data), len(data)))
        if found:
            low, high = max(r[0] for r in found), min(r[1] for r in found)
            if low < high:
                out[v.name] = (low, high)
    return out


def _static_shapes(model: Any, inferred: bool) -> dict[str, list[int | None]]:
    """Tensor -> its dims (None where symbolic) for initializers and graph inputs, and with ``inferred`` every
    tensor ONNX shape inference can type (an error there: the other shapes only)."""
    shapes: dict[str, list[int | None]] = {i.name: [int(d) for d in i.dims] for i in model.graph.initializer}
    values = list(model.graph.input)
    if inferred:
        import onnx

        with contextlib.suppress(Exception):  # e.g. past protobuf's 2 GiB: the declared shapes only
            values += list(onnx.shape_inference.infer_shapes(model).graph.value_info)
    for v in values:
        tt = v.type.tensor_type
        if tt.HasField("shape") and v.name not in shapes:
            shapes[v.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def spec_from_examples(examples: Mapping[str, np.ndarray], axes: Mapping[str, Mapping[int, str]] | None,
                       output_names: list[str], *, dynamic_batch: bool) -> IOSpec:
    """An IOSpec from sample inputs: dtypes and shapes from the arrays, axis 0 the batch unless ``axes`` names
    it otherwise (fixed with ``dynamic_batch=False``), the dims ``axes`` names symbolic and bound to the samples' values; outputs by name, batch first (the
    rest of their shapes is read back from the export)."""
    dims: dict[str, tuple[int, str]] = {}
    inputs: list[TensorSpec] = []
    for name, arr in examples.items():
        shape: list[int | str] = list(np.shape(arr))
        named = {int(i): str(d) for i, d in (axes or {}).get(name, {}).items()}
        if shape and dynamic_batch:
            named.setdefault(0, BATCH)
        if not dynamic_batch:  # --no-dynamic-batch: the batch is fixed to the samples'
            named = {i: d for i, d in named.items() if d != BATCH}
        for i, d in named.items():
            if not 0 <= i < len(shape):
                raise InputError(f"dynamic axis {i} of {name!r} is outside its rank {len(shape)}")
            value = int(np.shape(arr)[i])
            if is_derived(d):  # its value follows from its parts
                shape[i] = d
                continue
            if d != BATCH and d in dims and dims[d][0] != value:
                raise InputError(f"dim {d!r} is bound to two values: {dims[d][0]} (in {dims[d][1]}) and {value} "
                                 f"(in {name})")
            if d != BATCH:
                dims.setdefault(d, (value, name))
            shape[i] = d
        inputs.append(TensorSpec(name=name, shape=shape, dtype=np.asarray(arr).dtype.name))
    outputs = [TensorSpec(name=n, shape=[BATCH] if dynamic_batch else []) for n in output_names]
    return IOSpec(inputs=inputs, outputs=outputs, dims={d: v for d, (v, _) in dims.items()})
