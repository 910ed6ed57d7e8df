"""Runners own their knowledge: their options model, what `tune` searches, how their settings are written into a
Triton config, and one check of backend names. A runner added to ``runtimes.RUNNERS`` in a test (a real ONNX
Runtime runner that declares other settings) is searched, packaged and checked through what it declares alone,
with nothing else changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import Field
from pydantic import ValidationError as PydanticValidationError

import runtimes
from core.errors import InputError
from runtimes.base import BackendOptions, RunnerOptions, TritonSettings
from runtimes.ort import OrtOptions, OrtRunner


class ToyOptions(BackendOptions):
    toy_knob: int = Field(default=0, ge=0, description="A setting only this runner has")


class ToyRunner(OrtRunner):
    """ONNX Runtime under another name, searching two settings of its own choosing and packaged for Triton's
    onnxruntime backend with inter-op threads (a key no other runner writes)."""

    name = "toy"
    options_model: ClassVar[type[BackendOptions]] = ToyOptions

    @classmethod
    def search_space(cls) -> list[dict[str, Any]]:
        return [{"threads": 1, "toy_knob": 1}, {"threads": 1, "toy_knob": 2}]

    @classmethod
    def triton_settings(cls, settings: dict[str, Any]) -> TritonSettings | None:
        knob = str(settings["toy_knob"])
        return TritonSettings(backend=str(cls.triton_backend), parameters={"inter_op_thread_count": knob})


class NoTritonToy(ToyRunner):
    name = "toy-local"
    triton_backend = None


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(runtimes.RUNNERS, "toy", ToyRunner)
    monkeypatch.setitem(runtimes.RUNNERS, "toy-local", NoTritonToy)


def test_backend_settings_are_checked_by_the_runner_that_declares_them() -> None:
    opts = RunnerOptions(threads=2, ort_spinning=False, openvino_hint="THROUGHPUT")
    assert opts.backend == {"ort_spinning": False, "openvino_hint": "THROUGHPUT"}
    assert opts.of(OrtOptions) == OrtOptions(ort_spinning=False)  # the rest at ONNX Runtime's defaults
    assert opts.ort_spinning is False and RunnerOptions().ort_graph_optimization == "all"  # read by name, as before
    assert RunnerOptions(**opts.model_dump()) == opts  # a dump lists them by name: the same options again
    with pytest.raises(PydanticValidationError, match="ort_graph_optimization"):
        RunnerOptions(ort_graph_optimization="fastest")
    with pytest.raises(PydanticValidationError, match=r"unknown runner option\(s\) \['toy_knob'\]"):
        RunnerOptions(toy_knob=1)  # no runner declares it


def test_a_registered_runner_brings_its_options(toy: None) -> None:
    assert RunnerOptions(toy_knob=3).of(ToyOptions).toy_knob == 3
    with pytest.raises(PydanticValidationError, match="toy_knob"):
        RunnerOptions(toy_knob=-1)  # its own model's check


def test_tune_searches_what_the_runner_declares(toy: None, tiny_artifacts: Path) -> None:
    from runtimes.tune import TuneConfig, run_tune, settings_for

    assert settings_for("toy") == ToyRunner.search_space()
    assert settings_for("ort-trt") == settings_for("ort")  # inherited: a subclass searches what its parent does
    assert settings_for("eager") == [{}]
    result = run_tune(TuneConfig(artifact_dir=tiny_artifacts, backends=["toy"], batch_sizes=[1], variants=["fp32"],
                                 screen=0, stages=[3], rounds=3, accuracy_samples=4), log=lambda _m: None)
    assert [c.settings for c in result.candidates] == ToyRunner.search_space()
    assert all(c.latency_ms is not None for c in result.candidates)  # measured with its own options


def test_package_from_tune_writes_what_the_runner_maps(toy: None, tiny_artifacts: Path, tmp_path: Path) -> None:
    from runtimes.tune import Candidate, TuneResult
    from serving.triton import PackageConfig, package
    from serving.tuned import triton_runners
    from tests.test_package_from_tune import _params, _parse

    assert triton_runners() == ["ort", "openvino", "toy"]  # ort-trt's engines are its own; toy-local has none
    winner = Candidate(backend="toy", variant="fp32", precision="fp32", batch_size=1,
                       settings={"threads": 1, "toy_knob": 2})
    doc = TuneResult(config={"artifact_dir": str(tiny_artifacts)}, machine={}, candidates=[winner],
                     winner=winner.label, stages_run=1, reason="picked for the test")
    (tmp_path / "tune.json").write_text(doc.model_dump_json())
    _, out = package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r", from_tune=tmp_path),
                     log=lambda _m: None)
    cfg = _parse(out / "tiny_cnn_fp32" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and _params(cfg) == {"inter_op_thread_count": "2"}

    local = winner.model_copy(update={"backend": "toy-local"})
    doc = doc.model_copy(update={"candidates": [local], "winner": local.label})
    (tmp_path / "tune.json").write_text(doc.model_dump_json())
    with pytest.raises(InputError, match=r"runs on toy-local, which Triton has no backend for; tune again with "
                                         r"--backends ort,openvino,toy "):
        package(PackageConfig(artifact_dir=tiny_artifacts, out=tmp_path / "r2", from_tune=tmp_path),
                log=lambda _m: None)


def test_one_check_of_backend_names_for_bench_tune_and_sweep(tiny_artifacts: Path, toy: None) -> None:
    from runtimes.harness import BenchConfig, run_bench
    from runtimes.tune import TuneConfig, run_tune
    from sweep.plan import PlanConfig

    line = runtimes.unknown_backends(["ort", "nope"])
    assert line == f"unknown backend(s) ['nope']; available: {', '.join(runtimes.RUNNERS)}"
    assert runtimes.unknown_backends(["ort", "toy"]) is None  # the table is the one list
    with pytest.raises(InputError) as bench:
        run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["ort", "nope"]), log=lambda _m: None)
    with pytest.raises(InputError) as tune:
        run_tune(TuneConfig(artifact_dir=tiny_artifacts, backends=["ort", "nope"]), log=lambda _m: None)
    with pytest.raises(PydanticValidationError) as sweep:
        PlanConfig(models=["resnet18"], backends=["ort", "nope"])
    assert str(bench.value) == str(tune.value) == line
    assert line in str(sweep.value)
    PlanConfig(models=["resnet18"], backends=["toy"])  # a registered runner is a backend everywhere
