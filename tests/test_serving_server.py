"""`serve`: the real tritonclient.http client against the tiny model on loopback, bad requests, metrics,
micro-batching, and a bounded 16-client load test."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http

from core.manifest import Manifest
from serving.batching import MicroBatcher
from serving.loadtest import LoadTestConfig, run_loadtest
from serving.protocol import HEADER_LENGTH, encode_request
from serving.served import ServeConfig
from serving.server import BackgroundServer

MODEL = "tiny_cnn_opt"


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServeConfig(artifact_dir=tiny_artifacts, port=0, max_body_mb=1.0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_artifacts: Path) -> ort.InferenceSession:
    """ONNX Runtime run directly on the served file, outside the toolkit's runner."""
    path = tiny_artifacts / Manifest.load(tiny_artifacts).artifacts["opt"].file.path
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _client(server: BackgroundServer) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(server.url.removeprefix("http://"))


def _infer(client: triton_http.InferenceServerClient, x: np.ndarray, binary: bool = True) -> np.ndarray:
    inp = triton_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = None if binary else [triton_http.InferRequestedOutput("logits", binary_data=False)]
    return client.infer(MODEL, [inp], outputs=outputs).as_numpy("logits")


def test_tritonclient_talks_to_the_server(server: BackgroundServer, reference: ort.InferenceSession) -> None:
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_config(MODEL)["platform"] == "onnxruntime_onnx"
    rng = np.random.default_rng(0)
    for batch, binary in ((1, True), (3, True), (2, False)):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = _infer(client, x, binary)
        want = reference.run(None, {"input": x})[0]
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _bad_requests() -> list[tuple[str, dict[str, str], bytes, int, str]]:
    x = np.zeros((1, 3, 32, 32), np.float32)
    good, good_len = encode_request({"input": x}, ["logits"])
    small, small_len = encode_request({"input": np.zeros((1, 3, 16, 16), np.float32)}, ["logits"])
    f64, f64_len = encode_request({"input": x.astype(np.float64)}, ["logits"])
    renamed, renamed_len = encode_request({"image": x}, ["logits"])
    return [
        ("wrong shape", {HEADER_LENGTH: str(small_len)}, small, 400, "does not match"),
        ("wrong dtype", {HEADER_LENGTH: str(f64_len)}, f64, 400, "datatype FP64 but model"),
        ("wrong input name", {HEADER_LENGTH: str(renamed_len)}, renamed, 400, "takes inputs ['input']"),
        ("unknown model", {HEADER_LENGTH: str(good_len)}, good, 404, "unknown model 'nope'"),
        ("malformed JSON", {}, b'{"inputs": [', 400, "malformed JSON"),
        ("truncated binary", {HEADER_LENGTH: str(good_len)}, good[:-10], 400, "binary_data_size"),
        ("JSON data count", {}, json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                                        "data": [0.0] * 5}]}).encode(), 400, "needs 3072"),
        ("oversized body", {}, b"0" * (2 << 20), 413, "exceeds the server's limit"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_request_gets_a_4xx_and_the_server_keeps_serving(
        server: BackgroundServer, reference: ort.InferenceSession,
        case: tuple[str, dict[str, str], bytes, int, str]) -> None:
    what, headers, body, status, message = case
    model = "nope" if what == "unknown model" else MODEL
    resp = httpx.post(f"{server.url}/v2/models/{model}/infer", content=body, headers=headers, timeout=30)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_allclose(_infer(_client(server), x), reference.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)


def test_unknown_routes_and_models_are_404_json(server: BackgroundServer) -> None:
    assert httpx.get(f"{server.url}/v2/models/nope").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/nope/ready").status_code == 404
    resp = httpx.get(f"{server.url}/v3/whatever")
    assert resp.status_code == 404 and "error" in resp.json()


def test_metrics(server: BackgroundServer) -> None:
    body, header_len = encode_request({"input": np.zeros((1, 3, 32, 32), np.float32)}, ["logits"])
    ok = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers={HEADER_LENGTH: str(header_len)})
    assert ok.status_code == 200 and "infer;dur=" in ok.headers["server-timing"]
    httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"{", timeout=30)
    text = httpx.get(f"{server.url}/metrics").text
    assert f'onnxkit_inference_requests_total{{code="200",model="{MODEL}"}}' in text
    assert f'onnxkit_inference_errors_total{{code="400",model="{MODEL}"}}' in text
    assert f'onnxkit_inference_request_duration_seconds_bucket{{le="0.005",model="{MODEL}"}}' in text
    assert "onnxkit_inference_requests_in_flight 0.0" in text
    assert "onnxkit_batch_rows_count" in text


