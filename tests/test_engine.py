"""TensorRT engines (convert/engine.py): everything around TensorRT runs here; building and running
an engine runs only where TensorRT and a GPU are (``@pytest.mark.trt``).

The plan files written by the CPU tests hold placeholder bytes: they exercise the manifest and the
refusal logic, never stand in for an engine's results.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from convert import engine as eng
from convert.engine import EngineConfig, TrtEnv
from convert.quantize import CalibConfig
from core.errors import BackendUnavailableError, InputError
from core.iospec import IOSpec, TensorSpec
from core.manifest import Artifact, Manifest, SourceInfo
from tests.conftest import TINY

HERE = TrtEnv(tensorrt_version="10.3.0", gpu_name="NVIDIA L4", compute_capability="8.9")
IMAGE = IOSpec.for_image_model((1, 3, 32, 32))
PLACEHOLDER = b"placeholder bytes, not a TensorRT engine"


def onnx_artifact(name: str = "opt", precision: str = "fp32", **params: object) -> Artifact:
    return Artifact.model_validate({"name": name, "kind": "onnx", "precision": precision, "step": "optimize",
                                    "params": params, "file": {"path": f"{name}.onnx", "sha256": "0" * 64,
                                                               "size_bytes": 1}})


def plan_manifest(tmp_path: Path, env: TrtEnv = HERE, batches: tuple[int, int, int] = (1, 8, 32)) -> Manifest:
    """A manifest with a plan artifact recorded the way ``step_engine`` records one."""
    plan = tmp_path / eng.PLAN_NAME
    plan.write_bytes(PLACEHOLDER)
    manifest = Manifest(source=SourceInfo(model="tiny", kind="factory"), iospec=IMAGE)
    cfg = EngineConfig(fp16=True, min_batch=batches[0], opt_batch=batches[1], max_batch=batches[2])
    flags = eng.build_flags(cfg, onnx_artifact(), IMAGE)
    extra = eng.engine_extra(env, flags, "will be checked", eng.compute_profile(cfg, IMAGE))
    art = manifest.record(tmp_path, plan, name="trt_fp16", kind="plan", precision="fp16", step="build_engine",
                          params=flags, parent="opt", extra=extra)
    art.extra["engine_sha256"] = art.file.sha256
    manifest.save(tmp_path)
    return manifest


# -- optimization profile ---------------------------------------------------------------------
def test_profile_defaults_and_flags() -> None:
    assert eng.profile_batches(EngineConfig(), IMAGE) == (1, 8, 32)
    assert eng.profile_batches(EngineConfig(max_batch=4), IMAGE) == (1, 4, 4)
    assert eng.profile_batches(EngineConfig(min_batch=2, opt_batch=16, max_batch=64), IMAGE) == (2, 16, 64)
    assert eng.profile_batches(EngineConfig(min_batch=64), IMAGE) == (64, 64, 64)
    with pytest.raises(InputError, match="min-batch <= --opt-batch <= --max-batch"):
        eng.profile_batches(EngineConfig(opt_batch=64, max_batch=32), IMAGE)


def test_profile_shapes_follow_the_iospec() -> None:
    spec = IOSpec(inputs=[TensorSpec(name="image", shape=["batch", 3, 16, 16]),
                          TensorSpec(name="mask", shape=["batch", 16], dtype="int64")])
    prof = eng.compute_profile(EngineConfig(min_batch=1, opt_batch=4, max_batch=8), spec)
    assert prof == {"image": {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [8, 3, 16, 16]},
                    "mask": {"min": [1, 16], "opt": [4, 16], "max": [8, 16]}}
    seq = IOSpec(inputs=[TensorSpec(name="tokens", shape=["batch", "seq"], dtype="int64")])
    with pytest.raises(InputError, match="only the batch may be dynamic"):
        eng.compute_profile(EngineConfig(), seq)


def test_static_batch_pins_the_profile() -> None:
    static = IOSpec.for_image_model((4, 3, 32, 32), dynamic_batch=False)
    assert eng.profile_batches(EngineConfig(), static) == (4, 4, 4)
    assert eng.profile_batches(EngineConfig(max_batch=4), static) == (4, 4, 4)
    with pytest.raises(InputError, match="fixed batch of 4"):
        eng.profile_batches(EngineConfig(max_batch=8), static)


# -- builder configuration --------------------------------------------------------------------
def test_config_kwargs_fp16_workspace_level_and_timing_cache(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    cfg = EngineConfig(fp16=True, workspace_mb=1024, builder_opt_level=5, max_batch=16)
    kw = eng.config_kwargs(cfg, IMAGE, onnx_artifact(), timing_cache=cache)
    assert kw == {"profiles": [{"input": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}}],
                  "fp16": True, "int8": False, "sparse_weights": False,
                  "memory_pool_limits": {"WORKSPACE": 1024 * 2**20}, "builder_optimization_level": 5}
    cache.write_bytes(b"")
    assert "load_timing_cache" not in eng.config_kwargs(cfg, IMAGE, onnx_artifact(), timing_cache=cache)
    cache.write_bytes(b"cache")
    assert eng.config_kwargs(cfg, IMAGE, onnx_artifact(), timing_cache=cache)["load_timing_cache"] == str(cache)


def test_config_kwargs_int8_calibrated_explicit_and_sparse() -> None:
    calibrator = object()
    int8 = EngineConfig(int8=True, calib=CalibConfig(data="synthetic"))
    kw = eng.config_kwargs(int8, IMAGE, onnx_artifact(), calibrator=calibrator)
    assert kw["int8"] is True and kw["calibrator"] is calibrator and kw["fp16"] is False
    qdq = onnx_artifact("int8_static", precision="int8")
    kw = eng.config_kwargs(EngineConfig(source="int8_static"), IMAGE, qdq)
    assert kw["int8"] is True and "calibrator" not in kw
    with pytest.raises(InputError, match="calibrator"):
        eng.config_kwargs(EngineConfig(source="int8_static", int8=True), IMAGE, qdq, calibrator=calibrator)
    sparse = onnx_artifact("sparse24", sparsity="2:4")
    assert eng.config_kwargs(EngineConfig(fp16=True, source="sparse24"), IMAGE, sparse)["sparse_weights"] is True
    flags = eng.build_flags(EngineConfig(fp16=True, int8=True, calib=CalibConfig(data="x")), onnx_artifact(), IMAGE)
    assert flags["int8_mode"] == "calibrated" and flags["calibrator"] == "entropy2"
    assert eng.engine_precision(flags) == "int8"
    assert eng.engine_precision(eng.build_flags(EngineConfig(source="int8_static"), qdq, IMAGE)) == "int8"
    assert eng.engine_precision(eng.build_flags(EngineConfig(fp16=True), onnx_artifact(), IMAGE)) == "fp16"


def test_create_config_builds_polygraphy_objects() -> None:
    """Polygraphy's CreateConfig and Profile are plain Python until the build: checked here."""
    pytest.importorskip("polygraphy")
    kw = eng.config_kwargs(EngineConfig(fp16=True, builder_opt_level=2, max_batch=16), IMAGE,
                           onnx_artifact("sparse24", sparsity="2:4"))
    cfg = eng.create_config(kw)
    assert type(cfg).__name__ == "CreateConfig"
    assert cfg.fp16 is True and cfg.int8 is False and cfg.sparse_weights is True
    assert cfg.builder_optimization_level == 2 and cfg.memory_pool_limits is None
    shapes = cfg.profiles[0]["input"]
    assert (shapes.min, shapes.opt, shapes.max) == ((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))


