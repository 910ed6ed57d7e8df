"""What ``serve`` serves: its configuration, the loaded model (one ONNX variant through ``OrtRunner``) and
the Prometheus metrics it keeps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError
from core.iospec import IOSpec
from core.manifest import Artifact, Manifest
from core.shapes import apply_input_shapes
from serving.protocol import (
    InferRequest,
    RequestError,
    brief,
    datatype_of,
)
from serving.triton import default_variant, load_artifacts, model_base_name, resolve_variants, served_name
from serving.triton_config import PLATFORMS, ModelOptions, build_model_config, triton_dims

VERSION = "1"
#: Body limit where the inputs' size has no upper bound (a symbolic dim without a range).
DEFAULT_MAX_BODY = 64 * 2**20
#: The most bytes one value takes in a JSON tensor (``-1.2345678901234567e-05, ``), and room for the rest.
JSON_BYTES_PER_VALUE = 32
BODY_SLACK = 2**20


class ServeConfig(BaseModel):
    """A `serve` request."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: Path = Field(description="Folder with manifest.json (from `convert`)")
    variant: str | None = Field(default=None, description="Artifact to serve; default opt, else fp32")
    host: str = Field(default="127.0.0.1", description="Address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="Port (0: any free port)")
    grpc_port: int | None = Field(default=None, ge=0, le=65535, description="Also answer the KServe v2 / Triton "
                                  "gRPC protocol on this port (0: any free port; default: HTTP only)")
    max_batch: int = Field(default=8, ge=1, description="Most rows run together; 1 turns micro-batching off")
    max_delay_ms: float = Field(default=2.0, ge=0, le=1000, description="Longest a request waits for others to "
                                                                       "join its batch")
    threads: int | None = Field(default=None, ge=1, description="ONNX Runtime intra-op threads")
    ort_spinning: bool = Field(default=True, description="ONNX Runtime's intra-op threads spin while waiting for "
                                                         "work: lower latency on free cores, wasted CPU when other "
                                                         "processes share them")
    max_body_mb: float | None = Field(default=None, gt=0, description="Largest request body accepted (MiB); "
                                      "default: what a request of max_batch rows takes as JSON, from the "
                                      "model's input sizes (64 MiB where a dim has no upper bound)")
    input_shape: str | None = Field(default=None, description="Shapes of the start-up warm-up run, e.g. "
                                    "input_ids:8x128,attention_mask:8x128 (default: the ones convert bound, batch 1); "
                                    "requests may use any shape the model accepts, up to max_batch rows")
    log_level: str = Field(default="warning", description="uvicorn log level")
    read_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="Longest an HTTP request's headers and "
                                  "body may take to arrive in full, from its first byte; a slower one gets a 408 "
                                  "and its connection is closed")
    keep_alive_s: float = Field(default=30.0, gt=0, le=3600, description="Longest an HTTP connection stays open "
                                "idle (before its first request or after a response)")
    max_connections: int = Field(default=1024, ge=1, description="Most HTTP connections open at once; more are "
                                 "answered 503 and closed")


