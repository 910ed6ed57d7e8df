"""bench, tune and report grade accuracy on the artifact's own held-out data (what convert graded the variants
on), on --data when given, and on random inputs only where there is none: then top-1 is never graded on noise."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from calibration.pools import InputPool, heldout_pool
from convert.config import CalibConfig, ConvertConfig, ExportConfig, GateConfig, QuantConfig
from convert.pipeline import run_convert
from core.fsutil import sha256_file
from core.manifest import Manifest
from core.metrics import accuracy_stats
from reports.models import BenchResults
from reports.pareto import accuracy_metric
from reports.recommend import recommend
from runtimes.harness import RANDOM_INPUTS_BASIS, BenchConfig, graded_drop, run_bench
from tests.reports_data import R18, add_variant, load


def _quiet(_m: str) -> None:
    pass


@pytest.fixture(scope="module")
def digits_int8(digits_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path, Any]:
    """The digits CNN (trained on real data) with static INT8, gated on its labelled test split."""
    eval_npz = tmp_path_factory.mktemp("digits_eval") / "test.npz"
    np.savez(eval_npz, input=digits_model.x_test, labels=digits_model.y_test)
    quant = QuantConfig(int8_static=True, calib=CalibConfig(data=str(digits_model.calib_npz), size=200),
                        gate=GateConfig(eval_data=str(eval_npz), eval_size=400, max_accuracy_drop=5.0))
    out = tmp_path_factory.mktemp("digits_int8")
    cfg = ConvertConfig(export=ExportConfig(model=digits_model.factory, weights=str(digits_model.weights)), out=out,
                        quant=quant)
    manifest, _ = run_convert(cfg, log=_quiet)
    return manifest, out, digits_model


def test_convert_keeps_the_held_out_data_it_graded_on(digits_int8: tuple[Manifest, Path, Any]) -> None:
    manifest, out, digits = digits_int8
    held = manifest.held_out
    assert held is not None and held.labels
    assert held.samples == held.of_samples == len(digits.x_test)  # 400 digits are far below the size limit
    assert sha256_file(out / held.file.path) == held.file.sha256
    with np.load(out / held.file.path) as z:  # the gates' data (in their seeded order), each row with its label
        kept = sorted((x.tobytes(), int(y)) for x, y in zip(z["input"], z["labels"], strict=True))
    assert kept == sorted((x.tobytes(), int(y)) for x, y in zip(digits.x_test, digits.y_test, strict=True))
    assert held.data_sha256 == manifest.artifacts["int8_static_minmax"].metrics.held_out.sha256  # type: ignore[union-attr]
    assert Manifest.load(out).verify(out) == []
    original = (out / held.file.path).read_bytes()
    (out / held.file.path).write_bytes(b"not the data")  # a changed file is caught like any artifact
    try:
        assert any("held-out data" in p for p in Manifest.load(out).verify(out))
    finally:
        (out / held.file.path).write_bytes(original)


def test_bench_grades_on_the_held_out_data_as_convert_did(digits_int8: tuple[Manifest, Path, Any]) -> None:
    """Without --data, bench's accuracy is convert's: the same samples, labels and basis give the same drop."""
    manifest, out, digits = digits_int8
    res = run_bench(BenchConfig(artifact_dir=out, backends=["ort"], batch_sizes=[1], warmup=1, iters=3, rounds=3,
                                accuracy_samples=400), log=_quiet)
    assert res.accuracy_inputs == "held-out" and "heldout.npz" in res.config["inputs"]
    gate = manifest.artifacts["int8_static_minmax"].metrics.gate
    int8 = next(r for r in res.records if r.variant == "int8_static_minmax")
    assert int8.accuracy is not None and int8.accuracy.samples == len(digits.x_test)
    assert int8.accuracy_basis == gate.basis == "top-1 accuracy (labels)"  # type: ignore[union-attr]
    assert int8.accuracy_drop == pytest.approx(gate.drop_points, abs=1e-6)  # type: ignore[union-attr]
    fp32 = next(r for r in res.records if r.variant == "opt")
    assert fp32.accuracy is not None and fp32.accuracy.top1_acc == pytest.approx(digits.test_accuracy, abs=0.01)


def test_bench_without_held_out_data_grades_no_top1_on_noise(tiny_artifacts: Path) -> None:
    """An artifact with no held-out data: random inputs, said so, and graded on the output cosine only."""
    assert Manifest.load(tiny_artifacts).held_out is None
    lines: list[str] = []
    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["ort"], batch_sizes=[1], warmup=1, iters=3,
                                rounds=3), log=lines.append)
    assert res.accuracy_inputs == "random"
    assert any("random inputs" in w for w in res.warnings) and any("random inputs" in m for m in lines)
    for r in res.records:
        assert r.accuracy is not None and r.accuracy.top1_agreement is None and r.accuracy.top5_agreement is None
        # the inputs' shared part left out: the cosine of what depends on the input (several random inputs)
        assert r.accuracy_basis == f"100 x (1 - centered output cosine vs FP32) {RANDOM_INPUTS_BASIS}"
        assert r.accuracy.centered_cosine is not None
        assert r.accuracy_drop == pytest.approx(100 * (1 - r.accuracy.centered_cosine))
    assert accuracy_metric(res.records).basis == res.records[0].accuracy_basis


def test_bench_data_takes_an_npz_keyed_by_input_name(tiny_artifacts: Path, tmp_path: Path) -> None:
    spec = Manifest.load(tiny_artifacts).iospec
    feed = spec.random_feed(12, seed=5)
    labels = np.arange(12) % 2
    npz = tmp_path / "eval.npz"
    np.savez(npz, **feed, labels=labels)
    res = run_bench(BenchConfig(artifact_dir=tiny_artifacts, backends=["ort"], batch_sizes=[1], warmup=1, iters=3,
                                rounds=3, data=npz), log=_quiet)
    assert res.accuracy_inputs == "data"
    rec = res.records[0]
    assert rec.accuracy is not None and rec.accuracy.samples == 12 and rec.accuracy.top1_acc is not None


def test_held_out_data_of_another_shape_is_not_used(digits_int8: tuple[Manifest, Path, Any]) -> None:
    manifest, out, _ = digits_int8
    assert manifest.held_out is not None
    spec = manifest.iospec.model_copy(deep=True)
    spec.inputs[0].shape = [spec.inputs[0].shape[0], 1, 8, 8]
    why = heldout_pool(out, manifest.held_out, spec, 10)
    assert isinstance(why, str) and "[1, 16, 16]" in why and "[1, 8, 8]" in why
    pool = heldout_pool(out, manifest.held_out, manifest.iospec, 10)
    assert not isinstance(pool, str) and pool.size == 10 and pool.kind == "held-out" and pool.labels is not None


def _int8_results(top1_agreement: float, drop: float | None, basis: str | None) -> BenchResults:
    """The checked-in resnet18 run with an INT8 variant 2x faster than ort:opt."""
    data = load(R18)
    add_variant(data, ("ort", "opt"), "int8_static_minmax", "int8", 0.5, top1_agreement)
    for r in data["records"]:
        r["accuracy_drop"], r["accuracy_basis"] = (0.0, basis) if r["precision"] == "fp32" else (drop, basis)
    return BenchResults.model_validate(copy.deepcopy(data))


def test_recommendation_uses_the_drop_convert_and_tune_grade_on() -> None:
    """A random-init model's INT8 variant: top-1 agreement says nothing (near-uniform scores), its output cosine
    (drop 0.13 points) is within the budget, as convert's gate and tune found: it is recommended."""
    basis = "100 x (1 - output cosine vs FP32): random-init weights"
    (rec,) = recommend(_int8_results(0.0, 0.13, basis), 1.0)
    assert rec.choice == "ort:int8_static_minmax (int8)"
    assert not any("int8" in e for e in rec.excluded)
    assert any(basis in e for e in rec.evidence)
    (over,) = recommend(_int8_results(1.0, 3.0, basis), 1.0)  # over the budget on its basis: excluded
    assert over.choice != "ort:int8_static_minmax (int8)" and any("int8_static_minmax" in e for e in over.excluded)


