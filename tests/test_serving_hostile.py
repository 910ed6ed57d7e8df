"""`serve` against hostile requests (issue 13): overflowing shapes, huge numbers, deep JSON, huge batches,
bad header lengths, oversized bodies and clients that hang up. Each gets a 4xx with a one-line
``{"error": ...}`` body, never a 500, and the server goes on answering what ONNX Runtime computes."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from core.manifest import Manifest
from serving.protocol import HEADER_LENGTH, RequestError, decode_request, decode_response, encode_request
from serving.served import BODY_SLACK, JSON_BYTES_PER_VALUE, ServeConfig
from serving.server import BackgroundServer

MODEL = "tiny_cnn_opt"
LIMIT = 8 * 3 * 32 * 32 * JSON_BYTES_PER_VALUE + BODY_SLACK  # the default: 8 rows (max batch) as JSON


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServeConfig(artifact_dir=tiny_artifacts, port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_artifacts: Path) -> ort.InferenceSession:
    path = tiny_artifacts / Manifest.load(tiny_artifacts).artifacts["opt"].file.path
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _json(shape: list[int], data: object, datatype: str = "FP32") -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": data}]}).encode()


def _binary(shape: list[int], size: object, sent: int | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary request announcing ``size`` bytes and sending ``sent`` (default: ``size``)."""
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                                   "parameters": {"binary_data_size": size}}]}).encode()
    return head + b"\0" * (size if sent is None else sent), {HEADER_LENGTH: str(len(head))}  # type: ignore[operator]


def _literal(values: bytes) -> bytes:
    """A request whose data is 3072 copies of a raw JSON token (1e400, NaN: json.dumps cannot write them)."""
    return (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,32,32],"data":['
            + b",".join([values] * 3072) + b"]}]}")


def _cases() -> list[tuple[str, bytes, dict[str, str], int, str]]:
    deep = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1],"data":' + b"[" * 100_000 + b"]" * 100_000
    return [
        ("json shape count overflows", _json([2**54 + 1, 3, 32, 32], [0.0]), {}, 400, "exceeds the model's max batch"),
        ("json dim 2**64+1", _json([1, 3, 32, 2**64 + 1], [0.0]), {}, 400, "is too large"),
        ("json batch 2**64+1", _json([2**64 + 1], [0.0]), {}, 400, "exceeds the model's max batch of 8"),
        ("json batch 2**62", _json([2**62, 3, 32, 32], [0.0]), {}, 400, "batch 4611686018427387904 exceeds"),
        ("binary shape count overflows", *_binary([2**54 + 1, 3, 32, 32], 16), 400, "exceeds the model's max batch"),
        ("binary dim 2**64+1", *_binary([1, 3, 32, 2**64 + 1], 16), 400, "is too large"),
        ("binary batch 2**62, no bytes", *_binary([2**62, 3, 32, 32], 0), 400, "max batch"),
        ("int 10**400", _json([1, 3, 32, 32], [10**400] * 3072), {}, 400, "integers beyond 64 bits"),
        ("float 1e400", _literal(b"1e400"), {}, 400, "must be finite"),
        ("NaN literal", _literal(b"NaN"), {}, 400, "must be finite"),
        ("5000-digit integer", b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1],"data":[' + b"9" * 5000
         + b"]}]}", {}, 400, "malformed JSON"),
        ("beyond FP32", _literal(b"1e39"), {}, 400, "beyond the range of FP32"),
        ("JSON nested 100000 deep", deep + b"}]}", {}, 400, "nested too deeply"),
        ("data not a list", _json([1], "1.0"), {}, 400, "not a list of FP32 values"),
        ("negative header length", *(_binary([1, 3, 32, 32], 12288)[0], {HEADER_LENGTH: "-1"}), 400, HEADER_LENGTH),
        ("huge header length", *(_binary([1, 3, 32, 32], 12288)[0], {HEADER_LENGTH: str(2**70)}), 400,
         HEADER_LENGTH),
        ("header length past the body", *(_binary([1, 3, 32, 32], 12288)[0], {HEADER_LENGTH: "99999"}), 400,
         "does not fit"),
        ("body over the limit", b"0" * (LIMIT + 1), {}, 413, "exceeds the server's limit"),
        # issue 33
        ("JSON true/false as FP32", _json([1, 3, 32, 32], [True, False] * 1536), {}, 400,
         "not a list of FP32 values: true/false are BOOL values"),
        ("one true among FP32 floats", _json([1, 3, 32, 32], [0.5] * 3071 + [True]), {}, 400,
         "true/false are BOOL values"),
        ("a nested false among floats", _json([1, 3, 32, 32], [[[[0.5] * 32] * 31 + [[0.5] * 31 + [False]]] * 3]),
         {}, 400, "true/false are BOOL values"),
        ("data and binary_data_size both", *_both(), 400,
         "both 'data' and parameters.binary_data_size are given; send the tensor one way"),
        ("binary_data_size -5", *_binary([1, 3, 32, 32], -5, 12288), 400,
         "binary_data_size must be a non-negative integer (a byte count), got -5"),
        ("binary_data_size 'abc'", *_binary([1, 3, 32, 32], "abc", 12288), 400,
         "binary_data_size must be a non-negative integer (a byte count), got 'abc'"),
        ("binary_data_size 1.5", *_binary([1, 3, 32, 32], 1.5, 12288), 400,
         "binary_data_size must be a non-negative integer (a byte count), got 1.5"),
    ]


