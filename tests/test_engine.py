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
from convert import trt_profile as tp
from convert.config import CalibConfig, EngineConfig, QuantConfig
from core.errors import BackendUnavailableError, InputError
from core.iospec import IOSpec, TensorSpec
from core.manifest import Artifact, Manifest, SourceInfo
from core.records import CopyParams, EngineParams, Fp16Params
from runtimes import trt as rtrt
from runtimes.trt import TrtEnv
from tests.conftest import TINY

HERE = TrtEnv(tensorrt_version="10.3.0", gpu_name="NVIDIA L4", compute_capability="8.9")
IMAGE = IOSpec.for_image_model((1, 3, 32, 32))
PLACEHOLDER = b"placeholder bytes, not a TensorRT engine"


def onnx_artifact(name: str = "opt", precision: str = "fp32", sparse: bool = False) -> Artifact:
    """An ONNX artifact record; ``sparse``: written by the 2:4 sparsity step."""
    params: dict[str, object] = {"step": "optimize", "steps": [], "nodes_before": 1, "nodes_after_slim": 1,
                                 "nodes_after": 1}
    if sparse:
        params = {"step": "sparsity", "exporter": "torchscript", "opset": 18, "method": "magnitude",
                  "group_axis": "input channels", "layers_pruned": 1, "layers_skipped": []}
    return Artifact.model_validate({"name": name, "kind": "onnx", "precision": precision, "params": params,
                                    "file": {"path": f"{name}.onnx", "sha256": "0" * 64, "size_bytes": 1}})


def plan_manifest(tmp_path: Path, env: TrtEnv = HERE, batches: tuple[int, int, int] = (1, 8, 32)) -> Manifest:
    """A manifest with a plan artifact recorded the way ``step_engine`` records one."""
    plan = tmp_path / eng.PLAN_NAME
    plan.write_bytes(PLACEHOLDER)
    manifest = Manifest(source=SourceInfo(model="tiny", kind="factory"), iospec=IMAGE)
    cfg = EngineConfig(fp16=True, min_batch=batches[0], opt_batch=batches[1], max_batch=batches[2])
    params = eng.engine_params(cfg, onnx_artifact("fp16", precision="fp16"), IMAGE)
    build = eng.engine_build(env, "will be checked", tp.compute_profile(cfg, IMAGE))
    art = manifest.record(tmp_path, plan, name="trt_fp16", kind="plan", precision="fp16", params=params,
                          parent="fp16", engine=build)
    assert art.engine is not None
    art.engine.engine_sha256 = art.file.sha256
    manifest.save(tmp_path)
    return manifest


# -- optimization profile ---------------------------------------------------------------------
def test_profile_defaults_and_flags() -> None:
    assert tp.profile_batches(EngineConfig(), IMAGE) == (1, 8, 32)
    assert tp.profile_batches(EngineConfig(max_batch=4), IMAGE) == (1, 4, 4)
    assert tp.profile_batches(EngineConfig(min_batch=2, opt_batch=16, max_batch=64), IMAGE) == (2, 16, 64)
    assert tp.profile_batches(EngineConfig(min_batch=64), IMAGE) == (64, 64, 64)
    with pytest.raises(InputError, match="min-batch <= --opt-batch <= --max-batch"):
        tp.profile_batches(EngineConfig(opt_batch=64, max_batch=32), IMAGE)


