"""The FastAPI application of ``serve``: KServe v2 / Triton HTTP routes, errors as JSON, Prometheus metrics."""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving.batching import MicroBatcher
from serving.protocol import (
    HEADER_LENGTH,
    SERVER_TIMING,
    RequestError,
    brief,
    decode_request,
    encode_response,
)
from serving.served import VERSION, ServeConfig, ServedModel, ServerMetrics, server_version


# -- the app ---------------------------------------------------------------------------------------
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytearray:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes. One growing buffer
    (no list of chunks joined into a second copy); a client that goes away raises ClientDisconnect."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"malformed Content-Length {brief(declared)}")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared)} bytes exceeds the server's limit of {limit} "
                                    "bytes (serve --max-body-mb)")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise RequestError(413, f"request body exceeds the server's limit of {limit} bytes (serve --max-body-mb)")
        body += chunk
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
        try:
            inflated = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise RequestError(400, f"request body is not valid {encoding}: {exc}") from None
        if len(inflated) > limit or inflater.unconsumed_tail:
            raise RequestError(413, f"decompressed request body exceeds the server's limit of {limit} bytes")
        return bytearray(inflated)
    if encoding != "identity":
        raise RequestError(415, f"unsupported Content-Encoding {brief(encoding)}; use gzip, deflate or none")
    return body


def create_app(model: ServedModel, cfg: ServeConfig, log: Callable[[str], None] = lambda _m: None) -> FastAPI:
    """The FastAPI application serving ``model``; it closes the runner on shutdown. With ``cfg.grpc_port`` its
    lifespan also runs the gRPC server (``app.state.grpc``) on the same loop, model and micro-batcher."""
    metrics = ServerMetrics()
    grpc = None
    if cfg.grpc_port is not None:
        from serving.grpc_service import GrpcFrontend

        grpc = GrpcFrontend(model, cfg, metrics, log)
    batcher = MicroBatcher(infer=model.runner.infer, max_batch=cfg.max_batch, max_delay_s=cfg.max_delay_ms / 1000,
                           batchable=model.spec.dynamic_batch and cfg.max_batch > 1,
                           on_batch=metrics.batch_rows.labels(model.name).observe)
    ready = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            if grpc is not None:
                await grpc.start(batcher, ready)
            ready.set()
            yield
        finally:
            ready.clear()
            if grpc is not None:
                await grpc.stop()
            await batcher.stop()
            model.runner.close()

    app = FastAPI(title="onnxkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.grpc = grpc
    _error_handlers(app)
    _server_routes(app, model, metrics, ready)
    _model_routes(app, model, ready)
    _infer_route(app, model, batcher, metrics, model.body_limit(cfg.max_body_mb))
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error is a JSON ``{"error": ...}`` body, the form tritonclient reports."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError) -> Any:
        return _error(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> Any:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")


def _server_routes(app: FastAPI, model: ServedModel, metrics: ServerMetrics, ready: threading.Event) -> None:
    @app.get("/v2")
    async def server_metadata() -> Any:
        return {"name": "onnxkit", "version": server_version(), "extensions": ["binary_tensor_data"]}

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


def _model_routes(app: FastAPI, model: ServedModel, ready: threading.Event) -> None:
    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Any:
        return model.lookup(name, version).metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Any:
        model.lookup(name, version)
        return Response(status_code=200 if ready.is_set() else 503)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> Any:
        return model.lookup(name, version).config()


def _infer_route(app: FastAPI, model: ServedModel, batcher: MicroBatcher, metrics: ServerMetrics,
                 limit: int) -> None:
    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Any:
        t0 = time.perf_counter()
        label = model.name if name == model.name else "_unknown"
        metrics.in_flight.inc()
        status = 200
        try:
            return await _infer(model, batcher, request, name, version, limit, t0)
        except RequestError as exc:
            status = exc.status
            return _error(exc.status, exc.message)
        except ClientDisconnect:  # nobody to answer: counted apart, not as a server error
            status = 0
            return Response(status_code=499)
        except Exception as exc:
            status = 500
            return _error(500, f"inference failed: {type(exc).__name__}: {brief(str(exc), 500)}")
        finally:
            metrics.in_flight.dec()
            if status == 0:
                metrics.disconnects.labels(label).inc()
            else:
                metrics.requests.labels(label, str(status)).inc()
                if status >= 400:
                    metrics.errors.labels(label, str(status)).inc()
                metrics.latency.labels(label).observe(time.perf_counter() - t0)


async def _infer(model: ServedModel, batcher: MicroBatcher, request: Request, name: str, version: str | None,
                 limit: int, t0: float) -> Response:
    """Read, check, run (micro-batched) and encode one inference request."""
    with batcher.arrival():
        served = model.lookup(name, version)
        raw = await _read_body(request, limit)
        req = decode_request(raw, request.headers.get(HEADER_LENGTH), served.check_input)
        feed = served.check(req)
        del raw  # binary inputs are views of it and keep it while they live; nothing else holds the body
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
