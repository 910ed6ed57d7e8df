"""`serve --grpc-port`: the real tritonclient.grpc client against the tiny models on loopback: the same
outputs as ONNX Runtime for one input and for two inputs/two outputs, health and metadata calls, bad
requests as INVALID_ARGUMENT / NOT_FOUND (and the server keeps serving), concurrent clients, and HTTP and
gRPC sharing one model. No ``kserve`` import here: its protos clash with tritonclient's in one process."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from convert.config import ConvertConfig, ExportConfig
from convert.pipeline import run_convert
from core.manifest import Manifest
from serving.served import ServeConfig
from serving.server import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
TWO_IO = f"{ROOT / 'tests' / 'fixtures' / 'two_io.py'}:build"


def _session(artifacts: Path) -> ort.InferenceSession:
    """ONNX Runtime run directly on the served file, outside the toolkit's runner."""
    path = artifacts / Manifest.load(artifacts).artifacts["opt"].file.path
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServeConfig(artifact_dir=tiny_artifacts, port=0, grpc_port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def two_io(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two_io")
    run_convert(ConvertConfig(export=ExportConfig(model=TWO_IO), out=out), log=lambda _m: None)
    return out


def _client(server: BackgroundServer) -> tgrpc.InferenceServerClient:
    assert server.grpc_target is not None
    return tgrpc.InferenceServerClient(server.grpc_target)


def _input(name: str, arr: np.ndarray, datatype: str = "FP32") -> tgrpc.InferInput:
    inp = tgrpc.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr)
    return inp


def test_one_input_same_as_onnx_runtime(server: BackgroundServer, tiny_artifacts: Path) -> None:
    client, sess = _client(server), _session(tiny_artifacts)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = client.infer("tiny_cnn_opt", [_input("input", x)]).as_numpy("logits")
        np.testing.assert_allclose(got, sess.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)


def test_two_inputs_two_outputs_same_as_onnx_runtime(two_io: Path) -> None:
    sess = _session(two_io)
    with BackgroundServer(ServeConfig(artifact_dir=two_io, port=0, grpc_port=0)) as srv:
        client = _client(srv)
        model = srv.model.name
        meta = client.get_model_metadata(model, as_json=True)
        assert [i["name"] for i in meta["inputs"]] == ["image", "features"]
        names = [o["name"] for o in meta["outputs"]]
        assert len(names) == 2
        rng = np.random.default_rng(1)
        for batch in (1, 4):
            image = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
            features = rng.standard_normal((batch, 4)).astype(np.float32)
            want = sess.run(None, {"image": image, "features": features})
            result = client.infer(model, [_input("image", image), _input("features", features)])
            for name, w in zip(names, want, strict=True):
                np.testing.assert_allclose(result.as_numpy(name), w, rtol=1e-4, atol=1e-5)
            # only the second output asked for
            only = client.infer(model, [_input("image", image), _input("features", features)],
                                outputs=[tgrpc.InferRequestedOutput(names[1])])
            assert only.as_numpy(names[0]) is None
            np.testing.assert_allclose(only.as_numpy(names[1]), want[1], rtol=1e-4, atol=1e-5)


def test_health_and_metadata(server: BackgroundServer) -> None:
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny_cnn_opt")
    assert client.get_server_metadata(as_json=True)["name"] == "onnxkit"
    meta = client.get_model_metadata("tiny_cnn_opt", as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config("tiny_cnn_opt").config
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert client.get_model_repository_index(as_json=True)["models"][0]["state"] == "READY"


def _refused(call: object, code: str, needle: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    assert info.value.status() == f"StatusCode.{code}", info.value
    assert needle in info.value.message(), info.value.message()


def test_bad_requests_get_a_grpc_status_and_the_server_keeps_serving(server: BackgroundServer) -> None:
    client = _client(server)
    x = np.zeros((1, 3, 32, 32), np.float32)
    cases = [
        ([_input("input", np.zeros((1, 3, 16, 16), np.float32))], "tiny_cnn_opt", "INVALID_ARGUMENT",
         "does not match"),
        ([_input("input", x.astype(np.float64), "FP64")], "tiny_cnn_opt", "INVALID_ARGUMENT",
         "datatype FP64 but model tiny_cnn_opt expects FP32"),
        ([_input("image", x)], "tiny_cnn_opt", "INVALID_ARGUMENT", "takes inputs ['input']"),
        ([_input("input", np.zeros((9, 3, 32, 32), np.float32))], "tiny_cnn_opt", "INVALID_ARGUMENT",
         "exceeds the model's max batch of 8"),
        ([_input("input", x)], "nope", "NOT_FOUND", "unknown model 'nope'"),
    ]
    for inputs, model, code, needle in cases:
        _refused(lambda inputs=inputs, model=model: client.infer(model, inputs), code, needle)
    _refused(lambda: client.get_model_metadata("nope"), "NOT_FOUND", "unknown model 'nope'")
    _refused(lambda: client.infer("tiny_cnn_opt", [_input("input", x)],
                                  outputs=[tgrpc.InferRequestedOutput("nope")]), "INVALID_ARGUMENT",
             "unknown output(s) ['nope']")
    assert client.infer("tiny_cnn_opt", [_input("input", x)]).as_numpy("logits").shape == (1, 10)


def test_typed_contents_and_raw_bytes_checks(server: BackgroundServer, tiny_artifacts: Path) -> None:
    """``contents.fp32_contents`` (no raw bytes) answers the same; a raw tensor of the wrong size is refused."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert server.grpc_target is not None
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="tiny_cnn_opt", id="typed-1")
        req.inputs.add(name="input", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.ravel())
        resp = stub.ModelInfer(req)
        assert resp.id == "typed-1" and resp.outputs[0].name == "logits"
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 10)
        np.testing.assert_allclose(got, _session(tiny_artifacts).run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
        bad = service_pb2.ModelInferRequest(model_name="tiny_cnn_opt")
        bad.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        bad.raw_input_contents.append(x.tobytes()[:-4])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes of binary data != 6144 elements x 4 bytes" in str(info.value.details())


def _hostile_requests() -> list[tuple[str, Any, str, str]]:
    """(what, request, gRPC status, message) for requests the decoder must refuse before running anything."""
    from tritonclient.grpc import service_pb2

    def req(shape: list[int], raw: list[bytes] | None = None, datatype: str = "FP32") -> Any:
        r = service_pb2.ModelInferRequest(model_name="tiny_cnn_opt")
        r.inputs.add(name="input", datatype=datatype, shape=shape)
        r.raw_input_contents.extend(raw or [])
        return r

    x = np.zeros((1, 3, 32, 32), np.float32).tobytes()
    wrong_field = req([1, 3, 32, 32])
    wrong_field.inputs[0].contents.int64_contents.extend([0] * 3072)
    both = req([1, 3, 32, 32], [x])
    both.inputs[0].contents.fp32_contents.extend([0.5] * 3072)
    return [
        ("contents and raw bytes both", both, "INVALID_ARGUMENT",
         "values given both in contents.fp32_contents and in raw_input_contents; send the tensor one way"),
        ("no data", req([1, 3, 32, 32]), "INVALID_ARGUMENT", "contents.fp32_contents has 0 values but shape"),
        ("wrong contents field", wrong_field, "INVALID_ARGUMENT",
         "FP32 values go in contents.fp32_contents; the request filled contents.int64_contents"),
        ("raw count", req([1, 3, 32, 32], [x, x]), "INVALID_ARGUMENT", "raw_input_contents has 2 entries for 1"),
        ("huge shape", req([1, 3, 2**40, 2**40], [x]), "INVALID_ARGUMENT", "would take more than 2**63 bytes"),
        ("unknown datatype", req([1, 3, 32, 32], [x], "BF16"), "INVALID_ARGUMENT", "unsupported datatype 'BF16'"),
        ("over the size limit", req([8, 3, 32, 32], [bytes(2**22)]), "RESOURCE_EXHAUSTED", "larger than max"),
    ]


def test_hostile_grpc_requests_are_refused(server: BackgroundServer) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    assert server.grpc_target is not None
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for what, request, code, needle in _hostile_requests():
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=30)
            assert info.value.code().name == code, (what, info.value)
            assert needle in str(info.value.details()), (what, info.value.details())
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert _client(server).infer("tiny_cnn_opt", [_input("input", x)]).as_numpy("logits").shape == (1, 10)


def test_bytes_that_are_not_protobuf_are_invalid_argument(server: BackgroundServer) -> None:
    """Garbage sent as a request message (any call) is the client's error, INVALID_ARGUMENT, not UNKNOWN."""
    import grpc

    assert server.grpc_target is not None
    with grpc.insecure_channel(server.grpc_target) as channel:
        for call in ("ModelInfer", "ModelMetadata", "ServerLive"):
            stub = channel.unary_unary(f"/inference.GRPCInferenceService/{call}")
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", bytes(range(256)) * 4):
                with pytest.raises(grpc.RpcError) as info:
                    stub(garbage, timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (call, garbage[:8], info.value)
                assert f"malformed {call}Request" in str(info.value.details()), info.value.details()
                assert "not a valid protobuf message" in str(info.value.details())
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert _client(server).infer("tiny_cnn_opt", [_input("input", x)]).as_numpy("logits").shape == (1, 10)


def test_concurrent_grpc_and_http_clients_all_correct(server: BackgroundServer, tiny_artifacts: Path) -> None:
    """Eight threads (gRPC and HTTP mixed) share the model and its micro-batcher; every answer is right."""
    sess = _session(tiny_artifacts)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + i % 2, 3, 32, 32)).astype(np.float32) for i in range(8)]
    http_target = server.url.removeprefix("http://")

    def work(i: int) -> None:
        use_grpc = i % 4 != 3
        client = _client(server) if use_grpc else thttp.InferenceServerClient(http_target)
        mod = tgrpc if use_grpc else thttp
        for _ in range(10):
            inp = mod.InferInput("input", list(xs[i].shape), "FP32")
            inp.set_data_from_numpy(xs[i])
            got = client.infer("tiny_cnn_opt", [inp]).as_numpy("logits")
            np.testing.assert_allclose(got, sess.run(None, {"input": xs[i]})[0], rtol=1e-4, atol=1e-5)

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(work, i) for i in range(8)]:
            f.result()
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'onnxkit_grpc_inference_requests_total{code="OK",model="tiny_cnn_opt"}' in metrics


