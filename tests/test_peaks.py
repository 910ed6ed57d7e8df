"""% of peak per precision (issue 28): an INT8 row is read against a measured INT8 matrix-multiply peak, never the
FP32 one; every variant's MACs come from its own file; the tables name the peak they divide by."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.reports_data import R18, load, save

#: given peak values (not measured): what the test reads each row against
FP32_GIVEN, INT8_GIVEN = 1000.0, 4000.0


def _conv_macs(out_hw: int, cout: int, cin: int, k: int = 3) -> int:
    return out_hw * out_hw * cout * cin * k * k


def _pruned(src: Path, dst: Path, keep: int) -> None:
    """``src`` (the tiny CNN: Conv 3->16, MaxPool, Conv 16->32, ..., Gemm) with its first Conv cut to ``keep``
    output channels and the second Conv's inputs to match: a structurally pruned variant with the same IO."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2, [n.op_type for n in model.graph.node]

    def cut(name: str, axis: int) -> None:
        arr = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array(np.take(arr, range(keep), axis=axis), name))

    cut(convs[0].input[1], 0)
    if len(convs[0].input) > 2:
        cut(convs[0].input[2], 0)
    cut(convs[1].input[1], 1)
    onnx.save(model, str(dst))


def _int8(src: Path, dst: Path, fmt: str) -> None:
    """``src`` quantized statically (u8 activations, s8 weights) in QDQ or QOperator form, on random inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.feeds = iter([{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


@pytest.fixture(scope="module")
def variants(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CNN's folder plus a pruned variant (first Conv 16 -> 8 channels), a QDQ INT8 and a QOperator INT8
    variant, recorded in its manifest."""
    from core.manifest import Manifest, Precision
    from core.records import CopyParams

    base = tmp_path_factory.mktemp("peaks") / "art"
    shutil.copytree(tiny_artifacts, base)
    manifest = Manifest.load(base)
    opt = base / manifest.artifacts["opt"].file.path
    _pruned(opt, base / "model.pruned.onnx", keep=8)
    _int8(opt, base / "model.int8.onnx", "QDQ")
    _int8(opt, base / "model.int8_qop.onnx", "QOperator")
    kinds: dict[str, Precision] = {"pruned": "fp32", "int8": "int8", "int8_qop": "int8"}
    for name, precision in kinds.items():
        manifest.record(base, base / f"model.{name}.onnx", name=name, kind="onnx", precision=precision, parent="opt",
                        params=CopyParams(copied_from="tests/test_peaks.py"))
    manifest.save(base)
    return base


@pytest.fixture
def given_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The peak numbers given, not measured (the measurement itself: test_int8_peak_*)."""
    import core.flops as flops

    monkeypatch.setitem(flops.PEAK_MEASURES, "fp32", lambda threads: {"given": FP32_GIVEN})
    monkeypatch.setitem(flops.PEAK_MEASURES, "int8", lambda threads: {"given": INT8_GIVEN})


def test_each_variants_macs_come_from_its_own_file(variants: Path) -> None:
    """A pruned variant does less arithmetic than the FP32 export: its MACs are its own file's (the bench used the
    FP32 file's for every row). PyTorch weights take the FP32 ONNX's count (the same model), without a note."""
    from core.flops import variant_macs
    from core.manifest import Manifest

    manifest = Manifest.load(variants)
    shapes = [{"input": [1, 3, 32, 32]}, {"input": [4, 3, 32, 32]}]
    got = variant_macs(manifest, variants, ["fp32", "pruned", "int8", "torch"], shapes)
    gemm = 32 * 10
    full = _conv_macs(32, 16, 3) + _conv_macs(16, 32, 16) + gemm
    pruned = _conv_macs(32, 8, 3) + _conv_macs(16, 32, 8) + gemm
    assert got["fp32"].per_point == [full, 4 * full] and got["fp32"].note is None
    assert got["pruned"].per_point == [pruned, 4 * pruned] and got["pruned"].note is None
    assert got["int8"].per_point == [full, 4 * full] and got["int8"].note is None  # QDQ Conv/Gemm: counted itself
    assert got["torch"].per_point == [full, 4 * full] and got["torch"].note is None


def _with_opaque_attention(src: Path, dst: Path) -> None:
    """``src`` plus a contrib-domain ``Attention`` node on its input (output unused): arithmetic core.flops cannot
    count, as a fused transformer's or a torchvision ViT export's attention (whose MatMuls lose their shapes)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    model.graph.node.append(helper.make_node("Attention", [model.graph.input[0].name], ["opaque_out"],
                                             domain="com.microsoft", num_heads=1))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))


