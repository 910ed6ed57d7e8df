"""`package --from-tune`: the tune winner's variant, with its settings as the parameters of the Triton backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import InputError
from runtimes.tune import Candidate, TuneConfig, TuneResult, run_tune
from serving.triton import PackageConfig, package
from serving.triton_config import check_config, parse_config
from serving.verify import verify_repo

ROOT = Path(__file__).resolve().parents[1]


def _parse(path: Path) -> mc.ModelConfig:
    """Parse with Triton's own schema, independently of the code under test."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _params(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.fixture(scope="module")
def tuned(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TuneResult]:
    """A real, short `tune` of ONNX Runtime on the tiny model, written as the CLI writes tune.json."""
    result = run_tune(TuneConfig(artifact_dir=tiny_artifacts, backends=["ort"], stages=[3], rounds=3,
                                 accuracy_samples=4), log=lambda _m: None)
    path = tmp_path_factory.mktemp("tune") / "tune.json"
    path.write_text(result.model_dump_json(indent=2) + "\n")
    return path, result


def _with_winner(result: TuneResult, winner: Candidate, path: Path) -> Path:
    """tune.json with ``winner`` as its winner, built with the model `tune` writes it with."""
    doc = TuneResult(config=result.config, machine=result.machine, candidates=[*result.candidates, winner],
                     winner=winner.label, stages_run=1, reason="picked for the test")
    path.write_text(doc.model_dump_json(indent=2) + "\n")
    return path


def test_the_ort_winner_is_packaged_with_its_threads(tuned: tuple[Path, TuneResult], tiny_artifacts: Path,
                                                     tmp_path: Path) -> None:
    path, result = tuned
    winner = next(c for c in result.candidates if c.label == result.winner)
    repo, out = package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=path),
                        log=lambda _m: None)
    assert [m.variant for m in repo.models] == [winner.variant]
    cfg = _parse(out / f"tiny_cnn_{winner.variant}" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and not cfg.backend
    mode = "1" if winner.settings["ort_execution_mode"] == "parallel" else "0"
    assert _params(cfg) == {"intra_op_thread_count": str(winner.settings["threads"]), "execution_mode": mode}
    level = {"all": None, "extended": 1}[winner.settings["ort_graph_optimization"]]
    # graph level all: ORT_ENABLE_ALL, the runner's and the backend's default, so no field
    assert (cfg.optimization.graph.level if cfg.HasField("optimization") else None) == level
    record = json.loads((out / "MANIFEST.json").read_text())["models"][0]["tuned"]
    assert record["winner"] == result.winner and record["settings"] == winner.settings
    assert record["parameters"] == _params(cfg) and record["tuned_on"]
    assert bool(record["not_carried"]) == (winner.settings["ort_spinning"] is False)
    verify_repo(out)


def test_ort_graph_level_and_execution_mode_reach_the_config(tuned: tuple[Path, TuneResult], tiny_artifacts: Path,
                                                           tmp_path: Path) -> None:
    _, result = tuned
    ort_winner = Candidate(backend="ort", variant="opt", precision="fp32", batch_size=1,
                           settings={"threads": 1, "ort_spinning": True, "ort_graph_optimization": "extended",
                                     "ort_execution_mode": "parallel"})
    _with_winner(result, ort_winner, tmp_path / "tune.json")
    _, out = package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=tmp_path),
                     log=lambda _m: None)
    cfg = _parse(out / "tiny_cnn_opt" / "config.pbtxt")
    assert _params(cfg) == {"intra_op_thread_count": "1", "execution_mode": "1"}
    assert cfg.optimization.graph.level == 1  # the onnxruntime backend's "basic plus extended"
    verify_repo(out)