def test_requests_that_cannot_work_are_refused_before_any_work() -> None:
    with pytest.raises(InputError, match="needs calibration data"):
        eng.check_request(EngineConfig(int8=True), onnx_artifact())
    state = onnx_artifact("torch").model_copy(update={"kind": "state_dict"})
    with pytest.raises(InputError, match="builds from an ONNX artifact"):
        eng.check_request(EngineConfig(), state)
    with pytest.raises(InputError, match="--min-batch 16, --max-batch 8"):
        eng.preflight(EngineConfig(min_batch=16, max_batch=8))
    with pytest.raises(InputError, match="--calib SOURCE"):
        eng.preflight(EngineConfig(int8=True))
    with pytest.raises(InputError, match="--calib SOURCE"):
        eng.preflight(EngineConfig(int8=True, calib=CalibConfig()))


def test_missing_tensorrt_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eng, "tensorrt_installed", lambda: False)
    assert "pip install .[trt]" in (eng.tensorrt_problem() or "")
    with pytest.raises(BackendUnavailableError, match=r"needs TensorRT and an NVIDIA GPU.*pip install \.\[trt\]"):
        eng.preflight(EngineConfig(fp16=True))


# -- manifest fields and refusal of mismatched engines ----------------------------------------------
def test_manifest_records_what_the_engine_is_tied_to(tmp_path: Path) -> None:
    plan_manifest(tmp_path)
    art = Manifest.load(tmp_path).artifacts["trt_fp16"]
    assert art.kind == "plan" and art.precision == "fp16" and art.parent == "opt"
    assert art.extra["tensorrt_version"] == "10.3.0" and art.extra["gpu_name"] == "NVIDIA L4"
    assert art.extra["compute_capability"] == "8.9" and art.extra["engine_sha256"] == art.file.sha256
    flags = art.extra["build_flags"]
    assert flags["fp16"] is True and flags["int8"] is False and flags["sparse_weights"] is False
    assert (flags["min_batch"], flags["opt_batch"], flags["max_batch"]) == (1, 8, 32)
    assert art.extra["profile"]["input"]["max"] == [32, 3, 32, 32]
    assert eng.recorded_env(art) == HERE and eng.batch_range(art) == (1, 32)