def test_old_results_without_drops_keep_their_metric() -> None:
    res = BenchResults.load(R18)
    assert all(r.accuracy_drop is None for r in res.records)
    assert accuracy_metric(res.records).key == "top1_agreement"


def test_demo_report_recommends_within_budget_on_held_out_photos(tmp_path: Path) -> None:
    """The demo's case: random-init resnet18, static INT8 calibrated on the built-in photos. bench grades INT8 on
    the photos convert held out (never top-1 agreement 0 on noise), and the recommendation keeps INT8 in budget."""
    out = tmp_path / "demo"
    cfg = ConvertConfig(export=ExportConfig(model="resnet18", input_shape=(1, 3, 64, 64)), out=out,
                        quant=QuantConfig(int8_static=True, calib=CalibConfig(data="imagenet_subset")))
    manifest, _ = run_convert(cfg, log=_quiet)
    assert manifest.held_out is not None
    gate = manifest.artifacts["int8_static_minmax"].metrics
    res = run_bench(BenchConfig(artifact_dir=out, backends=["ort"], batch_sizes=[1], warmup=1, iters=3, rounds=3),
                    log=_quiet)
    assert res.accuracy_inputs == "held-out"
    int8 = next(r for r in res.records if r.variant == "int8_static_minmax")
    assert int8.accuracy is not None and gate.accuracy is not None
    assert int8.accuracy.top1_agreement == pytest.approx(gate.accuracy.top1_agreement)
    assert int8.accuracy_drop == pytest.approx(gate.gate.drop_points, abs=1e-3)  # type: ignore[union-attr]
    (rec,) = recommend(res, 1.0)
    assert not any("int8" in e for e in rec.excluded), rec.excluded


def test_a_zero_output_is_not_measurable_in_bench_and_report(digits_int8: tuple[Manifest, Path, Any]) -> None:
    """A reference output of 0 for every input (convert refuses such a model in parity, so it is made here):
    bench's grading gives no drop and the one line that says why, never a perfect match, on held-out or random
    inputs; the recommendation cannot pick it."""
    manifest, _, _ = digits_int8
    zeros = np.zeros((6, 10), np.float32)
    stats = accuracy_stats([zeros], [zeros], np.arange(6) % 10, "ref", ["logits"])
    for kind in ("held-out", "random"):
        pool = InputPool(arrays={"input": np.zeros((6, 1, 16, 16), np.float32)}, labels=None, source="six inputs",
                         kind=kind)  # type: ignore[arg-type]
        drop, basis = graded_drop(stats, pool, manifest)
        assert drop is None and "constant (all 0.0)" in basis and "not measurable" in basis
    data = load(R18)
    for r in data["records"]:
        r["accuracy_drop"], r["accuracy_basis"] = None, basis
    (rec,) = recommend(BenchResults.model_validate(data), 1.0)
    assert rec.choice is None and rec.excluded and all("not measurable" in e for e in rec.excluded)