# -- metrics ---------------------------------------------------------------------------------------
class ServerMetrics:
    """Prometheus collectors in a registry of their own (several servers can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("onnxkit_inference_requests", "Inference requests, by model and HTTP status",
                                ["model", "code"], registry=self.registry)
        self.errors = Counter("onnxkit_inference_errors", "Inference requests answered with a 4xx/5xx",
                              ["model", "code"], registry=self.registry)
        self.latency = Histogram("onnxkit_inference_request_duration_seconds",
                                 "Time from request headers to response, per inference request", ["model"],
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10),
                                 registry=self.registry)
        self.in_flight = Gauge("onnxkit_inference_requests_in_flight", "Inference requests being handled",
                               registry=self.registry)
        self.disconnects = Counter("onnxkit_inference_disconnects", "Inference requests whose client went away "
                                   "before the body was read (not errors: no response could be sent)", ["model"],
                                   registry=self.registry)
        self.grpc_requests = Counter("onnxkit_grpc_inference_requests", "gRPC ModelInfer calls, by model and gRPC "
                                     "status (also counted in the latency and in-flight metrics)", ["model", "code"],
                                     registry=self.registry)
        self.batch_rows = Histogram("onnxkit_batch_rows", "Rows per model execution (micro-batching)", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- the model -------------------------------------------------------------------------------------
@dataclass
class ServedModel:
    """A loaded variant: its protocol metadata, request checks and the runner behind it."""

    name: str
    manifest: Manifest
    artifact: Artifact
    runner: Any
    options: ModelOptions

    @property
    def spec(self) -> IOSpec:
        return self.manifest.iospec

    def metadata(self) -> dict[str, Any]:
        def tensors(ts: list[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": datatype_of(t.dtype), "shape": triton_dims(t, batched=False)}
                    for t in ts]

        return {"name": self.name, "versions": [VERSION], "platform": PLATFORMS[self.artifact.kind][0],
                "inputs": tensors(self.spec.inputs), "outputs": tensors(self.spec.outputs)}

    def lookup(self, name: str, version: str | None = None) -> ServedModel:
        """This model when ``name`` (and ``version``, if given) are its own, else a 404."""
        if name != self.name:
            raise RequestError(404, f"unknown model {brief(name)}; this server serves {self.name!r}")
        if version not in (None, "", VERSION):
            raise RequestError(404, f"model {name!r} has no version {brief(version)}; versions: [{VERSION!r}]")
        return self

    def config_message(self) -> Any:
        """The model's Triton configuration (a ``model_config_pb2.ModelConfig``), plus the variant."""
        msg = build_model_config(self.name, self.spec, self.artifact, self.options)
        for key, value in (("onnxkit_variant", self.artifact.name), ("onnxkit_precision", self.artifact.precision),
                           ("onnxkit_runner", "ort:cpu")):
            msg.parameters[key].string_value = value
        return msg

    def config(self) -> dict[str, Any]:
        """The model's Triton configuration as ``GET /v2/models/<name>/config`` gives it."""
        from google.protobuf import json_format

        return json_format.MessageToDict(self.config_message(), preserving_proto_field_name=True)

    @property
    def max_batch(self) -> int | None:
        """The most rows a request may have (Triton's max_batch_size); None for a fixed-batch model."""
        return self.options.max_batch_size if self.spec.dynamic_batch else None

    def body_limit(self, max_body_mb: float | None) -> int:
        """Largest request body (bytes): ``max_body_mb``, else a request of ``max_batch`` rows sent as JSON."""
        if max_body_mb is not None:
            return int(max_body_mb * 2**20)
        values = 0
        for t in self.spec.inputs:
            count = 1
            for i, d in enumerate(t.shape):
                if i == 0 and t.has_dynamic_batch:
                    count *= self.max_batch or 1
                elif isinstance(d, int):
                    count *= d
                elif d in self.spec.ranges:
                    count *= self.spec.ranges[d].max
                else:
                    return DEFAULT_MAX_BODY
            values += count
        return values * JSON_BYTES_PER_VALUE + BODY_SLACK

    def check_input(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        """Refuse an input before its data is decoded: unknown name, wrong datatype, batch over the maximum."""
        names = self.spec.input_names
        if name not in names:
            raise RequestError(400, f"model {self.name} takes inputs {names}; the request has {brief(name)}")
        want = datatype_of(self.spec.input(name).dtype)
        if datatype != want:
            raise RequestError(400, f"input {name!r}: datatype {datatype} but model {self.name} expects {want}")
        if self.max_batch is not None and shape and shape[0] > self.max_batch:
            raise RequestError(400, f"input {name!r}: batch {shape[0]} exceeds the model's max batch of "
                                    f"{self.max_batch} (serve --max-batch; Triton's max_batch_size)")

    def check(self, req: InferRequest) -> dict[str, np.ndarray]:
        """The feed for the runner, or a 400 naming every mismatch with the model's inputs."""
        names = self.spec.input_names
        if set(req.inputs) != set(names):
            raise RequestError(400, f"model {self.name} takes inputs {names}; the request has {sorted(req.inputs)}")
        for t in self.spec.inputs:
            want = datatype_of(t.dtype)
            if req.datatypes[t.name] != want:
                raise RequestError(400, f"input {t.name!r}: datatype {req.datatypes[t.name]} but model {self.name} "
                                        f"expects {want}")
        try:
            self.spec.check_feed(req.inputs)
        except InputError as exc:
            raise RequestError(400, f"{exc} (model {self.name} input shapes: "
                                    f"{[triton_dims(t, batched=False) for t in self.spec.inputs]}, -1 = any)") from None
        if self.spec.dynamic_batch:
            batches = {a.shape[0] for a in req.inputs.values()}
            if len(batches) != 1 or 0 in batches:
                raise RequestError(400, f"every input needs the same batch size >= 1; got {sorted(batches)}")
        unknown = [o for o in req.outputs if o not in self.spec.output_names]
        if unknown:
            raise RequestError(400, f"unknown output(s) {unknown}; model {self.name} has {self.spec.output_names}")
        return {n: req.inputs[n] for n in names}


def load_model(cfg: ServeConfig, log: Callable[[str], None] = print) -> ServedModel:
    """Check the artifact folder, pick the variant and load it in ONNX Runtime (one warm-up run)."""
    from runtimes.base import RunnerOptions
    from runtimes.ort import OrtRunner

    base = Path(cfg.artifact_dir)
    manifest = load_artifacts(base)
    token = cfg.variant or default_variant(manifest)
    arts = resolve_variants(manifest, [token])
    if len(arts) > 1:
        raise InputError(f"--variant {token!r} matches {[a.name for a in arts]}; name one of them")
    art = arts[0]
    if art.kind not in OrtRunner.artifact_kinds:
        onnx_names = sorted(a.name for a in manifest.artifacts.values() if a.kind in OrtRunner.artifact_kinds)
        raise InputError(f"variant {art.name!r} is a TensorRT plan; `serve` runs ONNX variants in ONNX Runtime "
                         f"({onnx_names}); package plans for Triton with `package --format triton`")
    runner = OrtRunner(manifest, base, art, RunnerOptions(device="cpu", threads=cfg.threads,
                                                          ort_spinning=cfg.ort_spinning)).load()
    spec, batch = apply_input_shapes(manifest.iospec, cfg.input_shape)
    if batch is not None and spec.dynamic_batch and batch > cfg.max_batch:
        raise InputError(f"--input-shape has a batch of {batch}, above --max-batch {cfg.max_batch} (the most rows "
                         "a request may carry)")
    warm = spec.random_feed(batch or spec.fixed_batch() or 1)
    runner.infer(warm)
    batched = manifest.iospec.dynamic_batch
    options = ModelOptions(max_batch_size=cfg.max_batch if batched else 0,
                           dynamic_batching=batched and cfg.max_batch > 1,
                           max_queue_delay_us=round(cfg.max_delay_ms * 1000))
    name = served_name(model_base_name(manifest), art)
    log(f"loaded {art.file.path} ({art.precision}) as model {name!r}; warmed up at "
        + ", ".join(f"{n} {'x'.join(map(str, a.shape))}" for n, a in warm.items()))
    return ServedModel(name=name, manifest=manifest, artifact=art, runner=runner, options=options)


def server_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("onnxkit")
    except metadata.PackageNotFoundError:
        return "0"