def test_a_graph_rewrite_of_the_export_stands_in_when_neither_it_nor_the_export_is_countable(
        tiny_artifacts: Path, tmp_path: Path) -> None:
    """A fused variant (parent fp32) whose own count is incomplete, beside an FP32 export whose count is incomplete
    too (a torchvision ViT: the run_deploy run of 2026-12-07 read its fused FP32 pick at 6% of peak, a 17x
    undercount): ``opt``, the export's other graph rewrite, does the same arithmetic and stands in, with a note.
    Where no file is countable, the count is marked a lower bound."""
    from core.flops import variant_macs
    from core.manifest import Manifest
    from core.records import FusionParams

    base = tmp_path / "art"
    shutil.copytree(tiny_artifacts, base)
    manifest = Manifest.load(base)
    opt = base / manifest.artifacts["opt"].file.path
    _with_opaque_attention(opt, base / "model.fused.onnx")
    manifest.record(base, base / "model.fused.onnx", name="fused", kind="onnx", precision="fp32", parent="fp32",
                    params=FusionParams(model_type="vit", fused_ops={"Attention": 1}))
    export = base / manifest.artifacts["fp32"].file.path
    _with_opaque_attention(export, export)  # the export no longer countable either
    shapes = [{"input": [1, 3, 32, 32]}, {"input": [4, 3, 32, 32]}]
    full = _conv_macs(32, 16, 3) + _conv_macs(16, 32, 16) + 32 * 10
    got = variant_macs(manifest, base, ["fused", "fp32", "opt"], shapes)
    for name in ("fused", "fp32"):
        assert got[name].per_point == [full, 4 * full] and not got[name].lower_bound, got[name]
        assert got[name].note is not None and "opt's file" in got[name].note and "Attention" in got[name].note
    assert got["opt"].note is None
    _with_opaque_attention(opt, opt)  # now nothing is countable: fused's own count, a lower bound, says so
    got = variant_macs(manifest, base, ["fused"], shapes)
    assert got["fused"].lower_bound and got["fused"].note is not None and "lower bound" in got["fused"].note
    assert got["fused"].per_point == [full, 4 * full]  # what it could count (the opaque op's arithmetic left out)


def test_a_qoperator_int8_file_is_counted_or_says_whose_count_it_shows(variants: Path) -> None:
    """A QOperator graph's QLinearConv ops are counted on its own file (ONNX Runtime's shape inference follows its
    contrib ops); where some op still has no shape (the QGemm after a QLinearGlobalAveragePool), the parent's
    complete count stands in and the row says so."""
    from core.flops import count_macs, variant_macs
    from core.manifest import Manifest

    own = count_macs(variants / "model.int8_qop.onnx", {"input": [2, 3, 32, 32]})
    convs = 2 * (_conv_macs(32, 16, 3) + _conv_macs(16, 32, 16))
    assert own.macs is not None and own.macs >= convs  # every QLinearConv counted
    got = variant_macs(Manifest.load(variants), variants, ["int8_qop"], [{"input": [2, 3, 32, 32]}])["int8_qop"]
    assert got.per_point == [convs + 2 * 32 * 10]
    assert own.complete == (got.note is None)
    if got.note is not None:
        assert "opt's file" in got.note and all(op in got.note for op in own.uncounted)


def test_an_int8_row_is_divided_by_the_int8_peak_and_the_tables_say_so(variants: Path, given_peaks: None) -> None:
    """The INT8 row's fraction is its GOP/s over the INT8 peak (4000 given), never the FP32 one (1000); each row
    records its peak; results.machine holds every peak by precision; the table, Markdown, CSV and HTML name it."""
    from reports.html import write_bench_html
    from reports.writers import PEAK_HEADER, rich_table, to_csv, to_markdown, write_results
    from runtimes.harness import BenchConfig, run_bench

    res = run_bench(BenchConfig(artifact_dir=variants, backends=["ort"], variants=["opt", "pruned", "int8"],
                                batch_sizes=[1], warmup=1, iters=3, rounds=1, accuracy_samples=4), log=lambda _m: None)
    rows = {r.variant: r for r in res.records}
    for name, peak, precision in (("opt", FP32_GIVEN, "fp32"), ("pruned", FP32_GIVEN, "fp32"),
                                  ("int8", INT8_GIVEN, "int8")):
        r = rows[name]
        assert r.gflop is not None and r.peak_fraction is not None
        assert r.peak_fraction == pytest.approx(r.gflop / (r.latency_ms.p50 / 1e3) / peak), name
        assert r.peak_precision == precision
    assert rows["int8"].peak_basis == "int8 GEMM (given) 4000 GOP/s"
    assert rows["opt"].peak_basis == "fp32 GEMM (given) 1000 GFLOP/s"
    assert (rows["pruned"].gflop or 0) < (rows["opt"].gflop or 0)  # its own file's arithmetic
    assert res.machine["peaks"]["int8"]["rate"] == INT8_GIVEN and res.machine["peaks"]["fp32"]["rate"] == FP32_GIVEN

    md = to_markdown(res)
    assert PEAK_HEADER in md and "int8 GEMM (given) 4000 GOP/s" in md and "fp32 GEMM (given) 1000 GFLOP/s" in md
    assert "peak_basis" in to_csv(res).splitlines()[0] and "int8 GEMM (given) 4000 GOP/s" in to_csv(res)
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(rich_table(res))
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "own precision" in text and "int8 GEMM (given) 4000 GOP/s" in text
    paths = write_results(res, variants.parent / "results.json", html=write_bench_html)
    html = paths["html"].read_text(encoding="utf-8")
    assert "own precision" in html and "int8 GEMM (given) 4000 GOP/s" in html