def test_load_test_16_clients_zero_errors_all_correct(server: BackgroundServer,
                                                     reference: ort.InferenceSession) -> None:
    cfg = LoadTestConfig(url=f"{server.url}/v2/models/{MODEL}", concurrency=16, duration_s=2.0, warmup_s=0.3,
                         max_requests=3000, timeout_s=20)
    results = run_loadtest(cfg, reference=lambda feed: reference.run(None, feed), log=lambda _m: None)
    assert results.kind == "loadtest" and not results.warnings
    (rec,) = results.records
    assert rec.backend == "http" and rec.variant == "opt" and rec.batch_size == 1
    assert rec.extra["errors"] == 0 and rec.extra["incorrect"] == 0
    assert rec.extra["checked"] == rec.extra["requests"] >= 16
    assert rec.accuracy is not None and rec.accuracy.max_abs_err < 1e-4
    assert len(rec.extra["overhead_ms_p50_p90_p99"]) == 3  # from the server's Server-Timing header
    assert rec.latency_ms.p50 <= rec.latency_ms.p90 <= rec.latency_ms.p99
    assert rec.throughput > 0


# -- the micro-batcher alone (deterministic: no network, no timing races) ---------------------------
def _double(calls: list[int]) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    def infer(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        calls.append(len(feed["x"]))
        return [feed["x"] * 2]
    return infer


async def _submit_all(batcher: MicroBatcher, values: list[float]) -> list[np.ndarray]:
    batcher.start()
    try:
        outs = await asyncio.gather(*(batcher.submit({"x": np.full((1, 2), v, np.float32)}) for v in values))
    finally:
        await batcher.stop()
    return [o.outputs[0] for o in outs]


def test_micro_batcher_groups_concurrent_requests_and_splits_results() -> None:
    calls: list[int] = []
    batcher = MicroBatcher(infer=_double(calls), max_batch=4, max_delay_s=0.05, batchable=True)
    outs = asyncio.run(_submit_all(batcher, [float(i) for i in range(10)]))
    assert calls == [4, 4, 2]
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, np.full((1, 2), 2.0 * i, np.float32))


def test_micro_batcher_off_runs_each_request_alone() -> None:
    calls: list[int] = []
    batcher = MicroBatcher(infer=_double(calls), max_batch=1, max_delay_s=0.05, batchable=False)
    asyncio.run(_submit_all(batcher, [1.0, 2.0, 3.0]))
    assert calls == [1, 1, 1]


def test_micro_batcher_does_not_wait_when_nothing_else_is_coming() -> None:
    calls: list[int] = []
    batcher = MicroBatcher(infer=_double(calls), max_batch=8, max_delay_s=5.0, batchable=True)
    t0 = time.perf_counter()
    asyncio.run(_submit_all(batcher, [1.0]))
    assert time.perf_counter() - t0 < 2.0, "a lone request must not wait out max_delay"
    assert calls == [1]


def test_micro_batcher_waits_for_company_after_a_shared_batch() -> None:
    """After a batch of several requests, the next waits (up to max_delay) for the other clients to come back."""
    calls: list[int] = []
    batcher = MicroBatcher(infer=_double(calls), max_batch=8, max_delay_s=1.0, batchable=True)

    async def scenario() -> None:
        batcher.start()
        try:
            one = {"x": np.ones((1, 2), np.float32)}
            await asyncio.gather(batcher.submit(one), batcher.submit(one))  # a shared batch of 2

            async def late() -> Any:
                await asyncio.sleep(0.05)
                return await batcher.submit(one)

            await asyncio.gather(batcher.submit(one), late())
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert calls == [2, 2]


def test_ort_spinning_reaches_the_session(tiny_artifacts: Path) -> None:
    from serving.served import load_model

    key = "session.intra_op.allow_spinning"
    off = load_model(ServeConfig(artifact_dir=tiny_artifacts, ort_spinning=False), log=lambda _m: None)
    assert off.runner.session.get_session_options().get_session_config_entry(key) == "0"
    on = load_model(ServeConfig(artifact_dir=tiny_artifacts), log=lambda _m: None)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # left at ONNX Runtime's default
        on.runner.session.get_session_options().get_session_config_entry(key)