def test_profile_shapes_follow_the_iospec() -> None:
    spec = IOSpec(inputs=[TensorSpec(name="image", shape=["batch", 3, 16, 16]),
                          TensorSpec(name="mask", shape=["batch", 16], dtype="int64")])
    prof = tp.compute_profile(EngineConfig(min_batch=1, opt_batch=4, max_batch=8), spec)
    assert prof == {"image": {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [8, 3, 16, 16]},
                    "mask": {"min": [1, 16], "opt": [4, 16], "max": [8, 16]}}
    seq = IOSpec(inputs=[TensorSpec(name="tokens", shape=["batch", "seq"], dtype="int64"),
                         TensorSpec(name="mask", shape=["batch", "seq"], dtype="int64")])
    with pytest.raises(InputError, match=r"the dim 'seq' has no value; give its range with --dim-range seq=MIN:OPT:MAX"):
        tp.compute_profile(EngineConfig(), seq)
    # every dynamic dim of every input: the sequence from --dim-range, else its bound value throughout
    ranged = tp.compute_profile(EngineConfig(max_batch=8, dim_ranges={"seq": (1, 64, 128)}), seq)
    assert ranged["tokens"] == ranged["mask"] == {"min": [1, 1], "opt": [8, 64], "max": [8, 128]}
    assert tp.compute_profile(EngineConfig(max_batch=8), seq.with_dims({"seq": 16}))["mask"] == \
        {"min": [1, 16], "opt": [8, 16], "max": [8, 16]}
    assert tp.parse_dim_ranges("seq=1:64:128, height=8:8:16") == {"seq": (1, 64, 128), "height": (8, 8, 16)}
    for text in ("seq=1:64", "seq", "=1:2:3", "seq=a:b:c"):
        with pytest.raises(InputError, match="malformed --dim-range"):
            tp.parse_dim_ranges(text)
    for bad, message in [({"seq": (4, 2, 8)}, "min <= opt <= max"), ({"height": (1, 2, 3)}, "unknown dim")]:
        with pytest.raises(InputError, match=message):
            tp.compute_profile(EngineConfig(dim_ranges=bad), seq.with_dims({"seq": 16}))


def test_static_batch_pins_the_profile() -> None:
    static = IOSpec.for_image_model((4, 3, 32, 32), dynamic_batch=False)
    assert tp.profile_batches(EngineConfig(), static) == (4, 4, 4)
    assert tp.profile_batches(EngineConfig(max_batch=4), static) == (4, 4, 4)
    with pytest.raises(InputError, match="fixed batch of 4"):
        tp.profile_batches(EngineConfig(max_batch=8), static)


# -- builder configuration --------------------------------------------------------------------
def test_config_kwargs_workspace_level_and_timing_cache_and_no_precision_flags(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    cfg = EngineConfig(fp16=True, workspace_mb=1024, builder_opt_level=5, max_batch=16)
    kw = eng.config_kwargs(cfg, IMAGE, onnx_artifact("fp16", precision="fp16"), timing_cache=cache)
    # No fp16/int8/calibrator: TensorRT 11 removed those builder flags; the ONNX types decide.
    assert kw == {"profiles": [{"input": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}}],
                  "tf32": True, "sparse_weights": False, "memory_pool_limits": {"WORKSPACE": 1024 * 2**20},
                  "builder_optimization_level": 5}
    assert eng.NETWORK_KWARGS == {"strongly_typed": True}
    cache.write_bytes(b"")
    assert "load_timing_cache" not in eng.config_kwargs(cfg, IMAGE, onnx_artifact(), timing_cache=cache)
    cache.write_bytes(b"cache")
    assert eng.config_kwargs(cfg, IMAGE, onnx_artifact(), timing_cache=cache)["load_timing_cache"] == str(cache)


def test_each_engine_is_built_from_the_onnx_variant_of_its_precision() -> None:
    assert eng.engine_sources(EngineConfig(), "opt") == [("trt_fp32", "opt")]
    assert eng.engine_sources(EngineConfig(), "fp32") == [("trt_fp32", "fp32")]
    assert eng.engine_sources(EngineConfig(fp16=True, int8=True), "opt") == [("trt_fp16", "fp16"),
                                                                              ("trt_int8", "int8_trt")]
    assert eng.engine_sources(EngineConfig(source="sparse24"), "opt") == [("trt_sparse24", "sparse24")]
    assert eng.engine_sources(EngineConfig(source="sparse24", fp16=True), "opt") == [("trt_sparse24_fp16",
                                                                                      "sparse24_fp16")]
    assert eng.config_kwargs(EngineConfig(tf32=False), IMAGE, onnx_artifact())["tf32"] is False
    assert eng.plan_file("trt_fp16", 1) == "model.plan" and eng.plan_file("trt_int8", 2) == "model.trt_int8.plan"
    qdq = onnx_artifact("int8_trt", precision="int8")
    flags = eng.engine_params(EngineConfig(int8=True), qdq, IMAGE)
    assert flags.precision == "int8" and flags.int8_mode == "explicit (Q/DQ)" and flags.strongly_typed
    sparse = onnx_artifact("sparse24", sparse=True)
    assert eng.config_kwargs(EngineConfig(source="sparse24"), IMAGE, sparse)["sparse_weights"] is True
    assert eng.engine_params(EngineConfig(source="sparse24"), sparse, IMAGE).precision == "fp32"
    fp16_copy = sparse.model_copy(update={"name": "sparse24_fp16", "precision": "fp16", "params": Fp16Params(
        converter="onnxconverter_common", keep_io_types=True, casts_added=2, sparsity="2:4")})
    assert eng.source_is_sparse(fp16_copy) and not eng.source_is_sparse(onnx_artifact())


