"""`serve --grpc-port`: the KServe v2 / Triton gRPC protocol beside the HTTP routes of ``serving.app``.

A ``grpc.aio`` server started on the HTTP server's event loop, so both protocols share one loaded model,
one micro-batcher (requests from either join the same batches) and one set of input checks
(``ServedModel.lookup/check_input/check``, ``serving.protocol.open_tensor/binary_tensor``). A refused request
gets a gRPC status with one clear message: INVALID_ARGUMENT for a bad name, shape or datatype, NOT_FOUND for
an unknown model, and the server goes on serving.

The generated protos are tritonclient's (``tritonclient.grpc.service_pb2``): the project already depends on
``tritonclient[grpc]`` (its ``model_config_pb2`` writes and checks Triton configs, and the ModelConfig call
answers with that message), and they are the protos the Triton clients speak. KServe's copy
(``kserve.protocol.grpc.grpc_predict_v2_pb2``) registers the same ``inference.*`` names, so the two cannot
be imported in one process; a process that runs this server must not import ``kserve``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from core.errors import InputError
from serving.batching import MicroBatcher
from serving.protocol import (
    InferRequest,
    InputCheck,
    RequestError,
    binary_tensor,
    brief,
    datatype_of,
    open_tensor,
)
from serving.served import VERSION, ServeConfig, ServedModel, ServerMetrics, server_version

SERVICE = "inference.GRPCInferenceService"
#: The typed ``InferTensorContents`` field that carries each datatype (FP16 has none: raw bytes only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}
#: The gRPC status of a refused request, by the HTTP status the shared checks give it.
_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
          503: "UNAVAILABLE"}


def protos() -> tuple[Any, Any]:
    """``grpc`` and tritonclient's ``service_pb2``, or one clear InputError naming what to install."""
    try:
        import grpc
        from tritonclient.grpc import service_pb2
    except ImportError as exc:
        raise InputError(f"serve --grpc-port needs grpcio and tritonclient's protos "
                         f"(pip install 'tritonclient[grpc]'): {exc}") from None
    return grpc, service_pb2


# -- requests --------------------------------------------------------------------------------------
def _typed_values(tensor: Any, dtype: np.dtype[Any], shape: tuple[int, ...], where: str) -> np.ndarray:
    """An input sent in ``contents`` (typed repeated fields) instead of ``raw_input_contents``."""
    field = CONTENTS.get(tensor.datatype)
    if field is None:
        raise RequestError(400, f"{where}: {tensor.datatype} has no typed contents field; send it in "
                                "raw_input_contents")
    values = getattr(tensor.contents, field)
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise RequestError(400, f"{where}: {tensor.datatype} values go in contents.{field}; the request filled "
                                f"contents.{others[0]}")
    count = math.prod(shape)
    if len(values) != count:
        raise RequestError(400, f"{where}: contents.{field} has {len(values)} values but shape {list(shape)} "
                                f"needs {count}")
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError as exc:
        raise RequestError(400, f"{where}: contents.{field} has values out of range for "
                                f"{tensor.datatype}: {exc}") from None