def test_the_openvino_winner_gets_the_openvino_backend(tuned: tuple[Path, TuneResult], tiny_artifacts: Path,
                                                       tmp_path: Path) -> None:
    _, result = tuned
    ov = Candidate(backend="openvino", variant="fp32", precision="fp32", batch_size=16,
                   settings={"openvino_hint": "THROUGHPUT", "threads": 2})
    tune_json = _with_winner(result, ov, tmp_path / "tune.json")
    _, out = package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=tmp_path),
                     log=lambda _m: None)  # a folder: its tune.json
    cfg = _parse(out / "tiny_cnn_fp32" / "config.pbtxt")
    assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("", "openvino", "model.onnx")
    assert _params(cfg) == {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": "2"}
    assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [16]
    assert (out / "tiny_cnn_fp32" / "1" / "model.onnx").is_file()
    doc = json.loads((out / "MANIFEST.json").read_text())
    assert doc["models"][0]["platform"] == "openvino"
    assert doc["models"][0]["tuned"]["tune_json"] == str(tune_json)
    assert any("f32 compute" in n for n in doc["models"][0]["tuned"]["not_carried"])  # Triton may compute bf16
    verify_repo(out)


def test_from_tune_with_kserve(tuned: tuple[Path, TuneResult], tiny_artifacts: Path, tmp_path: Path) -> None:
    path, result = tuned
    winner = next(c for c in result.candidates if c.label == result.winner)
    out = tmp_path / "deploy"
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "package", str(tiny_artifacts), "--format", "kserve",
                           "--out", str(out), "--storage-uri", "gs://b/tiny", "--from-tune", str(path)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    cfg = _parse(out / "model_repository" / f"tiny_cnn_{winner.variant}" / "config.pbtxt")
    assert _params(cfg)["intra_op_thread_count"] == str(winner.settings["threads"])
    assert yaml.safe_load((out / "inferenceservice.yaml").read_text())["kind"] == "InferenceService"


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_a_winner_triton_cannot_run_is_refused(backend: str, tuned: tuple[Path, TuneResult], tiny_artifacts: Path,
                                               tmp_path: Path) -> None:
    _, result = tuned
    tune_json = _with_winner(result, Candidate(backend=backend, variant="fp32", precision="fp32", batch_size=1,
                                               settings={}), tmp_path / "tune.json")
    with pytest.raises(InputError, match=f"runs on {backend}, which Triton has no backend for"):
        package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=tune_json),
                log=lambda _m: None)
    assert not (tmp_path / "r").exists()


def test_bad_from_tune_requests_are_one_line(tuned: tuple[Path, TuneResult], tiny_artifacts: Path,
                                             tmp_path: Path) -> None:
    path, _ = tuned
    with pytest.raises(InputError, match="leave out --variants"):
        package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=path, variants=["fp32"]))
    with pytest.raises(InputError, match="run `python cli.py tune"):
        package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=tmp_path / "none.json"))
    other = tmp_path / "other"
    other.mkdir()
    doc = json.loads(path.read_text())
    doc["config"]["artifact_dir"] = str(other)
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="tuned .*other, not"):
        package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=tmp_path / "t.json"))
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "package", str(tiny_artifacts), "--out",
                           str(tmp_path / "r"), "--from-tune", str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --from-tune: no "), proc.stderr


def test_check_config_refuses_keys_the_backend_does_not_read(tiny_artifacts: Path, tmp_path: Path) -> None:
    _, out = package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r"), log=lambda _m: None)
    model_dir = out / "tiny_cnn_opt"
    cfg = parse_config(model_dir / "config.pbtxt")
    cfg.parameters["intra_op_threads"].string_value = "2"  # misspelt: the backend would ignore it
    cfg.parameters["execution_mode"].string_value = "2"
    problems = check_config(cfg, model_dir)
    assert any("'intra_op_threads' is not one the onnxruntime_onnx backend reads" in p for p in problems)
    assert any("execution_mode = '2'" in p for p in problems)
    cfg.ClearField("parameters")
    cfg.ClearField("platform")
    cfg.backend = "openvino"  # without default_model_filename the backend looks for model.xml
    assert any("needs default_model_filename 'model.onnx'" in p for p in check_config(cfg, model_dir))
