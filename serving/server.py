"""`serve`: one model variant behind the KServe v2 / Triton HTTP inference protocol.

FastAPI + uvicorn. The model runs through the project's ``OrtRunner``; concurrent requests are
micro-batched (up to ``max_batch`` rows, waiting at most ``max_delay_ms`` for more). Prometheus
metrics are at ``/metrics``. A bad request gets a 4xx with ``{"error": "..."}`` (the body
``tritonclient`` reads) and the server goes on serving.

The model is named ``<model>_<variant>``, as in the Triton repository written by ``package``, so a
client written against this server works unchanged against Triton serving that repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import InputError
from core.iospec import IOSpec
from core.manifest import Artifact, Manifest
from serving.protocol import (
    HEADER_LENGTH,
    SERVER_TIMING,
    InferRequest,
    RequestError,
    datatype_of,
    decode_request,
    encode_response,
)
from serving.triton import (
    PLATFORMS,
    ModelOptions,
    build_model_config,
    default_variant,
    load_artifacts,
    model_base_name,
    resolve_variants,
    served_name,
    triton_dims,
)

VERSION = "1"


class ServeConfig(BaseModel):
    """A `serve` request."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: Path = Field(description="Folder with manifest.json (from `convert`)")
    variant: str | None = Field(default=None, description="Artifact to serve; default opt, else fp32")
    host: str = Field(default="127.0.0.1", description="Address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="Port (0: any free port)")
    max_batch: int = Field(default=8, ge=1, description="Most rows run together; 1 turns micro-batching off")
    max_delay_ms: float = Field(default=2.0, ge=0, le=1000, description="Longest a request waits for others to "
                                                                       "join its batch")
    threads: int | None = Field(default=None, ge=1, description="ONNX Runtime intra-op threads")
    ort_spinning: bool = Field(default=True, description="ONNX Runtime's intra-op threads spin while waiting for "
                                                         "work: lower latency on free cores, wasted CPU when other "
                                                         "processes share them")
    max_body_mb: float = Field(default=64.0, gt=0, description="Largest request body accepted (MiB)")
    log_level: str = Field(default="warning", description="uvicorn log level")


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
        self.batch_rows = Histogram("onnxkit_batch_rows", "Rows per model execution (micro-batching)", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- micro-batching --------------------------------------------------------------------------------
@dataclass
class Done:
    """A finished request: its outputs, how long it queued and how long the model ran (seconds)."""

    outputs: list[np.ndarray]
    queue_s: float
    infer_s: float


@dataclass
class _Job:
    feed: dict[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[Done]
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class MicroBatcher:
    """Runs requests on one inference thread, concatenating concurrent ones along the batch axis.

    A batch is closed when it has ``max_batch`` rows, or when ``max_delay_s`` has passed, or at once
    when no company is likely (no request being read, and the previous batch held a single one): a lone
    client never waits for company that cannot come, so micro-batching costs nothing at concurrency 1.
    """

    infer: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    max_batch: int
    max_delay_s: float
    batchable: bool
    on_batch: Callable[[int], None] = lambda rows: None
    #: requests inside a handler that have not been submitted yet (being read or checked)
    arriving: int = 0
    _pending: deque[_Job] = field(default_factory=deque)
    _last_jobs: int = 0
    _wakeup: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="onnxkit-infer"))

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Held while a request is read and checked, so the batcher knows more work is coming."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def submit(self, feed: dict[str, np.ndarray]) -> Done:
        assert self._wakeup is not None, "MicroBatcher.start() was not called"
        first = next(iter(feed.values()))
        key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(feed.items())) if self.batchable else (id(feed),)
        job = _Job(feed, int(first.shape[0]) if first.ndim else 1, key, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    def _take(self, batch: list[_Job], rows: int) -> int:
        """Move queued jobs that fit (same trailing shapes, within max_batch) into ``batch``."""
        if not self.batchable:
            return rows
        keep: deque[_Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            if job.key == batch[0].key and rows + job.rows <= self.max_batch:
                batch.append(job)
                rows += job.rows
            else:
                keep.append(job)
        self._pending.extendleft(reversed(keep))
        return rows

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [self._pending.popleft()]
            rows = self._take(batch, batch[0].rows)
            deadline = loop.time() + self.max_delay_s
            # Wait for company only when some is likely: a request is being read now, or the last batch had
            # several requests (their clients are about to send again). A lone client never waits.
            while self.batchable and rows < self.max_batch and (self.arriving > 0 or self._last_jobs > 1):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                rows = self._take(batch, rows)
            self._last_jobs = len(batch)
            await self._execute(loop, batch, rows)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Job], rows: int) -> None:
        feed = batch[0].feed if len(batch) == 1 else {
            n: np.concatenate([j.feed[n] for j in batch]) for n in batch[0].feed}
        t0 = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self.infer, feed)
        except Exception as exc:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        infer_s = time.perf_counter() - t0
        self.on_batch(rows)
        start = 0
        for job in batch:
            part = outputs if len(batch) == 1 else [o[start:start + job.rows] for o in outputs]
            start += job.rows
            if not job.future.done():
                job.future.set_result(Done(part, t0 - job.submitted, infer_s))


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

    def config(self) -> dict[str, Any]:
        """The model's Triton configuration (as ``GET /v2/models/<name>/config`` gives it), plus the variant."""
        from google.protobuf import json_format

        msg = build_model_config(self.name, self.spec, self.artifact, self.options)
        for key, value in (("onnxkit_variant", self.artifact.name), ("onnxkit_precision", self.artifact.precision),
                           ("onnxkit_runner", "ort:cpu")):
            msg.parameters[key].string_value = value
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)

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
    if art.kind != "onnx":
        onnx_names = sorted(a.name for a in manifest.by_kind("onnx"))
        raise InputError(f"variant {art.name!r} is a TensorRT plan; `serve` runs ONNX variants in ONNX Runtime "
                         f"({onnx_names}); package plans for Triton with `package --format triton`")
    runner = OrtRunner(manifest, base, art, RunnerOptions(device="cpu", threads=cfg.threads,
                                                          ort_spinning=cfg.ort_spinning)).load()
    runner.infer(manifest.iospec.random_feed(manifest.iospec.fixed_batch() or 1))
    batched = manifest.iospec.dynamic_batch
    options = ModelOptions(max_batch_size=cfg.max_batch if batched else 0,
                           dynamic_batching=batched and cfg.max_batch > 1,
                           max_queue_delay_us=round(cfg.max_delay_ms * 1000))
    name = served_name(model_base_name(manifest), art)
    log(f"loaded {art.file.path} ({art.precision}) as model {name!r}")
    return ServedModel(name=name, manifest=manifest, artifact=art, runner=runner, options=options)


