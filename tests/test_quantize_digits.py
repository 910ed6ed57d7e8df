"""FP16 / dynamic INT8 / static INT8 on a CNN trained on scikit-learn's digits, checked on the held-out split.

Accuracies are computed here independently (ONNX Runtime on ``x_test`` against ``y_test``), not read
back from the manifest; the manifest's numbers must then agree with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.config import CalibConfig, ConvertConfig, ExportConfig, GateConfig, QuantConfig
from convert.pipeline import run_convert
from core.errors import AccuracyGateError, InputError
from core.fsutil import sha256_file
from core.manifest import Manifest

#: The held-out batch size of the gates, which the independent evaluation below uses too: dynamic INT8
#: quantizes activations per run over the whole batch (one scale per tensor per run), so its outputs
#: depend on which samples share a batch, and only evaluations in the same batches are comparable.
GATE_BATCH = GateConfig().eval_batch


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray, simulate_qdq: bool = False, batch: int = 100) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if simulate_qdq:  # Q/DQ as written, no fused integer kernels: how TensorRT computes int8_trt
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((logits.argmax(1) == y).mean())


def _convert(digits: Any, out: Path, quant: QuantConfig) -> tuple[Manifest, Path]:
    cfg = ConvertConfig(export=ExportConfig(model=digits.factory, weights=str(digits.weights)), out=out, quant=quant)
    return run_convert(cfg, log=lambda _m: None)


@pytest.fixture(scope="module")
def eval_npz(digits_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("digits_eval") / "test.npz"
    np.savez(path, input=digits_model.x_test, labels=digits_model.y_test)
    return path


@pytest.fixture(scope="module")
def variants(digits_model: Any, eval_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    quant = QuantConfig(fp16=True, int8_static=True, int8_dynamic=True, trt_qdq=True,
                        calib=CalibConfig(data=str(digits_model.calib_npz), size=200, methods=["minmax", "entropy"]),
                        gate=GateConfig(eval_data=str(eval_npz), eval_size=400, max_accuracy_drop=1.0,
                                        eval_batch=GATE_BATCH))
    return _convert(digits_model, tmp_path_factory.mktemp("digits_q"), quant)


@pytest.mark.parametrize(("name", "budget_points"), [("int8_static_minmax", 1.0), ("int8_static_entropy", 1.0),
                                                     ("fp16", 0.2), ("int8_dynamic", 1.0), ("int8_trt", 1.0)])
def test_variant_accuracy_on_held_out_split(digits_model: Any, variants: tuple[Manifest, Path], name: str,
                                            budget_points: float) -> None:
    manifest, out = variants
    x, y = digits_model.x_test, digits_model.y_test
    # In the gate's batches (GATE_BATCH): dynamic INT8's results depend on the batch composition.
    fp32 = _accuracy(out / manifest.artifacts["opt"].file.path, x, y, batch=GATE_BATCH)
    got = _accuracy(out / manifest.artifacts[name].file.path, x, y, simulate_qdq=name == "int8_trt", batch=GATE_BATCH)
    assert abs(fp32 - digits_model.test_accuracy) < 0.005  # the ONNX FP32 model is the trained model
    assert 100 * (fp32 - got) <= budget_points, f"{name}: {got:.4f} vs fp32 {fp32:.4f}"
    acc = manifest.artifacts[name].metrics.accuracy
    assert acc.samples == len(y)
    assert acc.top1_acc == pytest.approx(got) and acc.ref_top1_acc == pytest.approx(fp32)


def test_variants_are_recorded_with_their_calibration(digits_model: Any, variants: tuple[Manifest, Path]) -> None:
    from calibration.cpu import cpu_features
    from calibration.loaders import open_source

    manifest, out = variants
    assert manifest.verify(out) == []
    static = manifest.artifacts["int8_static_minmax"]
    assert (static.precision, static.parent, static.status, static.step) == ("int8", "opt", "ok", "quantize_static")
    assert static.file.sha256 == sha256_file(out / static.file.path)
    p = static.params
    assert p.method == "minmax" and p.quant_format == "QDQ" and p.per_channel is True
    assert p.reduce_range == cpu_features().needs_reduce_range
    calib = p.calibration
    expected = open_source(str(digits_model.calib_npz), manifest.iospec, None, size=200, seed=0)
    assert calib.sha256 == expected.digest() and calib.images_used == 200
    assert str(digits_model.calib_npz) in calib.source
    gate = static.metrics.gate
    assert gate is not None and gate.passed is True and gate.budget_points == 1.0
    assert static.metrics.held_out is not None and static.metrics.held_out.labels is True
    assert manifest.artifacts["fp16"].precision == "fp16" and manifest.artifacts["int8_dynamic"].precision == "int8"
    assert not list(out.glob(".quant-*")), "the work folder is removed"


def test_int8_trt_follows_tensorrts_rules_from_the_same_ranges(variants: tuple[Manifest, Path]) -> None:
    """TensorRT's explicit quantization: signed INT8 with zero point 0, FP32 bias, per-channel weights."""
    import onnx
    from onnx import numpy_helper

    from convert.engine import check_source, source_reference
    from convert.trt_qdq import trt_qdq_problems

    manifest, out = variants
    trt = manifest.artifacts["int8_trt"]
    assert (trt.precision, trt.parent, trt.status, trt.step) == ("int8", "opt", "ok", "quantize_static_trt")
    assert trt.params.method == "minmax" and trt.params.calibration.cache == \
        manifest.artifacts["int8_static_minmax"].params.calibration.cache, "one calibration, two quantizations"
    path = out / trt.file.path
    assert trt_qdq_problems(path) == []
    check_source(trt, out)  # an INT8 engine may be built from it
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(init[n.input[2]].dtype == np.int8 and not init[n.input[2]].any() for n in qdq)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    producers = {o: n for n in graph.node for o in n.output}
    for conv in convs:
        assert producers[conv.input[1]].op_type == "DequantizeLinear"  # INT8 weights
        assert len(conv.input) < 3 or conv.input[2] in init, "bias stays an FP32 initializer"
        weight_dq = producers[conv.input[1]]
        assert init[weight_dq.input[1]].size == init[weight_dq.input[0]].shape[0], "one scale per output channel"
    # What an INT8 engine's parity is checked against: this Q/DQ graph run as written, not fused.
    import onnxruntime as ort

    feed = manifest.iospec.random_feed(4, seed=0)
    got = source_reference(out, trt)(feed)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)
    assert len(got) == 1 and got[0].shape == (4, 10)
    np.testing.assert_array_equal(got[0], want[0])
    cpu = manifest.artifacts["int8_static_minmax"]  # ONNX Runtime's CPU layout: uint8 activations
    problems = trt_qdq_problems(out / cpu.file.path)
    assert any("UINT8 zero point" in x for x in problems) and any("INT32 input" in x for x in problems), problems
    with pytest.raises(InputError, match="not Q/DQ by TensorRT's rules.*int8_trt"):
        check_source(cpu, out)


