"""Static INT8's op types (``--int8-ops``): where the graph has attention only Conv/ConvTranspose/Gemm/MatMul are
quantized (its layer norms, residual Adds and GELU stay float), elsewhere every type ONNX Runtime can
quantize; the attention detector over ONNX graphs, shared with NNCF's model type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import cli
from convert.attention import AttentionCount, onnx_attention
from core.manifest import Manifest
from tests.test_not_measurable import TINY_VIT

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _graph(nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
    import numpy as np

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])


def test_onnx_attention_counts_matmuls_of_two_activations() -> None:
    """A MatMul with a weight (an initializer, through Transpose) is not attention; one of two activations is; a fused
    attention op is attention by itself."""
    wt = helper.make_node("Transpose", ["w"], ["wt"])
    proj = helper.make_node("MatMul", ["x", "wt"], ["p"])
    scores = helper.make_node("MatMul", ["p", "x"], ["s"])
    soft = helper.make_node("Softmax", ["s"], ["y"])
    mlp = helper.make_node("Relu", ["p"], ["y"])
    einsum = helper.make_node("Einsum", ["p", "x"], ["s"], equation="ij,kj->ik")
    fused = helper.make_node("Attention", ["x", "w"], ["y"], domain="com.microsoft", num_heads=1)
    assert onnx_attention(_graph([wt, proj, scores, soft])) == AttentionCount(1, 1)
    assert onnx_attention(_graph([wt, proj, mlp])) == AttentionCount(0, 0)
    assert onnx_attention(_graph([wt, proj, einsum, soft])).found
    assert not onnx_attention(_graph([wt, proj, helper.make_node("Softmax", ["p"], ["y"])])).found
    assert onnx_attention(_graph([fused])).found


def _quantized_apart_from_weighted(path: Path) -> set[str]:
    """The op types around each activation quantized away from any weighted op: a tensor with a QuantizeLinear that
    no Conv/Gemm/MatMul writes or reads (through its QuantizeLinear -> DequantizeLinear pair). Empty where only the
    weighted ops' inputs and outputs are quantized."""
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    readers: dict[str, set[str]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    found: set[str] = set()
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producer):
        dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
        around = {producer[q.input[0]]} | {t for d in dq for t in readers.get(d.output[0], set())}
        if not around & WEIGHTED:
            found |= around
    return found


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny ViT converted once with ``--int8-ops auto,all,weighted``: (its folder, convert's output)."""
    root = tmp_path_factory.mktemp("int8_ops")
    (root / "tiny_vit.py").write_text(TINY_VIT)
    out = root / "out"
    res = CliRunner().invoke(cli.app, [
        "convert", f"{root / 'tiny_vit.py'}:build", "--out", str(out), "--no-optimize", "--int8", "--calib",
        "imagenet_subset", "--calib-size", "16", "--eval-size", "16", "--max-accuracy-drop", "100",
        "--min-cosine", "-1", "--int8-ops", "auto,all,weighted"])
    assert res.exit_code == 0, res.output
    return out, " ".join(res.output.split())


def _static(out: Path, name: str = "int8_static_minmax") -> Any:
    return Manifest.load(out).artifacts[name]


def test_a_transformer_quantizes_only_its_weighted_ops(vit_run: tuple[Path, str]) -> None:
    """A ViT's static INT8 quantizes its MatMuls (weights and attention's two activations), Gemm and patch Conv only
    (their inputs and outputs: no activation is quantized apart from them), says why in the manifest; its output moves
    much less from FP32 than with every op type quantized (the tiny ViT: centered cosine 0.9990 against 0.9700 on 16
    held-out photos). The further op sets of ``--int8-ops auto,all,weighted``: all is a variant of its own
    (int8_static_minmax_all, same ranges and held-out data), weighted is what auto chose (no variant)."""
    out, log = vit_run
    art = _static(out)
    assert set(art.params.op_types) == WEIGHTED
    assert art.params.op_types_reason.startswith("auto: attention in the graph (4 MatMul/Einsum of two activations, "
                                                 "2 Softmax)")
    assert _quantized_apart_from_weighted(out / art.file.path) == set()
    every = _static(out, "int8_static_minmax_all")
    assert every.params.op_types_reason == "--int8-ops all: every op type ONNX Runtime can quantize"
    assert every.params.calibration == art.params.calibration and every.metrics.held_out == art.metrics.held_out
    assert {"LayerNormalization", "Add"} <= _quantized_apart_from_weighted(out / every.file.path)
    auto_c, all_c = art.metrics.accuracy.centered_cosine, every.metrics.accuracy.centered_cosine
    assert 1 - auto_c < (1 - all_c) / 5, (auto_c, all_c)
    assert "int8_static_minmax_weighted" not in Manifest.load(out).artifacts
    assert "--int8-ops weighted: the same op types as an earlier set" in log, log


def test_a_cnn_keeps_every_op_type(digits_model: Any, tmp_path: Path) -> None:
    """Without attention nothing changes: every op type ONNX Runtime can quantize (the CNN's pooling too)."""
    res = CliRunner().invoke(cli.app, ["convert", digits_model.factory, "--weights", str(digits_model.weights), "--out",
                                       str(tmp_path / "out"), "--no-optimize", "--int8", "--calib",
                                       str(digits_model.calib_npz), "--calib-size", "32"])
    assert res.exit_code == 0, res.output
    art = _static(tmp_path / "out")
    assert art.params.op_types_reason.startswith("auto: no attention in the graph (0 MatMul/Einsum")
    assert {"Relu", "MaxPool", "Softmax", "Add", "GlobalAveragePool"} <= set(art.params.op_types)
    assert {"MaxPool", "GlobalAveragePool"} & _quantized_apart_from_weighted(tmp_path / "out" / art.file.path)


def test_the_flag_needs_int8_and_a_known_value(digits_model: Any, tmp_path: Path) -> None:
    def run(*extra: str) -> Any:
        return CliRunner().invoke(cli.app, ["convert", digits_model.factory, "--weights", str(digits_model.weights),
                                            "--out", str(tmp_path / "out"), "--no-optimize", *extra])

    res = run("--int8-dynamic", "--int8-ops", "weighted")
    assert res.exit_code == 2 and "--int8-ops tunes static INT8 (ONNX Runtime's quantize_static): add --int8" \
        in " ".join(res.output.split()), res.output
    res = run("--int8", "--calib", str(digits_model.calib_npz), "--int8-ops", "matmul")
    assert res.exit_code == 2 and "unknown --int8-ops 'matmul'; choose auto or all or weighted" \
        in " ".join(res.output.split()), res.output
    res = run("--int8", "--calib", str(digits_model.calib_npz), "--int8-ops", "all,weighted,all")
    assert res.exit_code == 2 and "--int8-ops 'all,weighted,all' names an op set twice" \
        in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out").exists()


def test_nothing_left_to_quantize_is_an_input_error(digits_model: Any, tmp_path: Path) -> None:
    """--exclude-op-types that leaves static INT8 no op of the graph to quantize is refused in one line (ONNX Runtime
    would write an FP32 copy under an INT8 name), and nothing is left half-written."""
    res = CliRunner().invoke(cli.app, ["convert", digits_model.factory, "--weights", str(digits_model.weights), "--out",
                                       str(tmp_path / "out"), "--no-optimize", "--int8", "--calib",
                                       str(digits_model.calib_npz), "--int8-ops", "weighted", "--exclude-op-types",
                                       "Conv,Gemm"])
    assert res.exit_code == 2, res.output
    assert ("static INT8 has nothing to quantize: the graph has no op of ConvTranspose, MatMul (--int8-ops weighted"
            in " ".join(res.output.split())), res.output


@pytest.mark.parametrize("ops", ["auto", "all"])
def test_int8_trt_follows_the_op_set(vit_run: tuple[Path, str], ops: str, tmp_path: Path) -> None:
    """``int8_trt`` (TensorRT's Q/DQ, convert --trt --int8) quantizes TensorRT's op types among static INT8's: a ViT's
    residual Adds stay float under auto (quantized, they cost vit_b_16 ~20 points) and are quantized under all."""
    from convert.config import CalibConfig, ConvertConfig, ExportConfig, GateConfig, QuantConfig
    from convert.pipeline import run_convert

    quant = QuantConfig(int8_static=True, trt_qdq=True, int8_ops=ops, calib=CalibConfig(data="imagenet_subset", size=8),
                        gate=GateConfig(max_accuracy_drop=100.0, min_cosine=-1.0, eval_size=8))
    cfg = ConvertConfig(export=ExportConfig(model=f"{vit_run[0].parent / 'tiny_vit.py'}:build", optimize=False),
                        out=tmp_path / "out", quant=quant)
    manifest, _ = run_convert(cfg, log=lambda _m: None)
    trt = manifest.artifacts["int8_trt"]
    apart = _quantized_apart_from_weighted(tmp_path / "out" / trt.file.path)
    if ops == "auto":
        assert trt.params.op_types == ["Conv", "ConvTranspose", "Gemm", "MatMul"] and apart == set()
    else:
        assert trt.params.op_types == ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add"] and "Add" in apart
