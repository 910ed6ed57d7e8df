"""OpenVINO and torch.compile as backends: the same harness, inputs and accuracy checks as every other one."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import BackendUnavailableError
from runtimes.harness import BenchConfig, run_bench

pytest.importorskip("openvino")


def test_openvino_runs_every_onnx_variant_and_agrees(tiny_artifacts: Path) -> None:
    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["ort", "openvino"], batch_sizes=[1, 2],
                                warmup=1, iters=6, rounds=3, accuracy_samples=8,
                                options={"openvino_hint": "THROUGHPUT"}), log=lambda _m: None)
    ov = [r for r in res.records if r.backend == "openvino"]
    assert {r.variant for r in ov} == {r.variant for r in res.records if r.backend == "ort"}
    assert {r.batch_size for r in ov} == {1, 2}
    for r in ov:
        assert r.accuracy is not None and r.accuracy.cosine > 0.9999 and r.accuracy.top1_agreement == 1.0
    assert res.config["options"]["openvino_hint"] == "THROUGHPUT"


def test_openvino_failure_is_one_line_and_the_others_go_on(tiny_artifacts: Path, tmp_path: Path) -> None:
    from core.manifest import Manifest
    from runtimes.base import RunnerOptions
    from runtimes.openvino import OpenVinoRunner

    manifest = Manifest.load(tiny_artifacts)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    art = manifest.artifacts["opt"].model_copy(update={"file": manifest.artifacts["opt"].file.model_copy(
        update={"path": str(broken)})})
    with pytest.raises(BackendUnavailableError, match=r"^OpenVINO cannot run broken.onnx: "):
        OpenVinoRunner(manifest, tmp_path, art, RunnerOptions()).load()


def test_torch_compile_records_its_compile_time_apart(tiny_artifacts: Path) -> None:
    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["eager", "compile"], batch_sizes=[1],
                                warmup=1, iters=4, rounds=2, accuracy_samples=4), log=lambda _m: None)
    (rec,) = [r for r in res.records if r.backend == "compile"]
    assert rec.extra["compile_s"] > 0 and rec.load_s is not None and rec.load_s >= rec.extra["compile_s"]
    assert rec.accuracy is not None and rec.accuracy.cosine > 0.9999