def test_engines_ask_for_the_onnx_variants_they_are_built_from() -> None:
    calib = CalibConfig(data="imagenet_subset")
    q = eng.with_source_variants(EngineConfig(fp16=True), None)
    assert q is not None and q.fp16 and not q.trt_qdq
    q = eng.with_source_variants(EngineConfig(int8=True), QuantConfig(int8_static=True, calib=calib))
    assert q is not None and q.trt_qdq and q.int8_static and not q.fp16
    assert eng.with_source_variants(EngineConfig(), None) is None
    assert eng.with_source_variants(EngineConfig(source="sparse24"), None) is None
    for quant in (None, QuantConfig(int8_static=True), QuantConfig(fp16=True, calib=calib)):
        with pytest.raises(InputError, match="--calib SOURCE"):
            eng.with_source_variants(EngineConfig(int8=True), quant)


#: TensorRT Python APIs that TensorRT 11 removed (NVIDIA's 10.x -> 11.x migration guide).
REMOVED_IN_TENSORRT_11 = ("BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.BF16", "int8_calibrator",
                          "IInt8EntropyCalibrator", "IInt8MinMaxCalibrator", "set_calibration_profile",
                          "platform_has_fast_fp16", "platform_has_fast_int8", "OBEY_PRECISION_CONSTRAINTS",
                          "PREFER_PRECISION_CONSTRAINTS", "device_memory_size", "backend.trt import Calibrator")


def test_no_tensorrt_api_removed_in_tensorrt_11_is_used() -> None:
    root = Path(__file__).resolve().parent.parent
    files = [f for d in ("convert", "runtimes", "calibration", "serving", "benchmarks") for f in (root / d).rglob("*.py")]
    files.append(root / "cli.py")
    assert len(files) > 20
    used = [(f.relative_to(root).as_posix(), name) for f in files for name in REMOVED_IN_TENSORRT_11
            if name in f.read_text(encoding="utf-8")]
    assert used == []


def test_create_config_builds_polygraphy_objects() -> None:
    """Polygraphy's CreateConfig and Profile are plain Python until the build: checked here."""
    pytest.importorskip("polygraphy")
    kw = eng.config_kwargs(EngineConfig(fp16=True, builder_opt_level=2, max_batch=16), IMAGE,
                           onnx_artifact("sparse24", sparse=True))
    cfg = eng.create_config(kw)
    assert type(cfg).__name__ == "CreateConfig"
    assert cfg.fp16 is False and cfg.int8 is False and cfg.calibrator is None and cfg.sparse_weights is True
    assert cfg.tf32 is True
    assert cfg.builder_optimization_level == 2 and cfg.memory_pool_limits is None
    shapes = cfg.profiles[0]["input"]
    assert (shapes.min, shapes.opt, shapes.max) == ((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))


def test_polygraphy_loaders_take_the_arguments_we_pass(tmp_path: Path) -> None:
    """The loaders need TensorRT to be constructed, but their signatures are plain Python: checked here."""
    import importlib
    import inspect

    pytest.importorskip("polygraphy")
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath

    def params(obj: object) -> set[str]:
        return set(inspect.signature(obj).parameters)  # type: ignore[arg-type]

    assert set(eng.NETWORK_KWARGS) <= params(NetworkFromOnnxPath)
    assert "save_timing_cache" in params(EngineFromNetwork)
    (tmp_path / "t.cache").write_bytes(b"x")
    full = eng.config_kwargs(EngineConfig(workspace_mb=64, builder_opt_level=1), IMAGE,
                             onnx_artifact("sparse24", sparse=True), timing_cache=tmp_path / "t.cache")
    assert set(full) == {"profiles", "tf32", "sparse_weights", "memory_pool_limits", "builder_optimization_level",
                         "load_timing_cache"}
    common = importlib.import_module("polygraphy.backend.trt.config")._CreateConfigCommon  # CreateConfig's **kwargs
    assert set(full) <= params(CreateConfig) | params(common)


