"""INT4 weight-only (``--int4``, convert/int4.py): ONNX Runtime's MatMulNBitsQuantizer on a tiny random-init GPT-2
exported with its KV cache (built here, nothing downloaded). GPT-2's Conv1D layers export as Gemm, which the quantizer
does not touch: they are rewritten as MatMul + Add first, so every projection ends up in INT4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convert.config import Int4Config
from convert.flags import from_flags
from convert.int4 import gemm_to_matmul, quantize_int4_file
from core.errors import InputError
from core.manifest import Manifest

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from tests.test_hf_optimum import _cli  # noqa: E402  (after the skips: it needs transformers too)

N_LAYER = 2


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`convert hf:gpt2 --task text-generation-with-past --int4` with a gate wide enough to pass (the gate's failure
    is tests/test_genvalidate.py's)."""
    import torch

    root = tmp_path_factory.mktemp("int4")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=N_LAYER, n_head=2, n_embd=64, vocab_size=200,
                                                         n_positions=64, initializer_range=0.1)) \
        .save_pretrained(root / "gpt2")
    out = root / "art"
    proc = _cli("convert", f"hf:{root / 'gpt2'}", "--task", "text-generation-with-past", "--no-optimize", "--int4",
                "--min-token-agreement", "0", "--min-cosine", "-1", "--max-accuracy-drop", "100", "--out", str(out),
                cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out


def test_int4_variant_of_a_with_past_decoder(converted: Path) -> None:
    m = Manifest.load(converted)
    art = m.artifacts["int4"]
    assert art.precision == "int4" and art.status == "ok" and art.parent == "fp32"
    p = art.params
    assert p.step == "quantize_int4" and p.algorithm == "rtn" and p.block_size == 32
    # 4 Conv1D (Gemm) per layer and the LM head: all in INT4; the attention's own MatMuls have no constant weight
    assert p.gemms_rewritten == 4 * N_LAYER and p.matmuls_quantized == 4 * N_LAYER + 1
    assert (converted / art.file.path).stat().st_size == p.size_bytes
    assert 0.2 < p.size_ratio < 0.5  # the embeddings (token and position) stay FP32
    assert p.accuracy_level == 4  # rtn's default: ONNX Runtime GenAI's CPU level (int8 activations per block)
    assert _levels(converted / art.file.path) == {4}
    gen = art.metrics.generation
    assert gen is not None and gen.vs_fp32 is not None and gen.vs_fp32.reference == "fp32"
    assert art.metrics.gate is not None and art.metrics.gate.passed is True


def test_the_gemm_rewrite_is_what_quantizes_gpt2(converted: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the rewrite only the LM head (a MatMul) would be INT4 and the file would stay near FP32's size."""
    import onnxruntime as ort

    src = converted / "model.onnx"
    info = quantize_int4_file(src, tmp_path / "rtn.onnx", Int4Config(block_size=16, symmetric=True))
    assert info.gemms == 4 * N_LAYER and info.quantized == 4 * N_LAYER + 1
    ort.InferenceSession(str(tmp_path / "rtn.onnx"), providers=["CPUExecutionProvider"])  # ONNX Runtime loads it

    import convert.int4 as int4

    monkeypatch.setattr(int4, "gemm_to_matmul", lambda model: 0)
    old = quantize_int4_file(src, tmp_path / "old.onnx", Int4Config())
    assert old.quantized == 1 and old.size_bytes > 2 * info.size_bytes


def _levels(path: Path) -> set[int | None]:
    """The accuracy_level attribute of every MatMulNBits node (None: unset, FP32 compute)."""
    import onnx
    from onnx import helper

    levels: set[int | None] = set()
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            levels.add(attrs.get("accuracy_level"))
    return levels


def test_accuracy_level_default_and_override(converted: Path, tmp_path: Path) -> None:
    """rtn and gptq default to level 4, as ONNX Runtime GenAI's builder does for the CPU; 0 leaves the attribute
    unset (FP32 compute, ONNX Runtime's own default); hqq (float zero points) gets none."""
    src = converted / "model.onnx"
    quantize_int4_file(src, tmp_path / "l0.onnx", Int4Config(accuracy_level=0))
    assert _levels(tmp_path / "l0.onnx") == {None}
    quantize_int4_file(src, tmp_path / "l2.onnx", Int4Config(accuracy_level=2))
    assert _levels(tmp_path / "l2.onnx") == {2}
    assert Int4Config(algorithm="hqq").level == 0 and Int4Config(algorithm="gptq").level == 4
    cfg = from_flags(model="x", int4=True, int4_accuracy_level=1)
    assert cfg.quant.int4_options.level == 1


def test_hqq_and_gptq_run_offline(converted: Path, tmp_path: Path) -> None:
    """HQQ needs no data; GPTQ calibrates on seeded inputs of the IOSpec (here given directly)."""
    src = converted / "model.onnx"
    hqq = quantize_int4_file(src, tmp_path / "hqq.onnx", Int4Config(algorithm="hqq"))
    assert hqq.quantized == 4 * N_LAYER + 1
    spec = Manifest.load(converted).iospec
    feeds = [spec.random_feed(1, seed=i) for i in range(2)]
    gptq = quantize_int4_file(src, tmp_path / "gptq.onnx", Int4Config(algorithm="gptq"), feeds)
    assert gptq.quantized == 4 * N_LAYER + 1


def test_gemm_rewrite_keeps_the_values(tmp_path: Path) -> None:
    """Gemm(A, B, C) with transB, alpha and beta becomes MatMul(A, alpha B^T) + beta C: same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b, c = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="g", transB=1, alpha=0.5, beta=2.0)], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feed = {"a": rng.standard_normal((3, 4)).astype(np.float32)}

    def run(m: onnx.ModelProto) -> np.ndarray:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(sess.run(None, feed)[0])

    want = run(model)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert gemm_to_matmul(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add"]
    onnx.checker.check_model(rewritten)
    np.testing.assert_allclose(run(rewritten), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("given", "message"), [
    ({"int4_block_size": 64}, "--int4-block-size tunes INT4: add --int4"),
    ({"int4": True, "int4_block_size": 48}, "power of 2"),
    ({"int4": True, "int4_algorithm": "awq"}, "unknown --int4-algorithm"),
    ({"int4_accuracy_level": 4}, "--int4-accuracy-level tunes INT4: add --int4"),
    ({"int4": True, "int4_algorithm": "hqq", "int4_accuracy_level": 4}, "hqq writes asymmetric"),
])
def test_int4_flags_refused_in_one_line(given: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        from_flags(model="x", **given)


def test_hqq_options_it_cannot_honour_are_refused() -> None:
    with pytest.raises(InputError, match="hqq writes asymmetric"):
        Int4Config(algorithm="hqq", symmetric=True)