def decode_infer_request(request: Any, check: InputCheck | None = None) -> InferRequest:
    """A ``ModelInferRequest`` as the ``InferRequest`` the HTTP path decodes, through the same per-input
    checks (``open_tensor``, ``binary_tensor``); raw inputs are views of the request's bytes."""
    if not request.inputs:
        raise RequestError(400, "the request has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                                "send every input raw, or none")
    req = InferRequest(inputs={}, datatypes={}, outputs=[o.name for o in request.outputs], id=request.id or None)
    for i, tensor in enumerate(request.inputs):
        where = f"input {brief(tensor.name)}"
        if tensor.name in req.inputs:
            raise RequestError(400, f"{where} is given twice")
        if "shared_memory_region" in tensor.parameters:
            raise RequestError(400, f"{where}: shared-memory inputs are not supported; send the data in the "
                                    "request")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise RequestError(400, f"{where}: shape {list(shape)} has a negative dim")
        dtype = open_tensor(tensor.name, tensor.datatype, shape, where, check)
        if raw and tensor.contents.ListFields():
            raise RequestError(400, f"{where}: values given both in contents.{tensor.contents.ListFields()[0][0].name} "
                                    "and in raw_input_contents; send the tensor one way")
        if raw:
            arr = binary_tensor(memoryview(raw[i]), 0, len(raw[i]), dtype, shape, tensor.datatype, where)
        else:
            arr = _typed_values(tensor, dtype, shape, where)
        req.inputs[tensor.name] = arr
        req.datatypes[tensor.name] = tensor.datatype
    return req


def encode_infer_response(pb: Any, model: str, outputs: dict[str, np.ndarray], request_id: str | None) -> Any:
    """A ``ModelInferResponse`` with every output as raw little-endian bytes (what tritonclient reads)."""
    resp = pb.ModelInferResponse(model_name=model, model_version=VERSION, id=request_id or "")
    for name, arr in outputs.items():
        resp.outputs.add(name=name, datatype=datatype_of(arr.dtype), shape=list(arr.shape))
        resp.raw_output_contents.append(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    return resp


# -- the service -----------------------------------------------------------------------------------
class Malformed:
    """A request message that is not valid protobuf, handed to the call so that it can refuse it."""

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(cls: Any) -> Callable[[bytes], Any]:
    """A request deserializer that gives a ``Malformed`` instead of raising on bytes that do not parse."""
    from google.protobuf.message import DecodeError

    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            return Malformed(f"malformed {cls.__name__} ({len(raw)} bytes): not a valid protobuf message: "
                             f"{brief(str(exc), 200)}")

    return parse


class InferenceServicer:
    """The GRPCInferenceService calls ``serve`` answers; the others get UNIMPLEMENTED from gRPC itself."""

    UNARY = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
             "RepositoryIndex", "ModelInfer")

    def __init__(self, model: ServedModel, batcher: MicroBatcher, ready: threading.Event,
                 metrics: ServerMetrics) -> None:
        self.grpc, self.pb = protos()
        self.model, self.batcher, self.ready, self.metrics = model, batcher, ready, metrics

    def handler(self) -> Any:
        """The generic handler registering every call of ``UNARY`` with its request/response messages."""
        calls = {}
        for name in self.UNARY:
            req_cls, resp_cls = (getattr(self.pb, f"{name}{part}") for part in ("Request", "Response"))
            calls[name] = self.grpc.unary_unary_rpc_method_handler(
                self._parsed(getattr(self, name)), request_deserializer=_lenient(req_cls),
                response_serializer=resp_cls.SerializeToString)
        return self.grpc.method_handlers_generic_handler(SERVICE, calls)

    def _parsed(self, method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """``method``, after a request that did not parse is refused with INVALID_ARGUMENT (gRPC itself gives a
        deserializer's exception UNKNOWN)."""
        async def call(request: Any, context: Any) -> Any:
            if isinstance(request, Malformed):
                await context.abort(self.grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await method(request, context)

        return call

    async def _refuse(self, context: Any, exc: RequestError) -> None:
        code = getattr(self.grpc.StatusCode, _CODES.get(exc.status, "INTERNAL"))
        await context.abort(code, exc.message)

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=self.ready.is_set())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self.pb.ServerMetadataResponse(name="onnxkit", version=server_version(),
                                              extensions=["binary_tensor_data"])

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        state = "READY" if self.ready.is_set() else "UNAVAILABLE"
        return self.pb.RepositoryIndexResponse(models=[{"name": self.model.name, "version": VERSION,
                                                        "state": state}])

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self.model.lookup(request.name, request.version)
        except RequestError as exc:
            await self._refuse(context, exc)
        return self.pb.ModelReadyResponse(ready=self.ready.is_set())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            meta = self.model.lookup(request.name, request.version).metadata()
        except RequestError as exc:
            await self._refuse(context, exc)
        return self.pb.ModelMetadataResponse(**meta)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            config = self.model.lookup(request.name, request.version).config_message()
        except RequestError as exc:
            await self._refuse(context, exc)
        return self.pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        t0 = time.perf_counter()
        label = self.model.name if request.model_name == self.model.name else "_unknown"
        self.metrics.in_flight.inc()
        code = "OK"
        try:
            return await self._infer(request)
        except RequestError as exc:
            code = _CODES.get(exc.status, "INTERNAL")
            await self._refuse(context, exc)
        except Exception as exc:
            code = "INTERNAL"
            await context.abort(self.grpc.StatusCode.INTERNAL,
                                f"inference failed: {type(exc).__name__}: {brief(str(exc), 500)}")
        finally:
            self.metrics.in_flight.dec()
            self.metrics.grpc_requests.labels(label, code).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)

    async def _infer(self, request: Any) -> Any:
        """Check, run (micro-batched with the HTTP requests) and encode one ModelInferRequest."""
        with self.batcher.arrival():
            served = self.model.lookup(request.model_name, request.model_version)
            req = decode_infer_request(request, served.check_input)
            feed = served.check(req)
        done = await self.batcher.submit(feed)
        outputs = dict(zip(served.spec.output_names, done.outputs, strict=True))
        if req.outputs:
            outputs = {n: outputs[n] for n in req.outputs}
        return encode_infer_response(self.pb, served.name, outputs, req.id)


# -- the server ------------------------------------------------------------------------------------
def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcFrontend:
    """The gRPC server of one ``serve``: started and stopped by the HTTP app's lifespan, on its event loop."""

    def __init__(self, model: ServedModel, cfg: ServeConfig, metrics: ServerMetrics,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        protos()  # a missing package fails here, before the HTTP server starts
        assert cfg.grpc_port is not None
        self.model, self.cfg, self.metrics, self.log = model, cfg, metrics, log
        self.port: int | None = None
        self.error: BaseException | None = None
        self._server: Any = None

    async def start(self, batcher: MicroBatcher, ready: threading.Event) -> None:
        grpc, _ = protos()
        limit = self.model.body_limit(self.cfg.max_body_mb)
        # so_reuseport off: with it (gRPC's default) a second server would share a busy port silently
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", -1)])
        server.add_generic_rpc_handlers([InferenceServicer(self.model, batcher, ready, self.metrics).handler()])
        address = grpc_address(self.cfg.host, self.cfg.grpc_port or 0)
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            self.error = InputError(f"cannot listen for gRPC on {address}: {str(exc).split(';')[0]}")
            raise self.error from None
        await server.start()
        self._server = server
        self.log(f"gRPC (KServe v2 / Triton GRPCInferenceService) at {grpc_address(self.cfg.host, self.port)}")

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