def test_requests_that_cannot_work_are_refused_before_any_work(tmp_path: Path) -> None:
    state = onnx_artifact("torch").model_copy(update={"kind": "state_dict"})
    with pytest.raises(InputError, match="builds from an ONNX artifact"):
        eng.check_source(state, tmp_path)
    with pytest.raises(InputError, match="--min-batch 16, --max-batch 8"):
        eng.preflight(EngineConfig(min_batch=16, max_batch=8))
    with pytest.raises(InputError, match="--trt-from with --int8"):
        eng.preflight(EngineConfig(source="sparse24", int8=True))


def test_missing_tensorrt_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtrt, "tensorrt_installed", lambda: False)
    assert "pip install .[trt]" in (rtrt.tensorrt_problem() or "")
    with pytest.raises(BackendUnavailableError, match=r"needs TensorRT and an NVIDIA GPU.*pip install \.\[trt\]"):
        eng.preflight(EngineConfig(fp16=True))


# -- manifest fields and refusal of mismatched engines ----------------------------------------------
def test_manifest_records_what_the_engine_is_tied_to(tmp_path: Path) -> None:
    plan_manifest(tmp_path)
    art = Manifest.load(tmp_path).artifacts["trt_fp16"]
    assert art.kind == "plan" and art.precision == "fp16" and art.parent == "fp16"
    assert art.engine is not None and isinstance(art.params, EngineParams)
    assert art.engine.tensorrt_version == "10.3.0" and art.engine.gpu_name == "NVIDIA L4"
    assert art.engine.compute_capability == "8.9" and art.engine.engine_sha256 == art.file.sha256
    flags = art.params
    assert flags.source == "fp16" and flags.precision == "fp16" and flags.strongly_typed is True
    assert flags.sparse_weights is False
    assert (flags.min_batch, flags.opt_batch, flags.max_batch) == (1, 8, 32)
    assert art.engine.profile["input"]["max"] == [32, 3, 32, 32]
    assert rtrt.recorded_env(art) == HERE and rtrt.batch_range(art) == (1, 32)


