"""`package --format triton` and `verify`: the repository, its schema-validated configs and MANIFEST.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import InputError, ValidationError
from core.fsutil import sha256_file
from core.manifest import Manifest
from core.records import EngineBuild, EngineParams
from serving.triton import PackageConfig, package
from serving.verify import verify_repo


def _parse(path: Path) -> mc.ModelConfig:
    """Parse with Triton's own schema, independently of the code under test."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def repo(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repo") / "models"
    package(PackageConfig(artifact_dir=tiny_artifacts, out=out, variants=["opt", "fp32"]), log=lambda _m: None)
    return out


def test_repository_layout_and_config(repo: Path, tiny_artifacts: Path) -> None:
    manifest = Manifest.load(tiny_artifacts)
    assert sorted(p.name for p in repo.iterdir()) == ["MANIFEST.json", "tiny_cnn_fp32", "tiny_cnn_opt"]
    cfg = _parse(repo / "tiny_cnn_opt" / "config.pbtxt")
    assert cfg.name == "tiny_cnn_opt"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == [
        ("input", "TYPE_FP32", [3, 32, 32])]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output] == [
        ("logits", "TYPE_FP32", [10])]
    assert cfg.HasField("dynamic_batching")
    assert [(g.count, mc.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [(1, "KIND_CPU")]
    # the model file is the artifact, byte for byte
    assert sha256_file(repo / "tiny_cnn_opt" / "1" / "model.onnx") == manifest.artifacts["opt"].file.sha256
    assert sha256_file(repo / "tiny_cnn_fp32" / "1" / "model.onnx") == manifest.artifacts["fp32"].file.sha256


def test_manifest_lists_every_file_with_its_hash(repo: Path) -> None:
    doc = json.loads((repo / "MANIFEST.json").read_text())
    files = {f["path"]: f["sha256"] for f in doc["files"]}
    on_disk = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(files) == on_disk
    for path, digest in files.items():
        assert sha256_file(repo / path) == digest
    assert doc["versions"]["onnxruntime"] and doc["packaged_with"]["tritonclient"]
    assert {m["name"]: m["params"]["onnx_opset"] for m in doc["models"]} == {"tiny_cnn_opt": 18, "tiny_cnn_fp32": 18}
    report = verify_repo(repo)
    assert report.files_checked == 4 and sorted(report.models) == ["tiny_cnn_fp32", "tiny_cnn_opt"]


def test_options_reach_the_config(tiny_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    package(PackageConfig(artifact_dir=tiny_artifacts, out=out, max_batch_size=0, dynamic_batching=False,
                          instances=3, kind="gpu", name="tiny"), log=lambda _m: None)
    cfg = _parse(out / "tiny_opt" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [-1, 3, 32, 32]  # without Triton batching the batch dim is explicit
    assert [(g.count, mc.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [(3, "KIND_GPU")]
    with pytest.raises(InputError, match="dynamic-batching needs"):
        package(PackageConfig(artifact_dir=tiny_artifacts, out=out, max_batch_size=0, dynamic_batching=True),
                log=lambda _m: None)


def test_repackaging_replaces_only_a_package_repository(tiny_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    package(PackageConfig(artifact_dir=tiny_artifacts, out=out, variants=["fp32"]), log=lambda _m: None)
    package(PackageConfig(artifact_dir=tiny_artifacts, out=out, variants=["opt"]), log=lambda _m: None)
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json", "tiny_cnn_opt"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="did not write"):
        package(PackageConfig(artifact_dir=tiny_artifacts, out=foreign), log=lambda _m: None)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder is left behind"


def test_verify_detects_a_changed_byte(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    model = copy / "tiny_cnn_opt" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    model.write_bytes(bytes(data))
    with pytest.raises(ValidationError, match=r"tiny_cnn_opt/1/model.onnx: sha256 .* \(changed after packaging\)"):
        verify_repo(copy)


def test_verify_refuses_unlisted_missing_and_invalid_files(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    (copy / "tiny_cnn_fp32" / "1" / "model.onnx").unlink()
    (copy / "tiny_cnn_opt" / "2").mkdir()
    (copy / "tiny_cnn_opt" / "2" / "model.onnx").write_bytes(b"x")
    cfg = copy / "tiny_cnn_opt" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(ValidationError) as err:
        verify_repo(copy)
    failures = "\n".join(err.value.failures)
    assert "tiny_cnn_fp32/1/model.onnx: missing" in failures
    assert "tiny_cnn_opt/2/model.onnx: not listed in MANIFEST.json" in failures
    assert 'no field named "max_batch_sise"' in failures  # Triton's schema, not a string check
    with pytest.raises(InputError, match="not a repository written by `package`"):
        verify_repo(tmp_path)


def _with_plan(tiny_artifacts: Path, tmp_path: Path, engine: EngineBuild | None,
               batches: tuple[int, int, int] = (1, 8, 32)) -> Path:
    """A copy of the tiny artifacts with a plan artifact recorded (packaging copies it; nothing runs it)."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    (art / "model.plan").write_bytes(b"serialized engine bytes")
    manifest = Manifest.load(art)
    params = EngineParams(source="fp16", precision="fp16", sparse_weights=False, min_batch=batches[0],
                          opt_batch=batches[1], max_batch=batches[2], tf32=True)
    manifest.record(art, art / "model.plan", name="trt_fp16", kind="plan", params=params, precision="fp16",
                    parent="opt", engine=engine)
    manifest.save(art)
    return art


def test_plan_is_packaged_with_its_gpu_and_tensorrt_version(tiny_artifacts: Path, tmp_path: Path) -> None:
    art = _with_plan(tiny_artifacts, tmp_path, EngineBuild(tensorrt_version="10.9.0", gpu_name="NVIDIA H100 80GB HBM3",
                                                           compute_capability="9.0", engine_sha256="0" * 64,
                                                           profile={}), batches=(1, 8, 4))
    out = tmp_path / "r"
    package(PackageConfig(artifact_dir=art, out=out, variants=["opt", "plan"]), log=lambda _m: None)
    cfg = _parse(out / "tiny_cnn_trt_fp16" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan"
    assert cfg.max_batch_size == 4  # the default 8 is clamped to the engine's profile
    assert (out / "tiny_cnn_trt_fp16" / "1" / "model.plan").read_bytes() == b"serialized engine bytes"
    assert mc.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"
    doc = json.loads((out / "MANIFEST.json").read_text())
    engine = next(m for m in doc["models"] if m["kind"] == "plan")["engine"]
    assert (engine["gpu"], engine["tensorrt"], engine["compute_capability"]) == ("NVIDIA H100 80GB HBM3", "10.9.0",
                                                                                 "9.0")
    report = verify_repo(out)
    if report.notes:  # no TensorRT or GPU here: said, not silently passed
        assert "not checked here" in report.notes[0]
    with pytest.raises(InputError, match="GPU instances only"):
        package(PackageConfig(artifact_dir=art, out=tmp_path / "r2", variants=["plan"], kind="cpu"),
                log=lambda _m: None)
    with pytest.raises(InputError, match="exceeds engine 'trt_fp16'.s profile maximum of 4"):
        package(PackageConfig(artifact_dir=art, out=tmp_path / "r2", variants=["plan"], max_batch_size=16),
                log=lambda _m: None)


def test_plan_without_build_facts_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    art = _with_plan(tiny_artifacts, tmp_path, None)
    with pytest.raises(InputError, match="no recorded tensorrt_version, gpu_name, compute_capability"):
        package(PackageConfig(artifact_dir=art, out=tmp_path / "r", variants=["plan"]), log=lambda _m: None)
    assert not (tmp_path / "r").exists()
