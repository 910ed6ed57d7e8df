"""int8_nncf: OpenVINO's own INT8 (NNCF quantize on the ov.Model), an OpenVINO IR gated on held-out data like every
INT8 variant; and channels_last as a search option of the PyTorch backends for image inputs only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from core.manifest import Manifest

pytest.importorskip("nncf")
pytest.importorskip("openvino")


def _invoke(digits: Any, out: Path, *extra: str) -> Any:
    args = ["convert", digits.factory, "--weights", str(digits.weights), "--out", str(out), "--no-optimize", *extra]
    return CliRunner().invoke(cli.app, args)


@pytest.fixture(scope="module")
def eval_npz(digits_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nncf_eval") / "test.npz"
    np.savez(path, input=digits_model.x_test[:200], labels=digits_model.y_test[:200])
    return path


@pytest.fixture(scope="module")
def nncf_art(digits_model: Any, eval_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nncf") / "out"
    res = _invoke(digits_model, out, "--int8-nncf", "--calib", str(digits_model.calib_npz), "--calib-size", "64",
                  "--eval-data", str(eval_npz))
    assert res.exit_code == 0, res.output
    return out


def test_ir_holds_int8_and_its_gate(nncf_art: Path, digits_model: Any) -> None:
    """The IR really is INT8 (FakeQuantize nodes, i8 weight constants), hashed with its .bin, gated on held-out data;
    its accuracy, recomputed here on OpenVINO, is the recorded one."""
    import openvino as ov

    man = Manifest.load(nncf_art)
    art = man.artifacts["int8_nncf"]
    assert art.kind == "openvino_ir" and art.precision == "int8" and art.status == "ok"
    assert art.file.path == "model.int8_nncf.xml" and [d.path for d in art.file.external_data] == ["model.int8_nncf.bin"]
    assert man.verify(nncf_art) == []
    model = ov.Core().read_model(str(nncf_art / art.file.path))
    types = [op.get_type_name() for op in model.get_ops()]
    consts = [op.get_element_type().get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant"]
    assert types.count("FakeQuantize") >= 2 and "i8" in consts
    assert art.params.fake_quantize == types.count("FakeQuantize")  # type: ignore[union-attr]
    gate = art.metrics.gate
    assert gate is not None and gate.passed is True and gate.samples == 200
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits = np.concatenate([compiled(digits_model.x_test[i:i + 50])[0] for i in range(0, 200, 50)])
    acc = float((logits.argmax(1) == digits_model.y_test[:200]).mean())
    assert art.metrics.accuracy is not None and abs(art.metrics.accuracy.top1_acc - acc) < 0.011
    assert acc > digits_model.test_accuracy - 0.05


def test_over_budget_exits_5_and_marks_it_failed(digits_model: Any, eval_npz: Path, tmp_path: Path) -> None:
    res = _invoke(digits_model, tmp_path / "out", "--int8-nncf", "--calib", str(digits_model.calib_npz),
                  "--calib-size", "32", "--eval-data", str(eval_npz), "--min-cosine", "0.999999")
    assert res.exit_code == 5, res.output
    assert "variant gate failed: int8_nncf output cosine" in " ".join(res.output.split())
    art = Manifest.load(tmp_path / "out").artifacts["int8_nncf"]
    assert art.status == "failed" and art.metrics.gate is not None and art.metrics.gate.passed is False


def test_needs_calibration_data(digits_model: Any, tmp_path: Path) -> None:
    res = _invoke(digits_model, tmp_path / "out", "--int8-nncf")
    assert res.exit_code == 2 and "--int8-nncf needs calibration data" in res.output, res.output


def _fake_quantized(xml: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(op types a FakeQuantize feeds, op types whose output a FakeQuantize quantizes), with counts."""
    import openvino as ov

    feeds: dict[str, int] = {}
    of: dict[str, int] = {}
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        src = op.input(0).get_source_output().get_node().get_type_name()
        of[src] = of.get(src, 0) + 1
        for target in op.output(0).get_target_inputs():
            kind = target.get_node().get_type_name()
            feeds[kind] = feeds.get(kind, 0) + 1
    return feeds, of


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.test_not_measurable import TINY_VIT

    path = tmp_path_factory.mktemp("nncf_vit") / "tiny_vit.py"
    path.write_text(TINY_VIT)
    return f"{path}:build"


