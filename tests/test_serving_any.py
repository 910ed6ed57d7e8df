"""Hand-off of a model with two int64 token inputs and a dynamic sequence: the Triton config, `serve`
answered by the real tritonclient (same answer as ONNX Runtime run locally), bad requests, a load test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http

from convert.config import ConvertConfig, ExportConfig
from convert.pipeline import run_convert
from serving.loadtest import LoadTestConfig, run_loadtest
from serving.served import ServeConfig
from serving.server import BackgroundServer

TRANSFORMER = f"{Path(__file__).resolve().parent / 'fixtures' / 'tiny_transformer.py'}:build"
MODEL = "tiny_transformer_opt"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tt")
    run_convert(ConvertConfig(export=ExportConfig(model=TRANSFORMER), out=out), log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def server(artifacts: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServeConfig(artifact_dir=artifacts, port=0)) as srv:
        yield srv


def test_triton_config_has_every_input_with_int64_and_dynamic_dims(artifacts: Path, tmp_path: Path) -> None:
    from serving.triton import PackageConfig, package

    _, repo = package(PackageConfig(artifact_dir=artifacts, out=tmp_path / "repo"), log=lambda _m: None)
    text = (repo / MODEL / "config.pbtxt").read_text()
    for name in ("input_ids", "attention_mask"):
        block = text[text.index(f'name: "{name}"'):]
        block = block[:block.index("}")]
        assert "TYPE_INT64" in block and "dims: -1" in block, block
    assert 'name: "embedding"' in text and "max_batch_size" in text


def _inputs(ids: np.ndarray, mask: np.ndarray) -> list[triton_http.InferInput]:
    out = []
    for name, arr in (("input_ids", ids), ("attention_mask", mask)):
        inp = triton_http.InferInput(name, list(arr.shape), "INT64")
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def test_tritonclient_gets_what_onnx_runtime_computes(server: BackgroundServer, artifacts: Path) -> None:
    from core.manifest import Manifest

    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                              {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
    sess = ort.InferenceSession(str(artifacts / Manifest.load(artifacts).artifacts["opt"].file.path),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 5), (3, 21)):  # any sequence length, not only the one bound at convert time
        ids = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
        mask = np.ones((batch, seq), np.int64)
        mask[:, seq - 2:] = 0
        got = client.infer(MODEL, _inputs(ids, mask)).as_numpy("embedding")
        want = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_token_requests_are_400(server: BackgroundServer) -> None:
    from tritonclient.utils import InferenceServerException

    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    ids = np.zeros((1, 8), np.int64)
    float_ids = triton_http.InferInput("input_ids", [1, 8], "FP32")
    float_ids.set_data_from_numpy(ids.astype(np.float32))
    cases = [_inputs(ids, np.ones((1, 7), np.int64)),  # the sequence differs between the two inputs
             _inputs(ids, np.ones((1, 8), np.int64))[:1],  # a missing input
             [float_ids, _inputs(ids, np.ones((1, 8), np.int64))[1]]]  # a float for an int64 input
    for inputs in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, inputs)
        assert err.value.status() == "400", err.value.message()


def test_loadtest_sends_token_inputs(server: BackgroundServer, artifacts: Path) -> None:
    res = run_loadtest(LoadTestConfig(url=server.url, concurrency=2, duration_s=1.0, warmup_s=0.0, max_requests=30,
                                      reference=artifacts), log=lambda _m: None)
    rec = res.records[0]
    assert rec.extra["errors"] == 0 and rec.extra["incorrect"] == 0 and rec.extra["requests"] > 0


def test_loadtest_needs_the_sequence_or_a_reference(server: BackgroundServer) -> None:
    from core.errors import InputError

    base = {"url": server.url, "concurrency": 1, "duration_s": 0.5, "warmup_s": 0.0, "max_requests": 5}
    with pytest.raises(InputError, match=r"input dim\(s\) dim1 are dynamic: give them values with --input-shape"):
        run_loadtest(LoadTestConfig(**base), log=lambda _m: None)
    res = run_loadtest(LoadTestConfig(**base, input_shape="input_ids:1x12,attention_mask:1x12"), log=lambda _m: None)
    assert res.records[0].extra["errors"] == 0


def _end_to_end(model: str, out: Path, feeds: list[dict[str, np.ndarray]], backends: list[str],
                **export: object) -> None:
    """convert (+ dynamic INT8) -> bench -> package -> serve, and tritonclient == ONNX Runtime on each feed."""
    from convert.config import QuantConfig
    from core.manifest import Manifest
    from runtimes.harness import BenchConfig, run_bench
    from serving.triton import PackageConfig, package

    run_convert(ConvertConfig(export=ExportConfig(model=model, **export), out=out,  # type: ignore[arg-type]
                              quant=QuantConfig(int8_dynamic=True)), log=lambda _m: None)
    manifest = Manifest.load(out)
    assert manifest.artifacts["int8_dynamic"].status == "ok"
    res = run_bench(BenchConfig(artifact_dir=out, backends=backends, batch_sizes=[1, 2], warmup=1, iters=2,
                                accuracy_samples=4), log=lambda _m: None)
    assert {r.variant for r in res.records} >= {"opt", "int8_dynamic"}
    _, repo = package(PackageConfig(artifact_dir=out, out=out.parent / f"{out.name}_repo"), log=lambda _m: None)
    assert list(repo.glob("*/config.pbtxt"))
    sess = ort.InferenceSession(str(out / manifest.artifacts["opt"].file.path), providers=["CPUExecutionProvider"])
    with BackgroundServer(ServeConfig(artifact_dir=out, port=0)) as srv:
        client = triton_http.InferenceServerClient(srv.url.removeprefix("http://"))
        name = client.get_model_repository_index()[0]["name"]
        for feed in feeds:
            inputs = []
            for n, arr in feed.items():
                inp = triton_http.InferInput(n, list(arr.shape), "FP32")
                inp.set_data_from_numpy(arr)
                inputs.append(inp)
            got = client.infer(name, inputs)
            for o, want in zip(manifest.iospec.output_names, sess.run(None, feed), strict=True):
                np.testing.assert_allclose(got.as_numpy(o), want, rtol=1e-5, atol=1e-5)


def test_symbolic_height_width_onnx_end_to_end(tmp_path: Path) -> None:
    from tests.fixtures import symbolic_hw

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, h, w)).astype(np.float32)} for h, w in ((32, 32), (20, 44))]
    _end_to_end(str(symbolic_hw.write(tmp_path / "hw.onnx")), tmp_path / "hw", feeds, ["ort"],
                input_shape=(1, 3, 32, 32))


def test_two_inputs_two_outputs_end_to_end(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feeds = [{"image": rng.standard_normal((b, 3, 16, 16)).astype(np.float32),
              "features": rng.standard_normal((b, 4)).astype(np.float32)} for b in (1, 3)]
    model = f"{Path(__file__).resolve().parent / 'fixtures' / 'two_io.py'}:build"
    _end_to_end(model, tmp_path / "two", feeds, ["eager", "ort"])
