"""Cosine drops rest on the part of the output that depends on the input, not on what every input shares.

A random-init classifier's logits are mostly the same for every input (resnet50: 95% of their energy), so the plain output cosine
passed a variant that ignored its input (0.977 vs FP32) or kept half of the input's effect (0.994) within a 1-point
budget, and a random-init shufflenet_v2's INT8 file that had lost the input's effect entirely scored 0.99999. These
tests fail on that code: the drop's basis is the centered cosine (both outputs minus the FP32 reference's mean over
the inputs), and a quantized model that loses the input's effect fails its gate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convert.config import Budget, CalibConfig, ConvertConfig, ExportConfig, QuantConfig
from convert.gates import gate_verdict
from convert.pipeline import run_convert
from core.errors import AccuracyGateError
from core.manifest import Manifest
from core.metrics import AccuracyStats, accuracy_drop, accuracy_stats, centered_cosine, compare_outputs
from core.records import GateResult


def _shared_heavy(n: int = 16, classes: int = 100, seed: int = 0) -> np.ndarray:
    """Logits like a random-init CNN's: a large part the same for every input, a small part that is not."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(1, classes)) * 5 + rng.normal(size=(n, classes)) * 0.5).astype(np.float32)


def test_a_variant_that_ignores_its_input_loses_everything() -> None:
    ref = _shared_heavy()
    mean = np.broadcast_to(ref.mean(0, keepdims=True), ref.shape).copy()
    stats = accuracy_stats([mean], [ref], None, "eager:fp32", ["logits"])
    assert stats.cosine > 0.99  # the plain cosine: within a 1-point budget
    assert stats.centered_cosine == pytest.approx(0.0, abs=1e-9)
    drop, basis = accuracy_drop(stats, random_init=True)
    assert drop == pytest.approx(100.0) and basis.startswith("100 x (1 - centered output cosine vs FP32)")
    gate = gate_verdict(stats, Budget(), random_init=True)
    assert gate.passed is False and gate.reason is not None and "lost 100.00 points" in gate.reason


def test_noise_as_large_as_the_input_effect_fails_and_rounding_passes() -> None:
    ref = _shared_heavy()
    spread = float((ref - ref.mean(0)).std())
    rng = np.random.default_rng(1)
    noisy = ref + rng.normal(size=ref.shape).astype(np.float32) * spread
    stats = accuracy_stats([noisy], [ref], None, "r", ["logits"])
    assert stats.cosine > 0.98 and stats.centered_cosine is not None and 0.6 < stats.centered_cosine < 0.8
    assert gate_verdict(stats, Budget(), random_init=True).passed is False
    rounded = ref + rng.normal(size=ref.shape).astype(np.float32) * spread * 1e-3
    fine = accuracy_stats([rounded], [ref], None, "r", ["logits"])
    assert fine.centered_cosine is not None and fine.centered_cosine > 0.9999
    assert gate_verdict(fine, Budget(), random_init=True).passed is True


def test_top1_bases_are_unchanged_and_one_input_falls_back_to_the_plain_cosine() -> None:
    ref = _shared_heavy()
    got = ref.copy()
    got[0] = got[0][::-1]
    stats = accuracy_stats([got], [ref], None, "r", ["logits"])
    assert accuracy_drop(stats)[1] == "top-1 agreement with FP32 (no labels)"
    one = compare_outputs([ref[:1] * 1.01], [ref[:1]], ["logits"])
    assert one.centered_cosine is None and centered_cosine(ref[:1], ref[:1], 1) is None
    single = accuracy_stats([ref[:1] * 1.01], [ref[:1]], None, "r", ["logits"])
    drop, basis = accuracy_drop(single, random_init=True)
    assert basis.startswith("100 x (1 - output cosine vs FP32)") and drop == pytest.approx(0.0, abs=1e-6)


def test_centered_cosine_per_output_worst_and_non_finite_columns() -> None:
    ref = _shared_heavy()
    boxes = np.random.default_rng(2).normal(size=(16, 4, 4)).astype(np.float32)
    cmp = compare_outputs([ref, boxes * -1.0], [ref, boxes], ["logits", "boxes"])
    assert cmp.per_output["logits"].centered_cosine == pytest.approx(1.0)
    assert cmp.per_output["boxes"].centered_cosine is not None and cmp.per_output["boxes"].centered_cosine < 0
    assert cmp.centered_cosine == cmp.per_output["boxes"].centered_cosine  # the worst
    with_nan = ref.copy()
    with_nan[3, 7] = np.nan  # the same NaN in both: column 7 is left out of the centred comparison
    assert centered_cosine(with_nan, with_nan, 16) == pytest.approx(1.0)
    assert centered_cosine(ref[:, :5], ref, 16) is None  # shapes differ: compare_outputs says infinitely far
    assert compare_outputs([ref[:, :5]], [ref], ["logits"]).centered_cosine == 0.0


BIASED = Path(__file__).resolve().parent / "fixtures" / "biased.py"


def run_biased_int8(tmp_path: Path, factory: str) -> tuple[AccuracyStats, GateResult]:
    """``convert tests/fixtures/biased.py:FACTORY --int8``: it fails its gate (exit 5); the INT8 file's stats and gate."""
    out = tmp_path / "out"
    cfg = ConvertConfig(export=ExportConfig(model=f"{BIASED}:{factory}"), out=out,
                        quant=QuantConfig(int8_static=True, calib=CalibConfig(data="imagenet_subset", size=16)))
    with pytest.raises(AccuracyGateError, match="int8_static_minmax lost"):
        run_convert(cfg, log=lambda _m: None)
    art = Manifest.load(out).artifacts["int8_static_minmax"]
    acc, gate = art.metrics.accuracy, art.metrics.gate
    assert acc is not None and gate is not None and gate.passed is False
    return acc, gate


def test_int8_that_loses_the_input_effect_fails_its_gate(tmp_path: Path) -> None:
    """ONNX Runtime's static INT8 quantizes the output over the range of the shared bias (+-50, steps of 0.4), which
    rounds away the part the input sets: the plain cosine 0.99999 passed it, the centered one fails it."""
    acc, gate = run_biased_int8(tmp_path, "build")
    assert acc.cosine > 0.9999  # what the old basis graded: a drop of 0.00 points
    assert acc.centered_cosine is not None and acc.centered_cosine < 0.9
    assert gate.basis.startswith("100 x (1 - centered output cosine vs FP32): not a classifier output")