@pytest.mark.parametrize("flag", ["auto", "generic"])
def test_a_transformer_keeps_softmax_norms_and_residuals_in_float(tiny_vit: str, flag: str, tmp_path: Path) -> None:
    """A ViT (attention: MatMuls of two activations and a Softmax) is quantized as NNCF's transformer by default: only
    the MatMuls' and the patch Convolution's inputs are fake-quantized, after SmoothQuant's scaling (Multiply); the
    Softmax output, the layer norms (MVN) and the residual Adds stay float, where a generic model quantizes them
    all (vit_b_16: output cosine 0.91 vs FP32 as generic, outside the 1-point gate). ``--nncf-model-type generic``
    gives the generic quantization back; the manifest records which and why."""
    args = ["convert", tiny_vit, "--out", str(tmp_path / "out"), "--no-optimize", "--int8-nncf", "--calib",
            "imagenet_subset", "--calib-size", "8", "--eval-size", "8", "--min-cosine", "-1", "--max-accuracy-drop",
            "100"] + ([] if flag == "auto" else ["--nncf-model-type", flag])
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    art = Manifest.load(tmp_path / "out").artifacts["int8_nncf"]
    feeds, of = _fake_quantized(tmp_path / "out" / art.file.path)
    params = art.params
    assert params is not None and params.model_dump()["model_type"] == ("transformer" if flag == "auto" else "generic")
    if flag == "auto":
        assert params.model_dump()["model_type_reason"] == ("auto: attention in the graph (4 MatMul/Einsum of "
                                                            "two activations, 2 Softmax)")
        assert set(feeds) <= {"MatMul", "Convolution", "ShapeOf"} and feeds["MatMul"] >= 8, feeds
        assert set(of) <= {"Parameter", "Multiply"}, of
        assert "NNCF model type transformer (auto: attention in the graph" in " ".join(res.output.split())
    else:
        assert params.model_dump()["model_type_reason"] == "--nncf-model-type generic"
        assert feeds.get("MVN", 0) >= 4 and of.get("Softmax", 0) == 2 and of.get("Add", 0) > 0, (feeds, of)


def test_a_model_without_attention_is_generic(nncf_art: Path) -> None:
    params = Manifest.load(nncf_art).artifacts["int8_nncf"].params
    assert params is not None
    assert params.model_dump()["model_type"] == "generic"
    assert params.model_dump()["model_type_reason"].startswith("auto: no attention in the graph (0 MatMul/Einsum")


def test_attention_counts_activation_matmuls_only() -> None:
    """A MatMul with a weight (a Constant, through Convert and Transpose) is not attention; one of two inputs is."""
    import openvino as ov
    import openvino.opset13 as ops

    from convert.attention import AttentionCount, ov_attention

    x = ops.parameter([2, 4], ov.Type.f32)
    weight = ops.transpose(ops.convert(ops.constant(np.ones((3, 4), np.float16)), "f32"), [1, 0])
    projected = ops.matmul(x, weight, False, False)
    scores = ops.softmax(ops.matmul(projected, projected, False, True), 1)
    assert ov_attention(ov.Model([scores], [x])) == AttentionCount(1, 1)
    assert ov_attention(ov.Model([projected], [x])) == AttentionCount(0, 0)
    einsum = ops.softmax(ops.einsum([projected, projected], "ij,kj->ik"), 1)  # MaxViT's attention scores
    assert ov_attention(ov.Model([einsum], [x])) == AttentionCount(1, 1)
    assert ov_attention(ov.Model([ops.einsum([projected, weight], "ij,kj->ik")], [x])) == AttentionCount(0, 0)


def test_model_type_needs_int8_nncf(digits_model: Any, tmp_path: Path) -> None:
    res = _invoke(digits_model, tmp_path / "out", "--nncf-model-type", "transformer")
    assert res.exit_code == 2 and "--nncf-model-type tunes NNCF's INT8 for OpenVINO: add --int8-nncf" in res.output
    res = _invoke(digits_model, tmp_path / "out", "--int8-nncf", "--calib", str(digits_model.calib_npz),
                  "--nncf-model-type", "bert")
    assert res.exit_code == 2 and "unknown --nncf-model-type 'bert'; choose auto or transformer or generic" \
        in " ".join(res.output.split()), res.output


def test_only_openvino_runs_it_others_skip_with_a_reason(nncf_art: Path) -> None:
    from runtimes.harness import BenchConfig, run_bench, select_targets

    man = Manifest.load(nncf_art)
    ov_targets = select_targets(man, BenchConfig(artifact_dir=nncf_art, backends=["openvino"],
                                                 variants=["int8_nncf"]))
    assert [t.artifact.name for t in ov_targets] == ["int8_nncf"]
    results = run_bench(BenchConfig(artifact_dir=nncf_art, backends=["ort", "openvino"], variants=["fp32", "int8_nncf"],
                                    batch_sizes=[1], warmup=1, iters=2, rounds=1), log=lambda _m: None)
    rows = {(r.backend, r.variant) for r in results.records}
    assert ("openvino", "int8_nncf") in rows and ("ort", "int8_nncf") not in rows and ("ort", "fp32") in rows
    assert any("int8_nncf" in w and "ort" in w and "openvino_ir" in w for w in results.warnings), results.warnings


def test_channels_last_only_for_image_inputs(tiny_artifacts: Path, tmp_path: Path) -> None:
    from runtimes.compiled import CompileRunner
    from runtimes.torch_eager import EagerRunner

    image = Manifest.load(tiny_artifacts)
    for runner in (EagerRunner, CompileRunner):
        assert {"channels_last": True} in [{k: v for k, v in s.items() if k == "channels_last"}
                                           for s in runner.search_space_for(image)]
    flat = image.model_copy(update={"iospec": image.iospec.model_copy(update={"inputs": [
        i.model_copy(update={"shape": i.shape[:2]}) for i in image.iospec.inputs]})})
    for runner in (EagerRunner, CompileRunner):
        assert all("channels_last" not in s for s in runner.search_space_for(flat))