def test_busy_grpc_port_is_one_line(tiny_artifacts: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", str(tiny_artifacts), "--port", "0",
                               "--grpc-port", str(port)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}"), proc.stderr


@pytest.mark.parametrize("sig,codes", [(signal.SIGINT, {130}), (signal.SIGTERM, {-signal.SIGTERM, 143})],
                         ids=["SIGINT", "SIGTERM"])
def test_cli_serves_grpc_and_shuts_down_cleanly(tiny_artifacts: Path, sig: signal.Signals, codes: set[int]) -> None:
    """`cli.py serve --grpc-port` in its own process answers gRPC; Ctrl-C / SIGTERM shut it down (uvicorn's
    graceful shutdown, then the gRPC server's) and exit as the CLI always does: "interrupted" and 130 for
    Ctrl-C; for SIGTERM uvicorn re-raises the signal once shut down. No traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(tiny_artifacts), "--port", "0",
                             "--grpc-port", str(port), "--max-batch", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            with contextlib.suppress(InferenceServerException):
                if client.is_server_ready():
                    break
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        x = np.ones((1, 3, 32, 32), np.float32)
        assert client.infer("tiny_cnn_opt", [_input("input", x)]).as_numpy("logits").shape == (1, 10)
        client.close()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in codes, err
    assert "Traceback" not in err and "rror" not in err, err
    assert f"gRPC (KServe v2 / Triton GRPCInferenceService) at 127.0.0.1:{port}" in out + err
