"""Top-1 agreement is a drop's basis only where it can see something.

Without labels a classifier's drop was its top-1 disagreement with FP32. Two cases made that blind: a reference whose
top-1 is one class for every held-out input (a random-init Hugging Face ViT says class 1 for each photo, so a variant
that ignored its input agreed 100%), and random inputs in convert's gate (bench already left agreement out there, so
the two graded the same file on different bases). Both are graded on the centered output cosine now; these tests
fail on the old code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convert.config import Budget, CalibConfig, ConvertConfig, ExportConfig, QuantConfig
from convert.gates import gate_verdict
from convert.pipeline import run_convert
from core.manifest import Manifest
from core.metrics import accuracy_drop, accuracy_stats, vacuous_agreement
from tests.test_centered_cosine import run_biased_int8

ONE_CLASS = "the FP32 reference's top-1 is one class for all"


def _one_class_logits(n: int = 12, classes: int = 10, seed: int = 0) -> np.ndarray:
    """Class scores whose last class wins for every input by a wide margin; the rest varies with the input."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    logits[:, -1] += 20.0
    return logits


def test_a_one_class_reference_is_graded_on_the_centered_cosine() -> None:
    ref = _one_class_logits()
    blind = np.broadcast_to(ref.mean(0), ref.shape).copy()  # ignores its input
    stats = accuracy_stats([blind], [ref], None, "eager:fp32", ["logits"])
    assert stats.ref_top1_classes == 1 and stats.top1_agreement == 1.0  # what the old basis graded: no loss
    assert vacuous_agreement(stats) is not None
    drop, basis = accuracy_drop(stats)
    assert drop == pytest.approx(100.0) and basis.startswith("100 x (1 - centered output cosine vs FP32): " + ONE_CLASS)
    assert gate_verdict(stats, Budget()).passed is False
    close = accuracy_stats([ref + np.float32(1e-3)], [ref], None, "eager:fp32", ["logits"])
    assert gate_verdict(close, Budget()).passed is True


def test_a_reference_that_varies_keeps_top1_and_one_input_cannot_be_one_class() -> None:
    ref = _one_class_logits()
    ref[::2, 0] += 40.0  # now two classes win
    stats = accuracy_stats([ref], [ref], None, "r", ["logits"])
    assert stats.ref_top1_classes == 2 and accuracy_drop(stats)[1] == "top-1 agreement with FP32 (no labels)"
    single = accuracy_stats([ref[:1]], [ref[:1]], None, "r", ["logits"])
    assert single.ref_top1_classes == 1 and vacuous_agreement(single) is None
    labels = np.full(len(ref), 9)
    labelled = accuracy_stats([_one_class_logits()], [_one_class_logits()], labels, "r", ["logits"])
    assert accuracy_drop(labelled)[1] == "top-1 accuracy (labels)"  # labels are measured as they are


def test_random_inputs_give_no_agreement() -> None:
    ref = _one_class_logits()
    ref[::2, 0] += 40.0
    stats = accuracy_stats([ref], [ref], None, "r", ["logits"], random_inputs=True)
    assert stats.top1_agreement is None and stats.top5_agreement is None and stats.scored_output == "logits"
    assert accuracy_drop(stats)[1].endswith("random inputs, whose top-1 class measures nothing")


def test_int8_of_a_one_class_classifier_fails_its_gate(tmp_path: Path) -> None:
    """Static INT8 quantizes the logits over the bias's range (+-50), rounding away the part the input sets: every
    top-1 still agrees (the old gate passed it with a drop of 0 points); the centered cosine fails it."""
    acc, gate = run_biased_int8(tmp_path, "build_scores")  # class scores whose top-1 is the last class
    assert acc.top1_agreement == 1.0 and acc.ref_top1_classes == 1
    assert acc.centered_cosine is not None and acc.centered_cosine < 0.9
    assert ONE_CLASS in gate.basis


def test_convert_grades_random_held_out_inputs_as_bench_does(tmp_path: Path) -> None:
    """Synthetic calibration keeps random held-out inputs: convert's gate leaves top-1 agreement out, as bench does."""
    out = tmp_path / "out"
    tiny = Path(__file__).resolve().parent / "fixtures" / "tiny_cnn.py"
    cfg = ConvertConfig(export=ExportConfig(model=f"{tiny}:build"), out=out,
                        quant=QuantConfig(fp16=True, calib=CalibConfig(data="synthetic")))
    run_convert(cfg, log=lambda _m: None)
    art = Manifest.load(out).artifacts["fp16"]
    acc, gate = art.metrics.accuracy, art.metrics.gate
    assert acc is not None and gate is not None and gate.passed is True
    assert acc.top1_agreement is None and acc.scored_output is not None
    assert gate.basis.endswith("random inputs, whose top-1 class measures nothing")
