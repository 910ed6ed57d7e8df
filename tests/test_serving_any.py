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


def test_json_tensors_with_two_int64_inputs(server: BackgroundServer, artifacts: Path) -> None:
    """Plain JSON (no binary extension): two int64 inputs answer what ONNX Runtime computes; a float where an
    int64 token id belongs is a 400 with a JSON error, never truncated to an id."""
    import httpx

    from core.manifest import Manifest

    rng = np.random.default_rng(1)
    ids, mask = rng.integers(0, 1000, (2, 9)).astype(np.int64), np.ones((2, 9), np.int64)

    def body(ids_data: list[object]) -> dict[str, object]:
        return {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [2, 9], "data": ids_data},
                           {"name": "attention_mask", "datatype": "INT64", "shape": [2, 9],
                            "data": mask.ravel().tolist()}]}

    url = f"{server.url}/v2/models/{MODEL}/infer"
    resp = httpx.post(url, json=body(ids.ravel().tolist()), timeout=30)
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    assert out["name"] == "embedding" and out["shape"] == [2, 64]
    sess = ort.InferenceSession(str(artifacts / Manifest.load(artifacts).artifacts["opt"].file.path),
                                providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(2, 64), want, rtol=1e-5, atol=1e-5)
    bad = httpx.post(url, json=body([0.5] * 18), timeout=30)
    assert bad.status_code == 400 and "INT64" in bad.json()["error"], bad.text


def test_micro_batching_joins_only_requests_of_one_sequence_length() -> None:
    import asyncio

    from serving.batching import MicroBatcher

    shapes: list[tuple[int, ...]] = []

    def infer(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        shapes.append(feed["input_ids"].shape)
        return [feed["input_ids"].sum(axis=1, keepdims=True) + feed["attention_mask"].sum(axis=1, keepdims=True)]

    feeds = [{"input_ids": np.full((1, seq), i, np.int64), "attention_mask": np.ones((1, seq), np.int64)}
             for i, seq in enumerate((5, 7, 5, 7, 5))]

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(infer=infer, max_batch=8, max_delay_s=0.05, batchable=True)
        batcher.start()
        try:
            done = await asyncio.gather(*(batcher.submit(f) for f in feeds))
        finally:
            await batcher.stop()
        return [d.outputs[0] for d in done]

    outs = asyncio.run(scenario())
    assert sorted(shapes) == [(2, 7), (3, 5)]
    for f, out in zip(feeds, outs, strict=True):
        seq = f["input_ids"].shape[1]
        assert out.tolist() == [[int(f["input_ids"][0, 0]) * seq + seq]]


def test_loadtest_spec_from_metadata_follows_names(server: BackgroundServer) -> None:
    import httpx

    from serving.protocol import spec_from_metadata

    spec = spec_from_metadata(httpx.get(f"{server.url}/v2/models/{MODEL}", timeout=30).json())
    assert [t.shape for t in spec.inputs] == [["batch", "dim1"], ["batch", "dim1"]]
    feed = spec.with_dims({"dim1": 6}).random_feed(3, seed=0)
    assert feed["input_ids"].dtype == np.int64 and 0 <= feed["input_ids"].min() <= feed["input_ids"].max() < 10
    assert (feed["attention_mask"] == 1).all() and feed["attention_mask"].shape == (3, 6)


def test_trt_profile_for_batch_and_sequence(artifacts: Path) -> None:
    """Every dynamic dim of every input gets a range; Polygraphy's own Profile takes it (TensorRT not needed)."""
    import convert.engine as eng
    import convert.trt_profile as tp
    from convert.config import EngineConfig
    from core.errors import InputError
    from core.manifest import Manifest

    spec = Manifest.load(artifacts).iospec
    assert spec.symbolic_dims() == ["batch", "sequence"] and spec.dims == {"sequence": 16}
    bound = tp.compute_profile(EngineConfig(max_batch=16), spec)
    assert bound["input_ids"] == bound["attention_mask"] == {"min": [1, 16], "opt": [8, 16], "max": [16, 16]}
    ranged = tp.compute_profile(EngineConfig(max_batch=16, dim_ranges={"sequence": (1, 64, 128)}), spec)
    assert ranged["attention_mask"] == {"min": [1, 1], "opt": [8, 64], "max": [16, 128]}
    config = eng.create_config({"profiles": [ranged], "tf32": True, "sparse_weights": False})
    (profile,) = config.profiles
    assert (profile["input_ids"].min, profile["input_ids"].opt, profile["input_ids"].max) == ((1, 1), (8, 64),
                                                                                             (16, 128))
    with pytest.raises(InputError, match=r"'sequence' has no value; give its range with --dim-range sequence="):
        tp.compute_profile(EngineConfig(), spec.model_copy(update={"dims": {}}))


def test_package_and_loadtest_from_the_cli(server: BackgroundServer, artifacts: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(root / "cli.py"), *args], capture_output=True, text=True,
                              timeout=120, cwd=root)

    proc = cli("package", str(artifacts), "--out", str(tmp_path / "repo"))
    assert proc.returncode == 0, proc.stderr
    assert "TYPE_INT64" in (tmp_path / "repo" / MODEL / "config.pbtxt").read_text()
    proc = cli("loadtest", f"{server.url}/v2/models/{MODEL}", "--concurrency", "2", "--duration", "1",
               "--warmup", "0", "--max-requests", "10", "--input-shape", "input_ids:1x12,attention_mask:1x12",
               "--out", str(tmp_path / "lt.json"))
    assert proc.returncode == 0, proc.stderr
    proc = cli("loadtest", f"{server.url}/v2/models/{MODEL}", "--duration", "1", "--input-shape",
               "input_ids:1x12,attention_mask:1x13")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "error: dim 'dim1' is bound to two values" in proc.stderr, proc.stderr