def test_a_precision_without_a_measured_peak_shows_no_fraction_and_says_why() -> None:
    """An fp16 row on a CPU: no fp16 peak is measured, so no fraction (never FP32's), with the reason."""
    from core.flops import Peak, row_peak
    from reports.models import BenchResults
    from reports.writers import to_markdown

    peaks = {"fp32": Peak("fp32", "onnxruntime", 100.0), "int8": Peak("int8", "onnxruntime QDQ MatMul u8s8", 300.0)}
    assert row_peak("int8", peaks) == (peaks["int8"], "int8 GEMM (onnxruntime QDQ MatMul u8s8) 300 GOP/s")
    assert row_peak("fp16", peaks) == (None, "no fp16 peak measured on this CPU")

    data = load(R18)
    rec = data["records"][0] | {"variant": "fp16", "precision": "fp16", "gflop": 0.1, "peak_fraction": None,
                                "peak_basis": "no fp16 peak measured on this CPU"}
    data["records"] = [rec]
    md = to_markdown(BenchResults.model_validate(data))
    row = next(ln for ln in md.splitlines() if ln.startswith("| ") and "fp16" in ln)
    assert "| n/a |" in row and "n/a: no fp16 peak measured on this CPU" in md


def test_an_older_results_file_loads_and_says_its_fractions_are_fp32s(tmp_path: Path) -> None:
    """Files written before peaks per precision (no peak_basis) still load and render; an INT8 row's fraction there
    is FP32's (729% seen), so it is marked 'of fp32' with a note, not shown as if it were its own."""
    from reports.html import ReportConfig, make_report
    from reports.models import BenchResults
    from reports.writers import LEGACY_BASIS, to_csv, to_markdown

    data = load(R18)
    old = data["records"][0]
    assert "peak_basis" not in old
    data["records"] = [old | {"gflop": 0.5, "peak_fraction": 0.4},
                       old | {"variant": "int8", "precision": "int8", "gflop": 0.5, "peak_fraction": 7.29}]
    data["machine"]["matmul_peak_gflops"] = 61.0
    path = save(data, tmp_path / "old.json")
    res = BenchResults.load(path)
    md = to_markdown(res)
    int8_row = next(ln for ln in md.splitlines() if ln.startswith("| ") and "| int8 |" in ln)
    assert "729% of fp32" in int8_row and "predates peaks per precision" in md and "61 GFLOP/s" in md
    assert LEGACY_BASIS in to_csv(res)
    make_report(ReportConfig(results=[path], html=tmp_path / "old.html"))
    assert "predates peaks per precision" in (tmp_path / "old.html").read_text(encoding="utf-8")
    assert json.loads(path.read_text())["records"][1]["peak_fraction"] == 7.29  # the file itself is untouched


def test_int8_peak_kernels_compute_the_product_they_time() -> None:
    """Each INT8 kernel's call is the n x n u8 x s8 (or u8 x u8) product itself (weights within 7 bits: AVX2's u8s8
    kernels saturate 16-bit pair sums above), and the peak is measured per kernel, tiny here."""
    import importlib.util

    from core.flops import INT8_KERNELS, int8_matmul_call, int8_matmul_peaks

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64)).astype(np.uint8)
    for kernel in INT8_KERNELS:
        signed = not kernel.endswith("u8u8")
        b = (rng.integers(-64, 64, (64, 64)) if signed else rng.integers(0, 64, (64, 64))).astype(
            np.int8 if signed else np.uint8)
        call = int8_matmul_call(kernel, 64, 1, operands=(a, b))
        if call is None:
            assert kernel.startswith("openvino") and importlib.util.find_spec("openvino") is None
            continue
        out = call()
        got = np.asarray(out[0] if isinstance(out, list) else next(iter(out.values())))  # type: ignore[attr-defined]
        assert np.array_equal(got.astype(np.int64), a.astype(np.int64) @ b.astype(np.int64)), kernel
    rates = int8_matmul_peaks(1, n=128, repeats=2)
    assert {"onnxruntime MatMulInteger u8s8", "onnxruntime MatMulInteger u8u8"} <= set(rates)
    assert all(v > 0 for v in rates.values())
