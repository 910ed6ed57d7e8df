"""`package --format kserve`: the Triton repository plus an InferenceService that KServe's own classes read back.

kserve and tritonclient.grpc register the same ``inference.*`` gRPC protos and cannot share a process; other test
modules import tritonclient.grpc, so everything that imports kserve runs in a child process (the real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.fsutil import sha256_file
from serving.triton_config import parse_config
from serving.verify import verify_repo

ROOT = Path(__file__).resolve().parents[1]
STORAGE = "s3://models-bucket/onnxkit/tiny"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)


@pytest.fixture(scope="module")
def kserve_dir(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kserve") / "deploy"
    proc = _cli("package", str(tiny_artifacts), "--format", "kserve", "--out", str(out), "--variants", "opt,fp32",
                "--storage-uri", STORAGE, "--cpu", "500m", "--memory", "1Gi", "--min-replicas", "0",
                "--max-replicas", "4", "--scale-metric", "rps", "--scale-target", "20", "--runtime-version", "24.08-py3")
    assert proc.returncode == 0, proc.stderr
    assert "kubectl apply -f" in proc.stdout
    return out


def test_folder_holds_the_triton_repository_and_the_manifest(kserve_dir: Path, tiny_artifacts: Path) -> None:
    assert sorted(p.name for p in kserve_dir.iterdir()) == ["inferenceservice.yaml", "model_repository"]
    repo = kserve_dir / "model_repository"
    assert sorted(p.name for p in repo.iterdir()) == ["MANIFEST.json", "tiny_cnn_fp32", "tiny_cnn_opt"]
    cfg = parse_config(repo / "tiny_cnn_opt" / "config.pbtxt")
    assert cfg.name == "tiny_cnn_opt" and cfg.platform == "onnxruntime_onnx"
    doc = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert sha256_file(repo / "tiny_cnn_opt" / "1" / "model.onnx") == doc["artifacts"]["opt"]["file"]["sha256"]
    report = verify_repo(repo)  # the same checks a --format triton repository passes
    assert sorted(report.models) == ["tiny_cnn_fp32", "tiny_cnn_opt"]
    proc = _cli("verify", str(kserve_dir))  # the whole folder: repository + manifest read back by KServe's classes
    assert proc.returncode == 0 and "ok: 5 files" in proc.stdout, proc.stderr


def test_inference_service_fields(kserve_dir: Path) -> None:
    isvc = yaml.safe_load((kserve_dir / "inferenceservice.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert isvc["metadata"]["name"] == "tiny-cnn"
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Serverless"}
    pred = isvc["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (0, 4, "rps", 20)
    model = pred["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == STORAGE and model["runtimeVersion"] == "24.08-py3"
    assert model["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                  "limits": {"cpu": "500m", "memory": "1Gi"}}
    assert "ports" not in model  # HTTP: the runtime's default port


def test_yaml_deserialises_into_kserve_classes(kserve_dir: Path, tmp_path: Path) -> None:
    path = kserve_dir / "inferenceservice.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("minReplicas:", "minReplica:"))
    code = f"""
import json, kserve
from serving.kserve import load_inference_service, to_dict
from core.errors import ValidationError
isvc = load_inference_service({str(path)!r})
assert isinstance(isvc, kserve.V1beta1InferenceService)
assert isinstance(isvc.spec.predictor, kserve.V1beta1PredictorSpec)
assert isinstance(isvc.spec.predictor.model, kserve.V1beta1ModelSpec)
assert isinstance(isvc.spec.predictor.model.model_format, kserve.V1beta1ModelFormat)
try:
    load_inference_service({str(bad)!r})
    bad_error = None
except ValidationError as exc:
    bad_error = str(exc)
m = isvc.spec.predictor.model
print(json.dumps({{"name": isvc.metadata.name, "format": m.model_format.name, "uri": m.storage_uri,
                  "requests": m.resources.requests, "min": isvc.spec.predictor.min_replicas, "bad": bad_error}}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["name"] == "tiny-cnn" and got["format"] == "triton" and got["uri"] == STORAGE
    assert got["requests"] == {"cpu": "500m", "memory": "1Gi"} and got["min"] == 0
    assert "V1beta1PredictorSpec has no field(s) ['minReplica']" in got["bad"]


def test_grpc_gpu_and_cpu_autoscaling(tiny_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    proc = _cli("package", str(tiny_artifacts), "--format", "kserve", "--out", str(out), "--storage-uri",
                "gs://bucket/tiny", "--service-name", "tiny-gpu", "--kind", "gpu", "--gpus", "1", "--grpc",
                "--scale-metric", "cpu", "--scale-target", "70", "--max-replicas", "2")
    assert proc.returncode == 0, proc.stderr
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert isvc["metadata"]["name"] == "tiny-gpu"
    assert isvc["metadata"]["annotations"]["autoscaling.knative.dev/class"] == "hpa.autoscaling.knative.dev"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2"
    assert model["ports"] == [{"containerPort": 9000, "name": "h2c", "protocol": "TCP"}]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "KIND_GPU" in (out / "model_repository" / "tiny_cnn_opt" / "config.pbtxt").read_text()


def test_a_refused_run_leaves_the_previous_folder(kserve_dir: Path, tiny_artifacts: Path) -> None:
    before = {p.relative_to(kserve_dir).as_posix(): sha256_file(p) for p in kserve_dir.rglob("*") if p.is_file()}
    proc = _cli("package", str(tiny_artifacts), "--format", "kserve", "--out", str(kserve_dir), "--storage-uri",
                STORAGE, "--kind", "gpu")  # GPU instances without --gpus
    _one_error_line(proc, "--gpus 1")
    after = {p.relative_to(kserve_dir).as_posix(): sha256_file(p) for p in kserve_dir.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in kserve_dir.parent.iterdir() if p.name.startswith(".deploy")]


def _one_error_line(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("flags,needle", [
    ([], "needs --storage-uri"),
    (["--storage-uri", "ftp://host/x"], "not a storage URI"),
    (["--min-replicas", "-1"], "--min-replicas"),
    (["--min-replicas", "3", "--max-replicas", "2"], "above --max-replicas 2"),
    (["--memory", "2GB"], "not a positive Kubernetes quantity"),
    (["--scale-metric", "memory", "--min-replicas", "0"], "cannot scale to zero"),
    (["--service-name", "Tiny_CNN"], "DNS-1035"),
    (["--format", "triton", "--cpu", "2"], "only with --format kserve"),
], ids=["no-storage", "bad-scheme", "negative", "min-above-max", "quantity", "hpa-zero", "name", "triton-flag"])
def test_bad_flags_are_one_line(tiny_artifacts: Path, tmp_path: Path, flags: list[str], needle: str) -> None:
    base = ["--format", "kserve"] if "--format" not in flags else []
    storage = ["--storage-uri", STORAGE] if flags and "--storage-uri" not in flags and "triton" not in flags else []
    _one_error_line(_cli("package", str(tiny_artifacts), "--out", str(tmp_path / "d"), *base, *storage, *flags),
                    needle)
    assert not (tmp_path / "d").exists()