def test_input_shape_for_package_profile_and_serve(artifacts: Path, tmp_path: Path) -> None:
    """--input-shape on package (Triton's model_warmup; dims stay -1), profile (the profiled shapes) and serve
    (the start-up warm-up shapes); a batch above max_batch_size is one clear error."""
    from core.errors import InputError
    from runtimes.profile import ProfileConfig, run_profile
    from serving.served import load_model
    from serving.triton import PackageConfig, package
    from serving.triton_config import check_config, parse_config

    shapes = "input_ids:4x24,attention_mask:4x24"
    _, repo = package(PackageConfig(artifact_dir=artifacts, out=tmp_path / "repo", input_shape=shapes),
                      log=lambda _m: None)
    msg = parse_config(repo / MODEL / "config.pbtxt")
    assert [list(i.dims) for i in msg.input] == [[-1], [-1]]
    (warm,) = msg.model_warmup
    assert warm.batch_size == 4 and set(warm.inputs) == {"input_ids", "attention_mask"}
    assert all(list(v.dims) == [24] and v.zero_data for v in warm.inputs.values())
    assert check_config(msg, repo / MODEL) == []
    del warm.inputs["attention_mask"]
    assert "does not give every input a concrete shape" in " ".join(check_config(msg, repo / MODEL))
    with pytest.raises(InputError, match="batch of 16, above max_batch_size 8"):
        package(PackageConfig(artifact_dir=artifacts, out=tmp_path / "r2", input_shape=shapes.replace("4x", "16x")),
                log=lambda _m: None)
    assert not (tmp_path / "r2").exists()

    result = run_profile(ProfileConfig(artifact_dir=artifacts, batch_size=2, input_shape=shapes, warmup=0, iters=2,
                                       out=tmp_path / "p.trace.json"), log=lambda _m: None)
    assert result.input_shapes == {"input_ids": [2, 24], "attention_mask": [2, 24]}

    lines: list[str] = []
    served = load_model(ServeConfig(artifact_dir=artifacts, input_shape="input_ids:3x40,attention_mask:3x40"),
                        log=lines.append)
    served.runner.close()
    assert "warmed up at input_ids 3x40, attention_mask 3x40" in lines[-1]