@pytest.mark.parametrize("other,differs", [
    (TrtEnv(tensorrt_version="10.3.0", gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0"), "A100"),
    (TrtEnv(tensorrt_version="10.7.0", gpu_name="NVIDIA L4", compute_capability="8.9"), "TensorRT 10.7.0"),
])
def test_engine_from_another_gpu_or_tensorrt_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        other: TrtEnv, differs: str) -> None:
    art = plan_manifest(tmp_path).artifacts["trt_fp16"]
    monkeypatch.setattr(eng, "current_trt_env", lambda: other)  # the "current machine"
    with pytest.raises(eng.EngineMismatchError) as exc:
        eng.load_engine(tmp_path, art)
    msg = str(exc.value)
    assert "was built for NVIDIA L4 (compute capability 8.9) with TensorRT 10.3.0" in msg
    assert f"this machine has {other.describe()}" in msg and differs in msg and "\n" not in msg
    monkeypatch.setattr(eng, "current_trt_env", lambda: HERE)
    assert eng.check_engine_file(tmp_path, art) == tmp_path / eng.PLAN_NAME


def test_corrupt_or_unrecorded_engine_is_refused(tmp_path: Path) -> None:
    art = plan_manifest(tmp_path).artifacts["trt_fp16"]
    (tmp_path / eng.PLAN_NAME).write_bytes(PLACEHOLDER[:10])
    with pytest.raises(eng.EngineMismatchError, match="does not match the manifest's sha256"):
        eng.load_engine(tmp_path, art, env=HERE)
    (tmp_path / eng.PLAN_NAME).unlink()
    with pytest.raises(eng.EngineMismatchError, match="is missing"):
        eng.load_engine(tmp_path, art, env=HERE)
    bare = art.model_copy(update={"extra": {}})
    with pytest.raises(eng.EngineMismatchError, match="no recorded tensorrt_version, gpu_name, compute_capability"):
        eng.check_engine_compat(bare, HERE)
    with pytest.raises(eng.EngineMismatchError, match="no recorded batch range"):
        eng.batch_range(bare)


# -- caches ----------------------------------------------------------------------------------------
def test_staged_copy_seeds_replaces_on_success_and_keeps_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "timing.cache"
    with eng.staged_copy(final) as work:
        assert work is not None and not work.exists() and work.parent != tmp_path
        work.write_bytes(b"v1")
        (work.parent / (work.name + ".lock")).write_bytes(b"")  # what Polygraphy leaves behind
    assert final.read_bytes() == b"v1" and sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache"]
    with pytest.raises(RuntimeError), eng.staged_copy(final) as work:
        assert work is not None and work.read_bytes() == b"v1"
        work.write_bytes(b"half")
        raise RuntimeError("build failed")
    assert final.read_bytes() == b"v1"
    with eng.staged_copy(None) as nothing:
        assert nothing is None


def test_calibration_cache_is_keyed_by_model_data_batch_algo_and_version(tmp_path: Path) -> None:
    base = dict(out=tmp_path, onnx_sha256="a" * 64, source_digest="d1", batch=8, algo="entropy2",
                trt_version="10.3.0")
    first = eng.calibration_cache_path(**base)  # type: ignore[arg-type]
    assert first == eng.calibration_cache_path(**base)  # type: ignore[arg-type]
    assert first.parent == tmp_path and first.name.startswith("calib.") and first.suffix == ".cache"
    for key, value in [("source_digest", "d2"), ("batch", 16), ("algo", "minmax"), ("trt_version", "10.4.0"),
                       ("onnx_sha256", "b" * 64)]:
        assert eng.calibration_cache_path(**(base | {key: value})) != first  # type: ignore[arg-type]


# -- the bench harness and the CLI ---------------------------------------------------------------------
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    res = runner.invoke(cli.app, list(args))
    return res.exit_code, res.output


def test_max_batch_smaller_than_bench_batch_is_refused(tmp_path: Path) -> None:
    from runtimes.harness import BenchConfig, check_engine_batches

    manifest = plan_manifest(tmp_path, batches=(1, 4, 8))
    check_engine_batches(manifest, BenchConfig(artifact_dir=tmp_path, backends=["trt"], batch_sizes=[1, 8]))
    check_engine_batches(manifest, BenchConfig(artifact_dir=tmp_path, backends=["ort"], batch_sizes=[64]))
    with pytest.raises(InputError, match=r"accepts batch 1\.\.8, but --batch-sizes asks for \[16\].*--max-batch 16"):
        check_engine_batches(manifest, BenchConfig(artifact_dir=tmp_path, backends=["trt"], batch_sizes=[1, 16]))
    code, text = invoke("bench", str(tmp_path), "--backends", "trt", "--device", "cuda", "--batch-sizes", "1,64")
    assert code == 2, text
    assert "accepts batch 1..8" in text and "[64]" in text and text.strip().count("\n") == 0, text


@pytest.mark.skipif(eng.tensorrt_problem() is None, reason="TensorRT and a GPU are present here")
def test_cli_trt_without_tensorrt_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "never"
    code, text = invoke("convert", f"{TINY}:build", "--trt", "--out", str(out))
    assert code == 3, text
    assert "pip install .[trt]" in text and "GPU" in text and text.strip().count("\n") == 0, text
    assert not out.exists()


def test_cli_trt_bad_batch_flags_are_one_line(tmp_path: Path) -> None:
    code, text = invoke("convert", f"{TINY}:build", "--trt", "--min-batch", "16", "--max-batch", "8",
                        "--out", str(tmp_path / "never"))
    assert code == 2 and "--min-batch <= --opt-batch <= --max-batch" in text, text
    assert text.strip().count("\n") == 0 and not (tmp_path / "never").exists()


# -- on a machine with TensorRT and a GPU -------------------------------------------------------------------
@pytest.mark.trt
def test_build_fp16_engine_records_and_reloads(tmp_path: Path) -> None:
    from convert.pipeline import ConvertConfig, ExportConfig, run_convert

    out = tmp_path / "tiny"
    cfg = ConvertConfig(export=ExportConfig(model=f"{TINY}:build"), out=out,
                        engine=EngineConfig(fp16=True, max_batch=8, builder_opt_level=1))
    manifest, _ = run_convert(cfg, log=lambda _m: None)
    art = manifest.artifacts["trt_fp16"]
    here = eng.current_trt_env()
    assert art.status == "ok" and (out / eng.PLAN_NAME).is_file() and (out / "timing.cache").is_file()
    assert eng.recorded_env(art) == here and art.extra["engine_sha256"] == art.file.sha256
    assert min(v["cosine"] for v in art.metrics["parity"].values()) > 0.999
    engine = eng.load_engine(out, art)
    assert engine.get_tensor_profile_shape("input", 0)[2] == (8, 3, 32, 32)
    (out / eng.PLAN_NAME).write_bytes(b"\0" * 64)  # recorded hash matches, bytes are garbage
    garbage = manifest.record(out, out / eng.PLAN_NAME, name="garbage", kind="plan", step="test", extra=art.extra)
    with pytest.raises(eng.EngineMismatchError, match="could not deserialize"):
        eng.load_engine(out, garbage)


@pytest.mark.trt
def test_int8_engine_writes_then_reuses_the_calibration_cache(tmp_path: Path) -> None:
    from convert.pipeline import ConvertConfig, ExportConfig, run_convert

    out = tmp_path / "tiny"
    engine_cfg = EngineConfig(int8=True, calib=CalibConfig(data="synthetic", size=32), max_batch=8,
                              builder_opt_level=0)
    cfg = ConvertConfig(export=ExportConfig(model=f"{TINY}:build"), out=out, engine=engine_cfg)
    first = run_convert(cfg, log=lambda _m: None)[0].artifacts["trt_int8"].extra["calibration"]
    assert first["cache_reused"] is False and (out / first["cache"]).stat().st_size > 0
    assert first["batches"] == 4 and first["batch_size"] == 8
    second = run_convert(cfg, log=lambda _m: None)[0].artifacts["trt_int8"].extra["calibration"]
    assert second["cache_reused"] is True and second["cache"] == first["cache"]
