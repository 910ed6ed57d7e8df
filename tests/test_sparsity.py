"""2:4 sparsity and channel pruning on a CNN trained on real data (scikit-learn digits).

The checks read the exported ONNX files and run them with ONNX Runtime here, independently of the
numbers the pipeline recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.config import Budget, SparsityConfig
from core.errors import InputError
from core.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_cnn.py"
ANY = Budget(max_accuracy_drop=100, min_cosine=-1)


def _run(model: str, out: Path, sparsity: SparsityConfig, **export: Any) -> Manifest:
    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert

    cfg = ConvertConfig(export=ExportConfig(model=model, **export), out=out, sparsity=sparsity)
    return run_convert(cfg, log=lambda _m: None)[0]


@pytest.fixture(scope="module")
def digits_sparse(digits_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    out = tmp_path_factory.mktemp("digits_sparse")
    test_npz = out.parent / "digits_test.npz"
    np.savez(test_npz, input=digits_model.x_test, labels=digits_model.y_test)
    # these tests measure pruning itself (untrained: it loses ~40-80 points); the default gate is tested in
    # tests/test_cli_flags.py, so here the budget accepts any loss
    cfg = SparsityConfig(pattern="2:4", prune_channels=0.3, eval_data=str(test_npz), latency_iters=5, budget=ANY)
    return _run(digits_model.factory, out, cfg, weights=str(digits_model.weights)), out


def _onnx_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    """(op, weight laid out as [out, in, ...]) of every Conv / Gemm in the file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits:
            w = inits[n.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            out.append((n.op_type, w if n.op_type == "Conv" or trans_b else w.T))
    return out


def _ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 100]})[0] for i in range(0, len(x), 100)])
    return float((logits.argmax(1) == y).mean())


def test_2of4_holds_in_the_exported_onnx(digits_sparse: tuple[Manifest, Path]) -> None:
    manifest, out = digits_sparse
    art = manifest.artifacts["sparse24"]
    weights = _onnx_weights(out / art.file.path)
    assert [op for op, _ in weights] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    eligible = [w for _, w in weights if w.shape[1] % 4 == 0]
    assert len(eligible) == 4  # the first conv has 1 input channel and cannot hold the pattern
    for w in eligible:
        groups = np.moveaxis(w, 1, -1).reshape(-1, 4)
        assert ((groups != 0).sum(axis=1) <= 2).all()
        assert (w == 0).mean() >= 0.5
    sp = art.metrics.sparsity
    assert sp.fraction_groups_2of4 == 1.0
    assert sp.violating_weights == [] and len(sp.ineligible_weights) == 1
    total = sum(w.size for _, w in weights)
    assert sp.fraction_weights_2of4 == pytest.approx(sum(w.size for w in eligible) / total)
    assert art.params.sparsity == "2:4" and art.parent == "opt" and art.status == "ok"
    assert art.metrics.parity["batch_1"].max_abs_err < 1e-4  # against the sparse PyTorch module
    assert art.file.size_bytes == art.metrics.size_bytes_before  # same shapes: no smaller
    assert any("not faster" in n for n in art.notes)


def test_mask_keeps_the_two_largest_of_every_four() -> None:
    import torch

    from convert.prune import mask_2of4

    w = torch.randn(6, 8, 3, 3)
    m = mask_2of4(w)
    groups_in = w.movedim(1, -1).reshape(-1, 4).abs()
    groups_out = m.movedim(1, -1).reshape(-1, 4)
    kept = groups_out != 0
    assert (kept.sum(1) == 2).all()
    assert torch.equal(groups_in.topk(2, dim=1).indices.sort(1).values, kept.nonzero()[:, 1].view(-1, 2))
    assert torch.equal(m[m != 0], w[m != 0])


def test_channel_pruned_model_is_smaller(digits_sparse: tuple[Manifest, Path]) -> None:
    manifest, out = digits_sparse
    art, opt = manifest.artifacts["pruned_0.3"], manifest.artifacts["opt"]
    met = art.metrics
    assert met.pruning.params_after < met.pruning.params_before and met.pruning.macs_after < met.pruning.macs_before
    assert (out / art.file.path).stat().st_size < (out / opt.file.path).stat().st_size
    assert met.size_bytes_after == art.file.size_bytes < met.size_bytes_before == opt.file.size_bytes
    onnx_params = sum(w.size for _, w in _onnx_weights(out / art.file.path))
    assert onnx_params < sum(w.size for _, w in _onnx_weights(out / opt.file.path))
    assert art.params.pruning_ratio == 0.3 and art.params.ignored_layers == ["classifier.2"]
    assert met.latency.p50_ms_after > 0 and met.latency.p50_ms_before > 0
    assert met.parity["batch_2"].max_abs_err < 1e-4  # against the pruned PyTorch module
    assert not Manifest.load(out).verify(out)


