"""`serve` against clients that hold connections (issue 33): requests whose headers or body never arrive in full,
connections that send nothing, and more connections than the server takes. Each is closed within its timeout (a
408 JSON error where a request had begun), and good requests are answered all the while."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.protocol import HEADER_LENGTH, decode_response, encode_request
from serving.served import ServeConfig
from serving.server import BackgroundServer

MODEL = "tiny_cnn_opt"
READ_S = 2.0
IDLE_S = 2.0
SLACK_S = 4.0  # the most a close may come after its deadline on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServeConfig(artifact_dir=tiny_artifacts, port=0, read_timeout_s=READ_S,
                                      keep_alive_s=IDLE_S)) as srv:
        yield srv


def _address(server: BackgroundServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _good_request(server: BackgroundServer, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
    body, head_len = encode_request({"input": x}, ["logits"])
    resp = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers={HEADER_LENGTH: str(head_len)},
                      timeout=30)
    assert resp.status_code == 200, resp.text[:300]
    assert decode_response(resp.content, resp.headers.get(HEADER_LENGTH))["logits"].shape == (1, 10)


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """What the server sends until it closes the connection; fails if it is still open at ``deadline``."""
    out = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"connection still open {SLACK_S} s after its timeout; got {out[:200]!r}") from None
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def _json_error(raw: bytes, status: int) -> str:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), raw[:300]
    doc = json.loads(body)
    assert list(doc) == ["error"] and b"\n" not in body, body
    return str(doc["error"])


def test_stalled_connections_are_closed_while_good_requests_are_answered(server: BackgroundServer) -> None:
    """300 connections: 100 send nothing, 100 stop inside their headers, 100 send a body shorter than their
    Content-Length. Good requests are answered while they hang; each is closed within its timeout, the begun
    requests with a 408 JSON error; nothing is left in flight."""
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
            + b'{"inputs": [')
    kinds = {"idle": b"", "headers": f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-".encode(),
             "body": head}
    stalled: list[tuple[str, socket.socket, float]] = []
    try:
        for i in range(300):
            kind = list(kinds)[i % 3]
            sock = socket.create_connection(_address(server), timeout=10)
            sock.sendall(kinds[kind])
            stalled.append((kind, sock, time.monotonic()))
        opened = stalled[-1][2]
        for seed in range(5):
            _good_request(server, seed)
        assert time.monotonic() - stalled[0][2] < READ_S, "the good requests took longer than the timeouts"
        for kind, sock, t0 in stalled:
            raw = _read_until_closed(sock, t0 + (IDLE_S if kind == "idle" else READ_S) + SLACK_S)
            if kind == "idle":
                assert raw == b""
            else:
                assert "did not arrive in full within 2 s (serve --read-timeout-s)" in _json_error(raw, 408)
        assert time.monotonic() - opened < max(READ_S, IDLE_S) + SLACK_S
    finally:
        for _, sock, _ in stalled:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _in_flight(server) != 0:
        time.sleep(0.05)
    assert _in_flight(server) == 0
    _good_request(server, 99)


def _in_flight(server: BackgroundServer) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("onnxkit_inference_requests_in_flight "):
            return float(line.split()[-1])
    raise AssertionError("no in-flight gauge")


def test_a_trickle_does_not_keep_a_request_alive(server: BackgroundServer) -> None:
    """Bytes that keep coming, but never complete the request (one header line, or a CRLF before any request,
    every 0.3 s), do not reset the timeouts."""
    for first, drip, status in ((b"GET /v2 HTTP/1.1\r\n", b"X-A: b\r\n", 408), (b"", b"\r\n", None)):
        with socket.create_connection(_address(server), timeout=10) as sock:
            t0 = time.monotonic()
            sock.sendall(first)
            closed = False
            while time.monotonic() - t0 < READ_S + SLACK_S:
                try:
                    sock.sendall(drip)
                except OSError:
                    closed = True
                    break
                sock.settimeout(0.3)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if status is not None:
                    assert "did not arrive in full" in _json_error(data, status)
                closed = True
                break
            assert closed, f"a trickle of {drip!r} kept the connection open past {READ_S + SLACK_S} s"


def test_keep_alive_connection_is_closed_when_idle_and_serves_until_then(server: BackgroundServer) -> None:
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            assert client.get(f"{server.url}/v2/health/live").status_code == 200
    with socket.create_connection(_address(server), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(IDLE_S / 4)
        t0 = time.monotonic()
        raw = _read_until_closed(sock, t0 + IDLE_S + SLACK_S)
        assert raw.startswith(b"HTTP/1.1 200 ") and b"408" not in raw


def test_connections_over_the_cap_get_a_503_json_error(tiny_artifacts: Path) -> None:
    cap = 4
    with BackgroundServer(ServeConfig(artifact_dir=tiny_artifacts, port=0, max_connections=cap)) as srv:
        held = []
        try:
            for _ in range(cap):  # open and answered once: surely counted by the server, then idle
                sock = socket.create_connection(_address(srv), timeout=10)
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
                held.append(sock)
            with socket.create_connection(_address(srv), timeout=10) as extra:
                message = _json_error(_read_until_closed(extra, time.monotonic() + 10), 503)
            assert f"{cap} connections open, its limit (serve --max-connections)" in message
            held.pop().close()
            deadline = time.monotonic() + 10
            while True:  # the freed slot is reusable once the server has seen the close
                try:
                    resp = httpx.get(f"{srv.url}/v2/health/live", timeout=10)
                except httpx.TransportError:
                    resp = None
                if resp is not None and resp.status_code == 200:
                    break
                assert time.monotonic() < deadline, "a freed connection slot was not reused"
                time.sleep(0.05)
        finally:
            for sock in held:
                sock.close()


def test_config_refuses_bad_limits(tiny_artifacts: Path) -> None:
    from pydantic import ValidationError

    cfg = ServeConfig(artifact_dir=tiny_artifacts, read_timeout_s=0.5, keep_alive_s=90, max_connections=1)
    assert (cfg.read_timeout_s, cfg.keep_alive_s, cfg.max_connections) == (0.5, 90, 1)
    for bad in ({"read_timeout_s": 0}, {"keep_alive_s": -1}, {"max_connections": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ServeConfig(artifact_dir=tiny_artifacts, **bad)  # type: ignore[arg-type]