def _both() -> tuple[bytes, dict[str, str]]:
    """One input with JSON data and binary bytes: which of the two would the model run?"""
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                   "data": [0.5] * 3072, "parameters": {"binary_data_size": 12288}}]}).encode()
    return head + b"\0" * 12288, {HEADER_LENGTH: str(len(head))}


def _assert_one_line_error(resp: httpx.Response, status: int, message: str) -> None:
    assert resp.status_code == status, resp.text[:500]
    assert "\n" not in resp.text.strip() and len(resp.text) < 1000, resp.text[:500]
    doc = resp.json()
    assert list(doc) == ["error"] and message in doc["error"], doc


def _assert_still_serving(server: BackgroundServer, reference: ort.InferenceSession, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want = reference.run(None, {"input": x})[0]
    for binary in (True, False):
        body, head_len = encode_request({"input": x}, ["logits"], binary=binary)
        headers = {HEADER_LENGTH: str(head_len)} if head_len else {}
        resp = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text[:500]
        got = decode_response(resp.content, resp.headers.get(HEADER_LENGTH))["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_hostile_request_is_a_4xx_with_one_line_json(server: BackgroundServer, reference: ort.InferenceSession,
                                                     case: tuple[str, bytes, dict[str, str], int, str]) -> None:
    _what, body, headers, status, message = case
    resp = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=60)
    _assert_one_line_error(resp, status, message)
    _assert_still_serving(server, reference)


def test_decoding_alone_refuses_overflows() -> None:
    """Without the model's checks (``check=None``) the protocol layer still refuses what would overflow."""
    cases = [
        (_json([2**40, 3, 32, 32], [0.0]), None, "more than a JSON body"),
        (*_binary([2**54 + 1, 3, 32, 32], 16), "is too large"),
        (_json([2], [10**400, 1], "INT64"), None, "integers beyond 64 bits"),
        (_json([1], [2**63], "INT64"), None, "INT64 values"),
        (_json([1], [300], "UINT8"), None, "out of bounds for uint8"),
        (_json([1] * 33, [1.0]), None, "at most 32"),
    ]
    for body, headers, message in cases:
        with pytest.raises(RequestError, match=re.escape(message)) as info:
            decode_request(body, (headers or {}).get(HEADER_LENGTH))
        assert info.value.status == 400
    ok = decode_request(_json([1, 2], [1, -2], "INT64"), None)
    assert ok.inputs["input"].tolist() == [[1, -2]]