def test_calibration_ranges_are_cached_and_reused(digits_model: Any, eval_npz: Path, tmp_path: Path) -> None:
    quant = QuantConfig(int8_static=True, calib=CalibConfig(data=str(digits_model.calib_npz), size=64),
                        gate=GateConfig(eval_data=str(eval_npz), eval_size=100))
    first, out = _convert(digits_model, tmp_path, quant)
    c1 = first.artifacts["int8_static_minmax"].params.calibration
    assert c1.cache_reused is False and c1.images_used == 64 and (out / c1.cache).is_file()
    second, _ = _convert(digits_model, tmp_path, quant)
    c2 = second.artifacts["int8_static_minmax"].params.calibration
    assert c2.cache_reused is True and c2.cache == c1.cache and c2.images_used == 64
    assert second.artifacts["int8_static_minmax"].file.sha256 == first.artifacts["int8_static_minmax"].file.sha256
    other = quant.model_copy(update={"calib": CalibConfig(data=str(digits_model.calib_npz), size=32)})
    third, _ = _convert(digits_model, tmp_path, other)  # other data: other key, calibrated afresh
    c3 = third.artifacts["int8_static_minmax"].params.calibration
    assert c3.cache_reused is False and c3.cache != c1.cache and c3.images_used == 32
    (out / c3.cache).write_text("{not json")  # a damaged cache is recomputed, not trusted
    fourth, _ = _convert(digits_model, tmp_path, other)
    assert fourth.artifacts["int8_static_minmax"].params.calibration.cache_reused is False


def test_bench_picks_up_every_variant(variants: tuple[Manifest, Path]) -> None:
    from runtimes.harness import BenchConfig, select_targets

    manifest, out = variants
    names = {t.artifact.name for t in select_targets(manifest, BenchConfig(artifact_dir=out, backends=["ort"]))}
    assert {"fp16", "int8_dynamic", "int8_static_minmax", "int8_static_entropy", "opt"} <= names
    assert "int8_trt" not in names, "made for TensorRT: ONNX Runtime runs it only when asked"
    asked = BenchConfig(artifact_dir=out, backends=["ort", "eager"], variants=["int8_trt"])
    assert {(t.backend, t.artifact.name) for t in select_targets(manifest, asked)} == {("ort", "int8_trt"),
                                                                                      ("eager", "torch")}