# -- the app ---------------------------------------------------------------------------------------
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"malformed Content-Length {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared)} bytes exceeds the server's limit of {limit} "
                                    "bytes (serve --max-body-mb)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the server's limit of {limit} bytes (serve --max-body-mb)")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise RequestError(400, f"request body is not valid {encoding}: {exc}") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise RequestError(413, f"decompressed request body exceeds the server's limit of {limit} bytes")
    elif encoding != "identity":
        raise RequestError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    return body


def create_app(model: ServedModel, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application serving ``model``; it closes the runner on shutdown."""
    metrics = ServerMetrics()
    batcher = MicroBatcher(infer=model.runner.infer, max_batch=cfg.max_batch, max_delay_s=cfg.max_delay_ms / 1000,
                           batchable=model.spec.dynamic_batch and cfg.max_batch > 1,
                           on_batch=metrics.batch_rows.labels(model.name).observe)
    limit = int(cfg.max_body_mb * 2**20)
    ready = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        batcher.start()
        ready.set()
        try:
            yield
        finally:
            ready.clear()
            await batcher.stop()
            model.runner.close()

    app = FastAPI(title="onnxkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.batcher = batcher

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError) -> Any:
        return _error(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> Any:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    def lookup(name: str, version: str | None = None) -> ServedModel:
        if name != model.name:
            raise RequestError(404, f"unknown model {name!r}; this server serves {model.name!r}")
        if version not in (None, "", VERSION):
            raise RequestError(404, f"model {name!r} has no version {version!r}; versions: [{VERSION!r}]")
        return model

    @app.get("/v2")
    async def server_metadata() -> Any:
        return {"name": "onnxkit", "version": _version(), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> Any:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def server_ready() -> Any:
        return Response(status_code=200 if ready.is_set() else 503)

    @app.post("/v2/repository/index")
    async def repository_index() -> Any:
        return [{"name": model.name, "version": VERSION, "state": "READY" if ready.is_set() else "UNAVAILABLE"}]

    @app.get("/metrics")
    async def prometheus() -> Any:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Any:
        return lookup(name, version).metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Any:
        lookup(name, version)
        return Response(status_code=200 if ready.is_set() else 503)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> Any:
        return lookup(name, version).config()

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Any:
        t0 = time.perf_counter()
        label = model.name if name == model.name else "_unknown"
        metrics.in_flight.inc()
        status = 200
        try:
            with batcher.arrival():
                served = lookup(name, version)
                req = decode_request(await _read_body(request, limit), request.headers.get(HEADER_LENGTH))
                feed = served.check(req)
            t_read = time.perf_counter()
            done = await batcher.submit(feed)
            outputs = dict(zip(served.spec.output_names, done.outputs, strict=True))
            if req.outputs:
                outputs = {n: outputs[n] for n in req.outputs}
            binary = req.binary_outputs if req.outputs else (set(outputs) if req.binary_default else set())
            body, header_len = encode_response(served.name, VERSION, outputs, binary, req.id)
            # W3C Server-Timing: lets a client split its latency into model time and everything else
            headers = {SERVER_TIMING: f"read;dur={(t_read - t0) * 1e3:.3f}, queue;dur={done.queue_s * 1e3:.3f}, "
                                      f"infer;dur={done.infer_s * 1e3:.3f}, "
                                      f"handler;dur={(time.perf_counter() - t0) * 1e3:.3f}"}
            if header_len is None:
                return Response(body, media_type="application/json", headers=headers)
            headers[HEADER_LENGTH] = str(header_len)
            return Response(body, media_type="application/octet-stream", headers=headers)
        except RequestError as exc:
            status = exc.status
            return _error(exc.status, exc.message)
        except Exception as exc:
            status = 500
            return _error(500, f"inference failed: {type(exc).__name__}: {exc}")
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(label, str(status)).inc()
            if status >= 400:
                metrics.errors.labels(label, str(status)).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - t0)

    return app


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("onnxkit")
    except metadata.PackageNotFoundError:
        return "0"


# -- running it ------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear InputError (port in use, unknown address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then, and without it
    # Nagle's algorithm and delayed ACKs add ~40 ms to every response written in two parts.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def _uvicorn_server(app: Any, cfg: ServeConfig) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, access_log=False, lifespan="on",
                                         timeout_keep_alive=30))


def serve(cfg: ServeConfig, log: Callable[[str], None] = print) -> None:
    """Load the model, listen, and serve until interrupted."""
    sock = bind(cfg.host, cfg.port)  # first: a busy port fails before the model is loaded
    try:
        model = load_model(cfg, log)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    log(f"serving {model.name!r} at http://{host}:{port} (KServe v2; max batch {cfg.max_batch}, max delay "
        f"{cfg.max_delay_ms:g} ms; metrics at /metrics)")
    _uvicorn_server(create_app(model, cfg), cfg).run(sockets=[sock])


class BackgroundServer:
    """Serve in a background thread on a free loopback port (tests and benchmarks); a context manager."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.model = load_model(cfg, log=lambda _m: None)
        self.app = create_app(self.model, cfg)
        self._sock = bind(cfg.host, cfg.port)
        host, port = self._sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._server = _uvicorn_server(self.app, cfg)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
