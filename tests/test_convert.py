"""Export, validation and optimization on real models (random-init torchvision, a tiny CNN)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from convert.config import ConvertConfig, ExportConfig
from convert.optimize import OptimizeError, optimize_onnx
from convert.pipeline import run_convert
from convert.validate import validate_onnx
from core.errors import InputError, ValidationError
from core.manifest import Manifest
from core.records import OptimizeParams
from runtimes.ort import ort_session
from tests.conftest import TINY


def _run(model: str, out: Path, **kw: object) -> Manifest:
    manifest, _ = run_convert(ConvertConfig(export=ExportConfig(model=model, **kw), out=out),  # type: ignore[arg-type]
                              log=lambda _m: None)
    return manifest


def test_resnet18_export_is_valid_dynamic_and_matches_pytorch(resnet18_artifacts: Path) -> None:
    m = Manifest.load(resnet18_artifacts)
    assert set(m.artifacts) == {"fp32", "torch", "opt"}
    assert m.verify(resnet18_artifacts) == []
    assert m.source.kind == "torchvision" and "random init" in m.source.weights_note
    assert m.iospec.inputs[0].shape == ["batch", 3, 64, 64]
    assert m.iospec.outputs[0].shape == ["batch", 1000]
    assert m.versions["torch"].startswith("2.14.1") and "onnxruntime" in m.versions
    for name in ("fp32", "opt"):
        art = m.artifacts[name]
        assert art.metrics.checker == "ok" and art.metrics.shape_inference == "ok"
        for b in ("batch_1", "batch_2"):
            assert art.metrics.parity[b].max_abs_err < 1e-3
            assert art.metrics.parity[b].cosine > 0.9999
    # The batch dim really is symbolic: a batch never seen at export runs.
    sess = ort_session(resnet18_artifacts / "model.opt.onnx")
    out = sess.run(None, {"input": np.zeros((3, 3, 64, 64), np.float32)})[0]
    assert out.shape == (3, 1000)
    opt = m.artifacts["opt"].params
    assert isinstance(opt, OptimizeParams) and opt.nodes_after <= opt.nodes_before


def test_dynamo_exporter_and_onnx_input(tmp_path: Path) -> None:
    m = _run(f"{TINY}:build", tmp_path / "dyn", exporter="dynamo")
    assert m.exporter == "dynamo" and m.artifacts["opt"].status == "ok"
    # An existing .onnx is taken as is, validated against itself through ORT, and optimized.
    m2 = _run(str(tmp_path / "dyn" / "model.onnx"), tmp_path / "onnx_in")
    assert m2.source.kind == "onnx" and set(m2.artifacts) == {"fp32", "opt"}
    assert m2.iospec.inputs[0].shape == ["batch", 3, 32, 32]


def test_torchscript_input_and_fixed_batch(tmp_path: Path) -> None:
    import torch

    from tests.fixtures.tiny_cnn import build

    ts = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(build().eval(), torch.randn(2, 3, 32, 32)), str(ts))
    m = _run(str(ts), tmp_path / "ts", input_shape=(4, 3, 32, 32), dynamic_batch=False)
    assert m.source.kind == "torchscript" and m.artifacts["torch"].kind == "torchscript"
    assert m.iospec.fixed_batch() == 4
    assert list(m.artifacts["opt"].metrics.parity) == ["batch_4"]


def test_validation_reports_every_failure_together(tiny_artifacts: Path) -> None:
    m = Manifest.load(tiny_artifacts)

    def wrong_reference(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros((len(feed["input"]), 10), np.float32) + 5.0]

    with pytest.raises(ValidationError) as exc:
        validate_onnx(tiny_artifacts / "model.onnx", m.iospec, wrong_reference, batches=(1, 3))
    failures = exc.value.failures
    assert any("batch 1" in f for f in failures) and any("batch 3" in f for f in failures)
    assert len(failures) >= 2


def test_checker_and_runtime_failures_are_reported_together(tmp_path: Path, tiny_artifacts: Path) -> None:
    model = onnx.load(str(tiny_artifacts / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    spec = Manifest.load(tiny_artifacts).iospec
    with pytest.raises(ValidationError) as exc:
        validate_onnx(bad, spec, lambda feed: [np.zeros((len(feed["input"]), 10), np.float32)])
    failures = exc.value.failures
    assert any(f.startswith("onnx.checker") and "NoSuchOp" in f for f in failures)
    assert any("ONNX Runtime cannot load" in f for f in failures)


def test_failed_optimize_leaves_no_file(tmp_path: Path) -> None:
    src = tmp_path / "garbage.onnx"
    src.write_bytes(b"\x08\x07")  # a valid-but-empty ModelProto: ORT refuses it
    out = tmp_path / "out.onnx"
    with pytest.raises(OptimizeError, match="garbage.onnx"):
        optimize_onnx(src, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["garbage.onnx"]


def _external_data_model(folder: Path) -> Path:
    """A small model saved with its weights in ``model.onnx.data`` (as models past 2 GiB are), with a foldable
    Add of two constants for onnxslim and a redundant Identity for ONNX Runtime."""
    from onnx import TensorProto, helper, numpy_helper

    from core.onnxfile import save_onnx

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.ones((64, 32), np.float32), "b")
    nodes = [helper.make_node("Add", ["w", "b"], ["wb"]), helper.make_node("Identity", ["wb"], ["wi"]),
             helper.make_node("MatMul", ["x", "wi"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], [w, b])
    src = folder / "model.onnx"
    save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src, max_inline=1000)
    return src


@pytest.mark.parametrize(("slim", "ort_basic"), [(True, True), (False, True), (True, False), (False, False)])
def test_optimize_keeps_external_data_and_leaves_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              slim: bool, ort_basic: bool) -> None:
    """Past the inline limit (lowered to 1 kB) onnxslim is skipped, with its reason (it holds several copies of
    the weights), ONNX Runtime goes file to file, and the result is model + its own .data file moved into place,
    computing what the source computes; the private folders are gone."""
    from convert.optimize import SLIM_SKIPPED
    from core import onnxfile

    monkeypatch.setattr(onnxfile, "MAX_INLINE_BYTES", 1000)
    src = _external_data_model(tmp_path)
    out = tmp_path / "model.opt.onnx"
    info = optimize_onnx(src, out, slim=slim, ort_basic=ort_basic)
    assert info.steps == (["ort_basic"] if ort_basic else [])
    assert info.skipped == ({"onnxslim": SLIM_SKIPPED} if slim else {})
    assert info.nodes_before == 3 and (info.nodes_after < 3) == ort_basic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "model.opt.onnx",
                                                          "model.opt.onnx.data"]
    assert onnxfile.external_data_files(out) == [tmp_path / "model.opt.onnx.data"]
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    want = ort_session(src).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort_session(out).run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_weights_state_dict_roundtrip_and_mismatch(tmp_path: Path) -> None:
    import torch

    from tests.fixtures.tiny_cnn import build

    torch.manual_seed(7)
    sd = build().state_dict()
    wfile = tmp_path / "w.pt"
    torch.save(sd, wfile)
    m = _run(f"{TINY}:build", tmp_path / "w", weights=str(wfile))
    saved = torch.load(tmp_path / "w" / "weights.pt", weights_only=True)
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    assert m.source.weights == str(wfile)
    with pytest.raises(InputError, match="do not match the architecture"):
        _run("resnet18", tmp_path / "bad", weights=str(wfile), input_shape=(1, 3, 32, 32))
    assert not (tmp_path / "bad" / "model.onnx").exists()


def test_parity_tolerance_follows_the_outputs_magnitude() -> None:
    """Rounding in FP32 sums scales with the size of what is summed: an element near zero in an output of values
    ~1e8 (a random-init inception_v3's logits) is within rounding of its reference; the same error on an output of
    ordinary size is not."""
    import numpy as np

    from convert.validate import Tolerance, _parity_at
    from core.iospec import IOSpec
    from core.records import ArtifactMetrics

    spec = IOSpec.for_image_model((1, 3, 4, 4), dynamic_batch=True)
    big = np.array([[1e8, -2e8, 3.0]], np.float32)

    class Session:
        def __init__(self, out: np.ndarray) -> None:
            self.out = out

        def run(self, _names: object, _feed: object, _options: object = None) -> list[np.ndarray]:
            return [self.out]

    def check(ref: np.ndarray, got: np.ndarray) -> list[str]:
        return _parity_at(Session(got), spec, lambda _f: [ref], (1, {}), "batch_1", "batch 1", Tolerance.fp32(),
                          ArtifactMetrics())

    assert check(big, big + np.array([[0, 0, 5e3]], np.float32)) == []  # 5e3 off on 3.0, next to 2e8: rounding
    small = np.array([[1.0, -2.0, 3.0]], np.float32)
    assert "max abs err" in " ".join(check(small, small + np.array([[0, 0, 0.5]], np.float32)))