@pytest.fixture(scope="module")
def constant_calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration data that ruins static INT8: every input pixel is the same value."""
    path = tmp_path_factory.mktemp("const") / "const.npz"
    np.savez(path, input=np.full((16, 1, 16, 16), 1.0, np.float32))
    return path


def test_gate_fails_marks_artifact_and_bench_skips_it(digits_model: Any, eval_npz: Path, constant_calib: Path,
                                                      tmp_path: Path) -> None:
    from runtimes.harness import BenchConfig, select_targets

    quant = QuantConfig(int8_static=True, calib=CalibConfig(data=str(constant_calib)),
                        gate=GateConfig(eval_data=str(eval_npz), max_accuracy_drop=1.0))
    with pytest.raises(AccuracyGateError, match=r"int8_static_minmax lost .* points of top-1 accuracy"):
        _convert(digits_model, tmp_path, quant)
    manifest = Manifest.load(tmp_path)
    art = manifest.artifacts["int8_static_minmax"]
    assert art.status == "failed" and art.metrics.gate.passed is False
    assert art.metrics.gate.drop_points > 1.0
    targets = select_targets(manifest, BenchConfig(artifact_dir=tmp_path, backends=["ort"]))
    assert "int8_static_minmax" not in {t.artifact.name for t in targets}


def test_auto_keeps_error_adding_nodes_in_fp32(digits_model: Any, eval_npz: Path, constant_calib: Path,
                                               tmp_path: Path) -> None:
    quant = QuantConfig(int8_static=True, calib=CalibConfig(data=str(constant_calib)),
                        gate=GateConfig(eval_data=str(eval_npz), max_accuracy_drop=1.0, auto=True))
    manifest, out = _convert(digits_model, tmp_path, quant)
    art = next(a for a in manifest.artifacts.values() if a.step == "quantize_static")
    auto = art.params.auto
    assert art.status == "ok" and art.metrics.gate.passed is True
    assert [t.method for t in auto.trials[:3]] == ["minmax", "entropy", "percentile"]
    assert auto.fp32_nodes and auto.fp32_nodes == art.params.fp32_nodes
    ranked = [r.node for r in auto.ranking_top]
    assert auto.fp32_nodes == ranked[:len(auto.fp32_nodes)], "the worst-ranked nodes are the ones kept"
    assert "within budget" in auto.reason
    fp32 = _accuracy(out / manifest.artifacts["opt"].file.path, digits_model.x_test, digits_model.y_test)
    got = _accuracy(out / art.file.path, digits_model.x_test, digits_model.y_test)
    assert 100 * (fp32 - got) <= 1.0


@pytest.mark.parametrize("failure", ["unknown_node", "quantizer_crash"])
def test_a_failing_quantization_leaves_no_work_folder(digits_model: Any, eval_npz: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """The work folder (``.quant-*``) is removed when a step raises, a user error or an unexpected one."""
    import convert.quantize

    gate = GateConfig(eval_data=str(eval_npz), eval_size=32)
    if failure == "unknown_node":  # refused once the pre-processed model's node names are known
        quant = QuantConfig(int8_dynamic=True, exclude_nodes=["no_such_node"], gate=gate)
        expect: type[Exception] = InputError
    else:
        def crash(*_a: Any, **_k: Any) -> None:
            raise RuntimeError("quantizer crashed")

        monkeypatch.setattr(convert.quantize, "quantize_dynamic_file", crash)
        quant = QuantConfig(int8_dynamic=True, gate=gate)
        expect = AccuracyGateError  # an optional variant that fails: the rest is written, exit as for a gate
    with pytest.raises(expect):
        _convert(digits_model, tmp_path, quant)
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.staging-*")), "no staging folder is left"
    if failure == "unknown_node":
        # A user error after the export, in the quantization steps: the staged run (work folder included) is
        # dropped and the output folder keeps what it held before, here nothing.
        assert list(tmp_path.iterdir()) == [], "the staged files and the work folder are removed"
        return
    # The quantizer's crash leaves int8_dynamic out (with its reason) and the work folder removed; the rest is in.
    names = {p.name for p in tmp_path.iterdir()}
    assert not [n for n in names if n.startswith(".quant")] and "model.int8_dynamic.onnx" not in names
    manifest = Manifest.load(tmp_path)
    assert [(f.name, f.status) for f in manifest.failed_variants] == [("int8_dynamic", "failed")]
    assert "quantizer crashed" in manifest.failed_variants[0].reason and "fp32" in manifest.artifacts
