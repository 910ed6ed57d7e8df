"""`convert --int8 ...` through the CLI: every bad calibration input is one clear line and a non-zero exit,
checked before the model is exported; a failed accuracy gate exits non-zero with the artifact kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import cli


def _invoke(digits: Any, out: Path, *extra: str) -> Any:
    args = ["convert", digits.factory, "--weights", str(digits.weights), "--out", str(out), *extra]
    return CliRunner().invoke(cli.app, args)


def _bad(kind: str, tmp: Path) -> tuple[list[str], str]:
    if kind == "missing":
        return ["--int8", "--calib", str(tmp / "nope")], "does not exist"
    if kind == "empty":
        (tmp / "empty").mkdir()
        return ["--int8", "--calib", str(tmp / "empty")], "has no images"
    if kind == "non_images":
        folder = tmp / "junk"
        folder.mkdir()
        for i in range(6):
            (folder / f"{i}.jpg").write_text("text, not an image")
        return ["--int8", "--calib", str(folder)], "could be read as an image"
    if kind == "npz_names":
        np.savez(tmp / "n.npz", pixels=np.zeros((8, 1, 16, 16), np.float32))
        return ["--int8", "--calib", str(tmp / "n.npz")], "but the model's inputs are ['input']"
    if kind == "npz_shapes":
        np.savez(tmp / "s.npz", input=np.zeros((8, 1, 8, 8), np.float32))
        return ["--int8", "--calib", str(tmp / "s.npz")], "does not match the model's"
    if kind == "method":
        return ["--int8", "--calib", "synthetic", "--calib-method", "kl"], "unknown --calib-method 'kl'"
    if kind == "no_calib":
        return ["--int8"], "--int8 needs calibration data"
    if kind == "auto_without_int8":
        return ["--int8-dynamic", "--auto"], "--auto tunes static INT8"
    if kind == "layout":
        return ["--int8", "--calib", "synthetic", "--int8-layouts", "qop_xx_u8"], "bad layout 'qop_xx_u8'"
    if kind == "layout_without_int8":
        return ["--int8-dynamic", "--int8-layouts", "qop_pc_u8"], "--int8-layouts are layouts of static INT8"
    if kind == "no_variant":
        return ["--calib", "imagenet_subset"], "add --fp16, --int8, --int8-dynamic, --int8-nncf, --int4 or --int4-ov"
    return ["--int8", "--calib", "synthetic", "--activation-type", "int4"], "unknown --activation-type 'int4'"


@pytest.mark.parametrize("kind", ["missing", "empty", "non_images", "npz_names", "npz_shapes", "method", "no_calib",
                                  "auto_without_int8", "no_variant", "qtype", "layout",
                                  "layout_without_int8"])
def test_bad_calibration_input_is_one_line(digits_model: Any, tmp_path: Path, kind: str) -> None:
    extra, expect = _bad(kind, tmp_path)
    res = _invoke(digits_model, tmp_path / "out", *extra)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in " ".join(res.output.split())
    assert not (tmp_path / "out" / "model.onnx").exists(), "checked before the export"


def test_failed_gate_exits_non_zero_and_keeps_the_failed_artifact(digits_model: Any, tmp_path: Path) -> None:
    """No budget flag given: the default gate (1 point, cosine 0.99) still fails a ruined INT8 variant, which
    is recorded as failed with its budget, and left out of bench unless named."""
    from core.manifest import Manifest
    from runtimes.harness import BenchConfig, select_targets

    np.savez(tmp_path / "const.npz", input=np.full((16, 1, 16, 16), 1.0, np.float32))
    np.savez(tmp_path / "test.npz", input=digits_model.x_test, labels=digits_model.y_test)
    res = _invoke(digits_model, tmp_path / "out", "--int8", "--calib", str(tmp_path / "const.npz"),
                  "--eval-data", str(tmp_path / "test.npz"))
    assert res.exit_code == 5, res.output
    assert "variant gate failed: int8_static_minmax lost" in " ".join(res.output.split())
    man = Manifest.load(tmp_path / "out")
    art = man.artifacts["int8_static_minmax"]
    assert art.status == "failed" and art.metrics.gate is not None
    assert (art.metrics.gate.budget_points, art.metrics.gate.min_cosine, art.metrics.gate.passed) == (1.0, 0.99, False)
    cfg = BenchConfig(artifact_dir=tmp_path / "out", backends=["ort"])
    assert "int8_static_minmax" not in {t.artifact.name for t in select_targets(man, cfg)}
    named = cfg.model_copy(update={"variants": ["int8_static_minmax"]})
    assert {t.artifact.name for t in select_targets(man, named)} == {"int8_static_minmax"}


def test_int8_layouts_are_variants_in_their_layout(digits_model: Any, tmp_path: Path) -> None:
    """--int8-layouts: one more static INT8 variant per layout, from the same ranges, each graded on the same
    held-out data; QOperator files hold QLinear operators, per-tensor files one weight scale per tensor, s8 files
    signed activations; the config's own layout is not written twice."""
    import onnx
    import onnxruntime as ort

    from core.manifest import Manifest

    np.savez(tmp_path / "test.npz", input=digits_model.x_test, labels=digits_model.y_test)
    res = _invoke(digits_model, tmp_path / "out", "--int8", "--calib", str(digits_model.calib_npz), "--calib-size",
                  "64", "--eval-data", str(tmp_path / "test.npz"), "--int8-layouts", "qop_pc_u8,qdq_pt_s8,qdq_pc_u8")
    assert res.exit_code == 0, res.output
    man = Manifest.load(tmp_path / "out")
    names = sorted(n for n in man.artifacts if n.startswith("int8_static"))
    assert names == ["int8_static_minmax", "int8_static_minmax_qdq_pt_s8", "int8_static_minmax_qop_pc_u8"]
    for name in names:
        art = man.artifacts[name]
        assert art.status == "ok" and art.metrics.accuracy is not None, (name, art.metrics.summary)
    qop = onnx.load(str(tmp_path / "out" / man.artifacts["int8_static_minmax_qop_pc_u8"].file.path))
    ops = {n.op_type for n in qop.graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops, ops  # every Conv became a QLinear operator
    pt = onnx.load(str(tmp_path / "out" / man.artifacts["int8_static_minmax_qdq_pt_s8"].file.path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in pt.graph.initializer}
    dq = [n for n in pt.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
          and inits[n.input[0]].ndim == 4]  # the conv weights
    assert dq and all(inits[n.input[1]].size == 1 for n in dq), "per-tensor: one scale per weight tensor"
    q = [n for n in pt.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(inits[n.input[2]].dtype == np.int8 for n in q), "s8: signed activations"
    feed = {"input": digits_model.x_test[:16]}
    outs = [ort.InferenceSession(str(tmp_path / "out" / man.artifacts[n].file.path),
                                 providers=["CPUExecutionProvider"]).run(None, feed)[0] for n in names]
    for o in outs[1:]:
        assert (o.argmax(1) == outs[0].argmax(1)).mean() >= 0.9