@pytest.mark.parametrize("other,differs", [
    (TrtEnv(tensorrt_version="10.3.0", gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0"), "A100"),
    (TrtEnv(tensorrt_version="10.7.0", gpu_name="NVIDIA L4", compute_capability="8.9"), "TensorRT 10.7.0"),
])
def test_engine_from_another_gpu_or_tensorrt_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        other: TrtEnv, differs: str) -> None:
    art = plan_manifest(tmp_path).artifacts["trt_fp16"]
    monkeypatch.setattr(rtrt, "current_trt_env", lambda: other)  # the "current machine"
    with pytest.raises(rtrt.EngineMismatchError) as exc:
        rtrt.load_engine(tmp_path, art)
    msg = str(exc.value)
    assert "was built for NVIDIA L4 (compute capability 8.9) with TensorRT 10.3.0" in msg
    assert f"this machine has {other.describe()}" in msg and differs in msg and "\n" not in msg
    monkeypatch.setattr(rtrt, "current_trt_env", lambda: HERE)
    assert rtrt.check_engine_file(tmp_path, art) == tmp_path / eng.PLAN_NAME


def test_corrupt_or_unrecorded_engine_is_refused(tmp_path: Path) -> None:
    art = plan_manifest(tmp_path).artifacts["trt_fp16"]
    (tmp_path / eng.PLAN_NAME).write_bytes(PLACEHOLDER[:10])
    with pytest.raises(rtrt.EngineMismatchError, match="does not match the manifest's sha256"):
        rtrt.load_engine(tmp_path, art, env=HERE)
    (tmp_path / eng.PLAN_NAME).unlink()
    with pytest.raises(rtrt.EngineMismatchError, match="is missing"):
        rtrt.load_engine(tmp_path, art, env=HERE)
    bare = art.model_copy(update={"engine": None, "params": CopyParams()})
    with pytest.raises(rtrt.EngineMismatchError, match="no recorded tensorrt_version, gpu_name, compute_capability"):
        rtrt.check_engine_compat(bare, HERE)
    with pytest.raises(rtrt.EngineMismatchError, match="no recorded batch range"):
        rtrt.batch_range(bare)


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


@pytest.mark.skipif(rtrt.tensorrt_problem() is None, reason="TensorRT and a GPU are present here")
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
    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert

    out = tmp_path / "tiny"
    cfg = ConvertConfig(export=ExportConfig(model=f"{TINY}:build"), out=out,
                        engine=EngineConfig(fp16=True, max_batch=8, builder_opt_level=1))
    manifest, _ = run_convert(cfg, log=lambda _m: None)
    art = manifest.artifacts["trt_fp16"]
    here = rtrt.current_trt_env()
    assert art.status == "ok" and (out / eng.PLAN_NAME).is_file() and (out / "timing.cache").is_file()
    assert art.engine is not None
    assert rtrt.recorded_env(art) == here and art.engine.engine_sha256 == art.file.sha256
    assert min(v.cosine for v in art.metrics.parity.values()) > 0.999
    engine = rtrt.load_engine(out, art)
    assert engine.get_tensor_profile_shape("input", 0)[2] == (8, 3, 32, 32)
    (out / eng.PLAN_NAME).write_bytes(b"\0" * 64)  # recorded hash matches, bytes are garbage
    garbage = manifest.record(out, out / eng.PLAN_NAME, name="garbage", kind="plan", params=art.params,
                              engine=art.engine)
    with pytest.raises(rtrt.EngineMismatchError, match="could not deserialize"):
        rtrt.load_engine(out, garbage)


@pytest.mark.trt
def test_int8_engine_from_int8_trt_reuses_the_calibration_cache(tmp_path: Path) -> None:
    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert

    out = tmp_path / "tiny"
    quant = QuantConfig(int8_static=True, calib=CalibConfig(data="synthetic", size=32))
    cfg = ConvertConfig(export=ExportConfig(model=f"{TINY}:build"), out=out, quant=quant,
                        engine=EngineConfig(int8=True, max_batch=8, builder_opt_level=0))
    art = run_convert(cfg, log=lambda _m: None)[0].artifacts["trt_int8"]
    assert isinstance(art.params, EngineParams) and art.engine is not None
    assert art.parent == "int8_trt" and art.precision == "int8" and art.params.strongly_typed
    first = art.engine.calibration
    assert first is not None and first.cache_reused is False and (out / first.cache).stat().st_size > 0
    again = run_convert(cfg, log=lambda _m: None)[0].artifacts["trt_int8"].engine
    second = again.calibration if again is not None else None
    assert second is not None and second.cache_reused is True and second.cache == first.cache


def test_an_int8_engine_gets_a_numeric_check_too(tmp_path: Path) -> None:
    """An INT8 engine whose outputs drift from its Q/DQ source (cosine under the gate's 0.99) is failed, as an
    FP16 one is; within it, it passes. (The parity numbers are set here: building one needs TensorRT.)"""
    from types import SimpleNamespace

    from core.errors import ValidationError
    from core.metrics import ParityStats

    manifest = plan_manifest(tmp_path)
    art = manifest.artifacts["trt_fp16"].model_copy(update={"precision": "int8"})
    source = manifest.artifacts["trt_fp16"]
    ctx = SimpleNamespace(manifest=manifest, out=tmp_path)

    def parity(cos: float) -> dict[str, ParityStats]:
        return {"batch_1": ParityStats(max_abs_err=0.1, max_rel_err=0.1, mean_abs_err=0.01, cosine=cos)}

    art.metrics.parity = parity(0.995)
    eng._check_parity(ctx, EngineConfig(), art, source, tmp_path / "x.plan")  # type: ignore[arg-type]
    assert art.status == "ok"
    art.metrics.parity = parity(0.93)
    with pytest.raises(ValidationError, match=r"cosine 0.930000 < 0.99"):
        eng._check_parity(ctx, EngineConfig(), art, source, tmp_path / "x.plan")  # type: ignore[arg-type]
    assert art.status == "failed"