def test_true_false_only_for_bool_and_true_elsewhere_in_the_json_is_fine() -> None:
    """true/false are refused as numbers (INT64 too), taken for BOOL, and a ``true`` outside the data (asking for
    binary outputs) does not make float data suspect."""
    with pytest.raises(RequestError, match="INT64 values: true/false are BOOL values"):
        decode_request(_json([2], [1, True], "INT64"), None)
    assert decode_request(_json([2], [True, False], "BOOL"), None).inputs["input"].tolist() == [True, False]
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "data": [0.5, 1]}],
           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    req = decode_request(json.dumps(doc).encode(), None)
    assert req.inputs["input"].tolist() == [0.5, 1.0] and req.binary_outputs == {"logits"}


def test_non_numeric_content_length_is_a_json_error(server: BackgroundServer, reference: ort.InferenceSession) -> None:
    """uvicorn's HTTP parser refuses it before the app runs: the answer is still the one-line JSON error."""
    host, port = server.url.removeprefix("http://").split(":")
    for value in ("abc", "-5", "1e3", "99999999999999999999999"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n{{}}"
                         .encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), raw[:300]
        doc = json.loads(body)
        assert list(doc) == ["error"] and doc["error"].startswith("malformed HTTP request: ")
        assert "Content-Length" in doc["error"], doc
    _assert_still_serving(server, reference)


def test_chunked_body_over_the_limit_is_a_413(server: BackgroundServer, reference: ort.InferenceSession) -> None:
    """No Content-Length to refuse early: the server stops reading at the limit."""
    chunk = b"0" * 65536

    def chunks() -> Iterator[bytes]:
        for _ in range(LIMIT // len(chunk) + 2):
            yield chunk

    try:
        resp = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=chunks(), timeout=60)
    except httpx.TransportError:  # the server may answer and close before the upload ends
        pass
    else:
        _assert_one_line_error(resp, 413, "exceeds the server's limit")
    _assert_still_serving(server, reference)


def _metric(server: BackgroundServer, line_start: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def test_client_gone_mid_body_is_a_disconnect_not_an_error(server: BackgroundServer,
                                                           reference: ort.InferenceSession) -> None:
    key = f'onnxkit_inference_disconnects_total{{model="{MODEL}"}}'
    before = _metric(server, key)
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                         .encode() + b'{"inputs": [' + b" " * 1000)
    deadline = time.monotonic() + 10
    while _metric(server, key) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, key) == before + 3
    assert _metric(server, f'onnxkit_inference_errors_total{{code="500",model="{MODEL}"}}') == 0
    _assert_still_serving(server, reference)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_large_bodies_are_not_kept(tiny_artifacts: Path, reference: ort.InferenceSession) -> None:
    """A `serve` process of its own (its RSS alone), limit 64 MiB: 50 MB bodies are refused by Content-Length
    above the limit, or read, parsed and refused (batch 1600 > 8) below it; the memory goes back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "cli.py"), "serve", str(tiny_artifacts), "--port", str(port),
           "--max-body-mb", "64", "--no-ort-spinning"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url, proc)
        x = np.zeros((1, 3, 32, 32), np.float32)
        good, head_len = encode_request({"input": x}, ["logits"])
        for _ in range(5):
            httpx.post(f"{url}/v2/models/{MODEL}/infer", content=good, headers={HEADER_LENGTH: str(head_len)})
        before = _rss_mb(proc.pid)
        rows = (50 << 20) // (3072 * 10)  # about 50 MB of JSON at ~10 bytes a value
        parsed = (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[%d,3,32,32],"data":[' % rows
                  + b",".join([b"0.123456789"] * (rows * 3072)) + b"]}]}")
        for body, status, message in ((b"1" * (70 << 20), 413, "exceeds the server's limit"),
                                      (parsed, 400, f"batch {rows} exceeds"), (parsed, 400, f"batch {rows} exceeds")):
            resp = httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, timeout=120)
            _assert_one_line_error(resp, status, message)
        assert _rss_mb(proc.pid) - before < 40, (before, _rss_mb(proc.pid))
        resp = httpx.post(f"{url}/v2/models/{MODEL}/infer", content=good, headers={HEADER_LENGTH: str(head_len)})
        got = decode_response(resp.content, resp.headers.get(HEADER_LENGTH))["logits"]
        np.testing.assert_allclose(got, reference.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not become ready")