@pytest.mark.parametrize("name", ["pruned_0.3", "sparse24"])
def test_recorded_accuracy_matches_independent_evaluation(digits_model: Any, digits_sparse: tuple[Manifest, Path],
                                                          name: str) -> None:
    manifest, out = digits_sparse
    acc = manifest.artifacts[name].metrics.accuracy_vs_fp32
    x, y = digits_model.x_test, digits_model.y_test
    assert acc.samples == len(y)
    assert acc.top1_acc == pytest.approx(_ort_accuracy(out / manifest.artifacts[name].file.path, x, y), abs=1e-9)
    fp32 = _ort_accuracy(out / manifest.artifacts["opt"].file.path, x, y)
    assert acc.ref_top1_acc == pytest.approx(fp32, abs=1e-9)
    assert fp32 == pytest.approx(digits_model.test_accuracy, abs=1 / len(y))
    assert acc.accuracy_drop_points == pytest.approx(100 * (fp32 - acc.top1_acc), abs=1e-3)


@pytest.mark.parametrize("args", [["--sparsity", "1:4"], ["--sparsity", "garbage"], ["--prune-channels", "0"],
                                  ["--prune-channels", "1.5"], ["--prune-channels", "abc"]])
def test_cli_rejects_bad_values(tmp_path: Path, args: list[str]) -> None:
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["convert", f"{TINY}:build", "--out", str(out), *args])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert ("2:4" in lines[0]) if args[0] == "--sparsity" else ("between 0 and 1" in lines[0])
    assert not out.exists()


def test_bad_eval_data_and_onnx_input_fail_first(digits_sparse: tuple[Manifest, Path], tmp_path: Path) -> None:
    _, out = digits_sparse
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((4, 1, 16, 16), np.float32))
    with pytest.raises(InputError, match=r"missing \['input'\]"):
        _run(f"{TINY}:build", tmp_path / "a", SparsityConfig(pattern="2:4", eval_data=str(wrong)))
    with pytest.raises(InputError, match="does not exist"):
        _run(f"{TINY}:build", tmp_path / "b", SparsityConfig(prune_channels=0.5, eval_data=str(tmp_path / "nope.npz")))
    with pytest.raises(InputError, match="onnx inputs cannot be pruned"):
        _run(str(out / "model.onnx"), tmp_path / "c", SparsityConfig(pattern="2:4"), input_shape=(1, 1, 16, 16))
    assert not any((tmp_path / d / "model.onnx").exists() for d in "abc")  # refused before the export


def test_resnet18_residual_pruning(tmp_path: Path) -> None:
    """torchvision resnet18 (random init, 64x64): torch-pruning keeps the residual additions consistent."""
    manifest = _run("resnet18", tmp_path, SparsityConfig(pattern="2:4", prune_channels=0.3, eval_samples=8, budget=ANY,
                                                         latency_iters=3), input_shape=(1, 3, 64, 64))
    pruned, sparse = manifest.artifacts["pruned_0.3"], manifest.artifacts["sparse24"]
    assert pruned.status == sparse.status == "ok"
    assert pruned.metrics.pruning.params_after < 0.6 * pruned.metrics.pruning.params_before
    assert pruned.file.size_bytes < 0.6 * manifest.artifacts["opt"].file.size_bytes
    assert sparse.metrics.sparsity.fraction_groups_2of4 == 1.0
    assert sparse.metrics.sparsity.ineligible_weights == ["/conv1/Conv (Conv, input dim 3)"]
    assert manifest.iospec.outputs[0].shape[-1] == 1000


def test_fp16_conversion_of_the_sparse_variant_for_a_tensorrt_engine(digits_model: Any,
                                                                       digits_sparse: tuple[Manifest, Path],
                                                                       tmp_path: Path) -> None:
    """``convert --sparsity 2:4 --trt --trt-from sparse24 --fp16``: the engine's FP16 source keeps the pattern."""
    import shutil

    from convert import engine as eng
    from convert.config import ConvertConfig, ExportConfig
    from convert.context import ConvertContext

    manifest, src = digits_sparse
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    manifest = Manifest.load(out)
    cfg = ConvertConfig(export=ExportConfig(model=digits_model.factory),
                        engine=eng.EngineConfig(source="sparse24", fp16=True))
    ctx = ConvertContext(cfg=cfg, out=out, loaded=None, manifest=manifest, log=lambda _m: None)  # type: ignore[arg-type]
    assert eng.engine_sources(cfg.engine, "opt") == [("trt_sparse24_fp16", "sparse24_fp16")]  # type: ignore[arg-type]
    eng.fp16_of(ctx, "sparse24")
    art = Manifest.load(out).artifacts["sparse24_fp16"]
    assert (art.precision, art.parent, art.kind) == ("fp16", "sparse24", "onnx")
    assert eng.source_is_sparse(art), "the engine build gets sparse_weights"
    weights = _onnx_weights(out / art.file.path)
    assert all(w.dtype == np.float16 for _, w in weights)
    for _, w in weights:
        if w.shape[1] % 4 == 0:
            assert ((np.moveaxis(w, 1, -1).reshape(-1, 4) != 0).sum(axis=1) <= 2).all()
    x, y = digits_model.x_test, digits_model.y_test
    sparse_acc = _ort_accuracy(out / manifest.artifacts["sparse24"].file.path, x, y)
    assert abs(_ort_accuracy(out / art.file.path, x, y) - sparse_acc) <= 0.01
    with pytest.raises(InputError, match="converts an FP32 ONNX variant"):
        eng.fp16_of(ctx, "sparse24_fp16")
