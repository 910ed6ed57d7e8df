"""Triton's ``config.pbtxt`` for one artifact, built and checked as Triton's own ``inference.ModelConfig``
protobuf message (the schema tritonclient ships): inputs and outputs with their dtypes and -1 for every dynamic
dim, batching, instance groups, and warm-up requests (``model_warmup``) at given shapes."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import BackendUnavailableError, InputError, ValidationError
from core.iospec import IOSpec, TensorSpec
from core.manifest import Artifact
from serving.protocol import datatype_of

VERSION_DIR = "1"


#: manifest artifact kind -> (Triton platform, model file name Triton looks for)
PLATFORMS: dict[str, tuple[str, str]] = {"onnx": ("onnxruntime_onnx", "model.onnx"),
                                         "plan": ("tensorrt_plan", "model.plan")}


#: Triton backends picked by name (``backend:``) rather than platform -> the model file it is given
BACKEND_FILES: dict[str, str] = {"openvino": "model.onnx"}

#: config.pbtxt ``parameters`` each backend reads (onnxruntime: its ModelState; openvino: ParseParameters), with a
#: check of the value; a key outside these would be ignored by Triton, so the config is refused instead.
_COUNT = r"\d+"
BACKEND_PARAMETERS: dict[str, dict[str, str]] = {
    "onnxruntime_onnx": {"intra_op_thread_count": _COUNT, "inter_op_thread_count": _COUNT, "execution_mode": "[01]",
                         "enable_mem_arena": "[01]|true|false", "enable_mem_pattern": "[01]|true|false",
                         "share_session_between_instances": "true|false|[01]"},
    "openvino": {"INFERENCE_NUM_THREADS": _COUNT, "COMPILATION_NUM_THREADS": _COUNT, "NUM_STREAMS": r"AUTO|NUMA|\d+",
                 "PERFORMANCE_HINT": "LATENCY|THROUGHPUT|CUMULATIVE_THROUGHPUT", "HINT_BF16": "YES"},
    "tensorrt_plan": {},
}

#: Triton's config.pbtxt stores these counts as int32 (max_queue_delay_microseconds as uint64).
INT32_MAX = 2**31 - 1


class ModelOptions(BaseModel):
    """How Triton should batch and place one model (shared by `package` and the server's /config)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=0, le=INT32_MAX, description="Triton max_batch_size; default 8 for a "
                                                                       "dynamic-batch model, 0 for a fixed batch")
    dynamic_batching: bool | None = Field(default=None, description="Enable Triton's dynamic batcher "
                                                                    "(default: on when max_batch_size > 0)")
    max_queue_delay_us: int = Field(default=100, ge=0, le=2**64 - 1, description="Dynamic batcher max queue delay (µs)")
    instances: int = Field(default=1, ge=1, le=INT32_MAX, description="Model instances per device (instance_group count)")
    kind: Literal["cpu", "gpu"] | None = Field(default=None, description="Instance kind; default cpu for ONNX, "
                                                                         "gpu for TensorRT plans")


_SCHEMA: list[Any] = []


def _load_alone() -> Any:
    """``tritonclient/grpc/model_config_pb2.py`` as a module of its own (see ``schema``)."""
    spec = importlib.util.find_spec("tritonclient")
    roots = list(spec.submodule_search_locations or []) if spec else []
    path = Path(roots[0]) / "grpc" / "model_config_pb2.py" if roots else None
    if path is None or not path.is_file():
        raise ImportError("tritonclient/grpc/model_config_pb2.py not found")
    mod_spec = importlib.util.spec_from_file_location("_onnxkit_triton_model_config_pb2", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def schema() -> Any:
    """Triton's model-configuration protobuf module, as shipped in tritonclient (grpc extra).

    The module file is loaded on its own, without ``tritonclient.grpc``'s ``__init__``: that also registers
    Triton's gRPC service protos, whose ``inference.*`` messages clash with the copies the ``kserve`` package
    registers, so `package --format kserve` could not use both in one process. Loaded either way the message
    classes are the same (protobuf keeps one descriptor per proto file)."""
    if loaded := sys.modules.get("tritonclient.grpc.model_config_pb2"):
        return loaded
    if _SCHEMA:
        return _SCHEMA[0]
    try:
        module = _load_alone()
    except (ImportError, RuntimeError) as exc:
        raise BackendUnavailableError("Triton's model-config schema needs tritonclient with gRPC support "
                                      f"(pip install 'tritonclient[http,grpc]'): {exc}") from None
    _SCHEMA.append(module)
    return module


def triton_dims(t: TensorSpec, batched: bool) -> list[int]:
    """Triton dims: symbolic ones become -1; with ``batched`` the batch dim is left to max_batch_size."""
    shape = t.shape[1:] if batched else t.shape
    return [d if isinstance(d, int) else -1 for d in shape]


def _resolve_batching(spec: IOSpec, cfg: ModelOptions) -> tuple[int, bool]:
    """(max_batch_size, dynamic batching) from the options and whether the model has a batch dim."""
    if not spec.dynamic_batch or not all(o.has_dynamic_batch for o in spec.outputs):
        if cfg.max_batch_size:
            raise InputError(f"this model has a fixed batch of {spec.fixed_batch()}; Triton needs --max-batch-size 0 "
                             "for it (export again without --no-dynamic-batch to batch)")
        if cfg.dynamic_batching:
            raise InputError("dynamic batching needs a model with a dynamic batch dimension")
        return 0, False
    mbs = 8 if cfg.max_batch_size is None else cfg.max_batch_size
    if cfg.dynamic_batching and mbs == 0:
        raise InputError("--dynamic-batching needs --max-batch-size >= 1")
    return mbs, (mbs > 0 if cfg.dynamic_batching is None else cfg.dynamic_batching)


def _plan_batch(artifact: Artifact, mbs: int, explicit: bool) -> int:
    """max_batch_size within the engine's optimization profile (Triton sends any batch from 1 up to it)."""
    from runtimes.trt import batch_range

    lo, hi = batch_range(artifact)
    if lo > 1:
        raise InputError(f"engine {artifact.name!r} accepts batches {lo}..{hi}, but Triton sends batches from 1: "
                         "rebuild it with --min-batch 1")
    if explicit and mbs > hi:
        raise InputError(f"--max-batch-size {mbs} exceeds engine {artifact.name!r}'s profile maximum of {hi}")
    return min(mbs, hi)


def build_model_config(name: str, spec: IOSpec, artifact: Artifact, cfg: ModelOptions) -> Any:
    """The ``inference.ModelConfig`` message for one artifact."""
    mc = schema()
    platform, _ = PLATFORMS[artifact.kind]
    kind = cfg.kind or ("gpu" if artifact.kind == "plan" else "cpu")
    if artifact.kind == "plan" and kind != "gpu":
        raise InputError(f"{artifact.name!r} is a TensorRT plan: it runs on GPU instances only (use --kind gpu)")
    if not spec.outputs:
        raise InputError("the manifest's IOSpec lists no outputs; convert the model again")
    mbs, dynamic = _resolve_batching(spec, cfg)
    if artifact.kind == "plan" and mbs > 0:
        mbs = _plan_batch(artifact, mbs, explicit=cfg.max_batch_size is not None)
    msg = mc.ModelConfig(name=name, platform=platform, max_batch_size=mbs)
    for field, tensors in ((msg.input, spec.inputs), (msg.output, spec.outputs)):
        for t in tensors:
            field.add(name=t.name, data_type=mc.DataType.Value(f"TYPE_{datatype_of(t.dtype)}"),
                      dims=triton_dims(t, mbs > 0))
    if dynamic:
        msg.dynamic_batching.SetInParent()
        msg.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    group = mc.ModelInstanceGroup.Kind.Value(f"KIND_{kind.upper()}")
    msg.instance_group.add(count=cfg.instances, kind=group)
    return msg


def add_warmup(msg: Any, spec: IOSpec, batch: int | None) -> None:
    """Triton's ``model_warmup``: one request at ``spec``'s bound dims, run before the model is reported ready.
    Integer inputs are zeros (token id 0 and an all-zero mask are valid for any vocabulary, random ids may not
    be), float inputs random."""
    mc = schema()
    if unbound := spec.unbound_dims():
        raise InputError(f"--input-shape leaves the dim(s) {', '.join(unbound)} without a value")
    rows = batch or spec.fixed_batch() or 1
    if msg.max_batch_size and rows > msg.max_batch_size:
        raise InputError(f"--input-shape has a batch of {rows}, above max_batch_size {msg.max_batch_size}")
    shapes = spec.input_shapes(rows)
    entry = msg.model_warmup.add(name="input_shape " + ",".join(f"{n}:{'x'.join(map(str, v))}"
                                                                  for n, v in shapes.items()),
                                 batch_size=rows if msg.max_batch_size else 1, count=1)
    for t in spec.inputs:
        item = entry.inputs[t.name]
        item.data_type = mc.DataType.Value(f"TYPE_{datatype_of(t.dtype)}")
        item.dims.extend(shapes[t.name][1:] if msg.max_batch_size else shapes[t.name])
        if np.dtype(t.dtype).kind in "iub":
            item.zero_data = True
        else:
            item.random_data = True


def render_config(msg: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(msg)


def parse_config(path: Path) -> Any:
    """Parse ``config.pbtxt`` with Triton's schema; a syntax or schema error is a ValidationError."""
    from google.protobuf import text_format

    mc = schema()
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ValidationError(f"{path}", [f"not a valid Triton model configuration: {exc}"]) from None


def check_config(msg: Any, model_dir: Path) -> list[str]:
    """What Triton would refuse in a parsed config that the schema alone accepts (empty = fine)."""
    mc = schema()
    problems: list[str] = []
    where = model_dir.name
    if msg.name != model_dir.name:
        problems.append(f"{where}: config name {msg.name!r} differs from its folder name")
    problems += _check_runtime(msg, model_dir)
    if msg.max_batch_size < 0:
        problems.append(f"{where}: max_batch_size must be >= 0")
    if msg.HasField("dynamic_batching") and msg.max_batch_size == 0:
        problems.append(f"{where}: dynamic_batching needs max_batch_size > 0")
    for t in [*msg.input, *msg.output]:
        if t.data_type == mc.TYPE_INVALID:
            problems.append(f"{where}: tensor {t.name!r} has no data_type")
        if any(d == 0 or d < -1 for d in t.dims) or (not t.dims and msg.max_batch_size == 0):
            problems.append(f"{where}: tensor {t.name!r} has invalid dims {list(t.dims)}")
    ranks = {t.name: len(t.dims) for t in msg.input}
    for w in msg.model_warmup:
        if set(w.inputs) != set(ranks) or any(len(v.dims) != ranks[n] or min(v.dims, default=1) < 1
                                              for n, v in w.inputs.items() if n in ranks):
            problems.append(f"{where}: warm-up {w.name!r} does not give every input a concrete shape of its rank")
        if not 1 <= w.batch_size <= max(msg.max_batch_size, 1):
            problems.append(f"{where}: warm-up {w.name!r} has batch_size {w.batch_size} (1..{max(msg.max_batch_size, 1)})")
    if not msg.input or not msg.output:
        problems.append(f"{where}: inputs and outputs must both be listed")
    if msg.platform == "tensorrt_plan" and any(g.kind != mc.ModelInstanceGroup.KIND_GPU for g in msg.instance_group):
        problems.append(f"{where}: TensorRT plans need KIND_GPU instance groups")
    return problems


def _check_runtime(msg: Any, model_dir: Path) -> list[str]:
    """The platform or backend, its model file and its parameters."""
    where = model_dir.name
    files = dict(PLATFORMS.values()) | BACKEND_FILES
    runtime = msg.platform or msg.backend
    if runtime not in files or (msg.platform and msg.backend) or (msg.backend and msg.backend not in BACKEND_FILES):
        return [f"{where}: platform {msg.platform!r} / backend {msg.backend!r} is not one of {sorted(files)}"]
    problems = []
    filename = msg.default_model_filename or (files[runtime] if msg.platform else "")
    if filename != files[runtime]:
        problems.append(f"{where}: backend {runtime} needs default_model_filename {files[runtime]!r}")
    elif not (model_dir / VERSION_DIR / filename).is_file():
        problems.append(f"{where}: {VERSION_DIR}/{filename} is missing for {runtime}")
    allowed = BACKEND_PARAMETERS[runtime]
    for key, value in msg.parameters.items():
        if key not in allowed:
            problems.append(f"{where}: parameter {key!r} is not one the {runtime} backend reads ({sorted(allowed)})")
        elif not re.fullmatch(allowed[key], value.string_value):
            problems.append(f"{where}: parameter {key} = {value.string_value!r} (expected {allowed[key]})")
    return problems
