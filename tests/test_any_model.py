"""Models that are not one image input: token inputs with dynamic batch and sequence, two inputs and two
outputs, an ONNX model with symbolic height and width. Converted, validated at two values of every
dynamic dim, and benchmarked on the same feeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from convert.config import ConvertConfig, ExportConfig
from convert.pipeline import run_convert
from core.errors import InputError, ValidationError
from core.iospec import BATCH

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRANSFORMER = f"{FIXTURES / 'tiny_transformer.py'}:build"
TWO_IO = f"{FIXTURES / 'two_io.py'}:build"


def _convert(model: str, out: Path, **export: object) -> tuple:  # type: ignore[type-arg]
    return run_convert(ConvertConfig(export=ExportConfig(model=model, **export), out=out),  # type: ignore[arg-type]
                       log=lambda _m: None)


@pytest.fixture(scope="module")
def transformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(TRANSFORMER, tmp_path_factory.mktemp("tt"))[1]


def test_token_transformer_keeps_batch_and_sequence_and_checks_two_lengths(transformer: Path) -> None:
    from core.manifest import Manifest

    m = Manifest.load(transformer)
    ids, mask = m.iospec.inputs
    assert (ids.name, ids.shape, ids.dtype, ids.int_range) == ("input_ids", [BATCH, "sequence"], "int64", (0, 1000))
    assert (mask.name, mask.shape, mask.fill) == ("attention_mask", [BATCH, "sequence"], "ones")
    assert m.iospec.dims == {"sequence": 16} and m.iospec.output_names == ["embedding"]
    # parity at the bound sequence and at another one, for both batch sizes, in fp32 and opt
    for name in ("fp32", "opt"):
        assert sorted(m.artifacts[name].metrics.parity) == ["batch_1", "batch_1_sequence_17", "batch_2",
                                                            "batch_2_sequence_17"]
    import onnx

    dims = [d.dim_param for d in onnx.load(str(transformer / "model.opt.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"], "the sequence stays symbolic in the file"


def test_bench_runs_token_inputs_on_the_same_feeds(transformer: Path) -> None:
    from runtimes.harness import BenchConfig, run_bench

    res = run_bench(BenchConfig(artifact_dir=transformer, backends=["eager", "ort"], batch_sizes=[1, 2], warmup=1,
                                iters=3, accuracy_samples=4), log=lambda _m: None)
    ort = [r for r in res.records if r.backend == "ort"]
    assert ort and all(r.accuracy is not None and r.accuracy.cosine > 0.9999 for r in ort)
    digests = {(r.batch_size, r.backend) : r.input_digest for r in res.records}
    assert digests[(2, "eager")] == digests[(2, "ort")]


def test_baked_in_sequence_length_fails_at_the_second_length(tmp_path: Path) -> None:
    """nn.MultiheadAttention exported by the TorchScript exporter bakes the sequence length into a Reshape:
    parity at one length passes, at a second one it must fail."""
    model = tmp_path / "mha.py"
    model.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.att = nn.MultiheadAttention(16, 2, batch_first=True)\n"
        "    def forward(self, x):\n"
        "        return self.att(x, x, x, need_weights=False)[0].mean(1)\n\n"
        "def build():\n"
        "    return M(), {'x': torch.randn(1, 8, 16)}, {'x': {0: 'batch', 1: 'sequence'}}\n", encoding="utf-8")
    with pytest.raises(ValidationError) as err:
        _convert(f"{model}:build", tmp_path / "out")
    assert any("sequence=9" in f for f in err.value.failures)


def test_two_inputs_two_outputs_by_name(tmp_path: Path) -> None:
    m, _ = _convert(TWO_IO, tmp_path / "two")
    assert m.iospec.input_names == ["image", "features"]
    assert m.iospec.output_names == ["output_0", "output_1"]
    assert [t.shape for t in m.iospec.outputs] == [[BATCH, 10], [BATCH, 16]]
    assert m.artifacts["opt"].status == "ok"
    # parity is recorded for every output by name, not only the worst over them
    assert all(set(p.per_output) == {"output_0", "output_1"} for p in m.artifacts["opt"].metrics.parity.values())


def test_onnx_with_symbolic_height_and_width(tmp_path: Path) -> None:
    import onnx

    from tests.fixtures import symbolic_hw

    src = symbolic_hw.write(tmp_path / "hw.onnx")
    with pytest.raises(InputError, match=r"unbound symbolic dim 'height': give it a value with --input-shape "
                                         r"x:1x3xHEIGHTxWIDTH"):
        _convert(str(src), tmp_path / "none")
    assert not (tmp_path / "none" / "model.onnx").exists()
    m, out = _convert(str(src), tmp_path / "hw", input_shape=(1, 3, 40, 24))
    assert m.iospec.dims == {"height": 40, "width": 24}
    # the input file is the reference: no parity of it with itself (a check that could not fail)
    assert m.artifacts["fp32"].metrics.parity == {} and m.artifacts["fp32"].metrics.summary.startswith("reference")
    assert "batch_2_height_41_width_25" in m.artifacts["opt"].metrics.parity
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out / "model.opt.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]


def test_sample_inputs_bind_dims_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, input_ids=np.zeros((1, 12), np.int64), attention_mask=np.ones((1, 12), np.int64))
    m, _ = _convert(TRANSFORMER, tmp_path / "s", sample_inputs=str(good))
    assert m.iospec.dims == {"sequence": 12}
    cases = {
        "missing": ({"input_ids": np.zeros((1, 12), np.int64)}, "missing inputs"),
        "float": ({"input_ids": np.zeros((1, 12), np.float32), "attention_mask": np.ones((1, 12), np.int64)},
                  "dtype float32 where the model takes int64"),
        "rank": ({"input_ids": np.zeros((1, 12, 2), np.int64), "attention_mask": np.ones((1, 12), np.int64)},
                 "rank 3"),
        "extra": ({"input_ids": np.zeros((1, 12), np.int64), "attention_mask": np.ones((1, 12), np.int64),
                   "labels": np.zeros(1, np.int64)}, "unexpected inputs"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(InputError, match=message):
            _convert(TRANSFORMER, tmp_path / name, sample_inputs=str(path))
        assert not (tmp_path / name / "model.onnx").exists()


def test_cli_named_input_shapes(tmp_path: Path) -> None:
    from cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    ok = runner.invoke(app, ["convert", TRANSFORMER, "--input-shape", "input_ids:1x8,attention_mask:1x8",
                             "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "manifest.json").read_text())["iospec"]["dims"] == {"sequence": 8}
    for shape, message in [("input_ids:1x8,attention_mask:1x9", "bound to two values"),
                           ("tokens:1x8", "unknown input 'tokens'"), ("1x8", "name each one")]:
        bad = runner.invoke(app, ["convert", TRANSFORMER, "--input-shape", shape, "--out", str(tmp_path / "bad")])
        lines = [ln for ln in bad.output.strip().splitlines() if ln.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and message in lines[0], bad.output
        assert not (tmp_path / "bad" / "model.onnx").exists()


def test_a_factory_returning_the_wrong_form_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef build():\n    return torch.nn.Linear(2, 2), 3\n", encoding="utf-8")
    with pytest.raises(InputError, match="example_inputs must be a dict name -> tensor or a tuple of tensors"):
        _convert(f"{bad}:build", tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_token_model_quantizes_and_its_gate_uses_output_cosine(tmp_path: Path) -> None:
    """Dynamic and static INT8 (calibrated from a .npz per input name) and FP16 of an embedding model: no
    top-1 on an embedding; the gate is 100 x (1 - cosine) in points, and it can fail."""
    from convert.config import CalibConfig, GateConfig, QuantConfig
    from core.errors import AccuracyGateError

    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=rng.integers(0, 1000, (48, 16)).astype(np.int64),
             attention_mask=np.ones((48, 16), np.int64))
    quant = QuantConfig(fp16=True, int8_dynamic=True, int8_static=True, calib=CalibConfig(data=str(calib), size=32),
                        gate=GateConfig(max_accuracy_drop=1.0))
    m, _ = run_convert(ConvertConfig(export=ExportConfig(model=TRANSFORMER), out=tmp_path / "q", quant=quant),
                       log=lambda _m: None)
    for name in ("fp16", "int8_dynamic", "int8_static_minmax"):
        art = m.artifacts[name]
        acc, gate = art.metrics.accuracy, art.metrics.gate
        assert acc is not None and gate is not None and art.status == "ok", name
        assert acc.top1_agreement is None, "an embedding has no top-1"
        assert acc.cosine >= 0.99 and gate.basis.startswith("100 x (1 - centered output cosine")
        assert gate.drop_points == pytest.approx(100 * (1 - (acc.centered_cosine or 0.0)), abs=1e-3)
    strict = quant.model_copy(update={"int8_static": False, "fp16": False,
                                      "gate": GateConfig(max_accuracy_drop=1e-6)})
    with pytest.raises(AccuracyGateError, match="int8_dynamic lost"):
        run_convert(ConvertConfig(export=ExportConfig(model=TRANSFORMER), out=tmp_path / "strict", quant=strict),
                    log=lambda _m: None)


def test_bench_sweeps_a_named_dim_through_the_cli(transformer: Path, tmp_path: Path) -> None:
    from cli import app
    from reports.models import BenchResults

    runner = CliRunner()
    out = tmp_path / "res" / "results.json"
    ok = runner.invoke(app, ["bench", str(transformer), "--backends", "eager,ort", "--variants", "opt",
                             "--batch-sizes", "1,2", "--dims", "sequence=8,24", "--iters", "2", "--warmup", "1",
                             "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    res = BenchResults.load(out)
    ort = [r for r in res.records if r.backend == "ort"]
    assert sorted((r.batch_size, r.dims["sequence"]) for r in ort) == [(1, 8), (1, 24), (2, 8), (2, 24)]
    for r in res.records:
        seq = r.dims["sequence"]
        assert r.input_shapes == {"input_ids": [r.batch_size, seq], "attention_mask": [r.batch_size, seq]}
    same = {(r.batch_size, r.dims["sequence"]): r.input_digest for r in ort}
    assert all(same[(r.batch_size, r.dims["sequence"])] == r.input_digest for r in res.records), "same feeds"
    assert "sequence=24" in out.with_suffix(".csv").read_text()
    for args, message in [(["--dims", "height=8"], "unknown dim"), (["--dims", "sequence=0"], ">= 1"),
                          (["--dims", "sequence"], "malformed --dims")]:
        bad = runner.invoke(app, ["bench", str(transformer), "--backends", "ort", *args])
        lines = [ln for ln in bad.output.strip().splitlines() if ln.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and message in lines[0], bad.output


def test_transformer_gets_a_fused_variant_and_a_cnn_does_not(transformer: Path, tiny_artifacts: Path) -> None:
    """ONNX Runtime's transformer optimizer as its own variant: fused ops counted, parity like opt."""
    import onnx

    from core.manifest import Manifest
    from core.records import FusionParams

    fused = Manifest.load(transformer).artifacts["fused"]
    assert isinstance(fused.params, FusionParams) and fused.parent == "fp32" and fused.status == "ok"
    assert fused.params.fused_ops.get("SkipLayerNormalization", 0) >= 2 and fused.metrics.checker == "ok"
    assert min(p.cosine for p in fused.metrics.parity.values()) > 0.9999
    domains = {n.domain for n in onnx.load(str(transformer / fused.file.path)).graph.node}
    assert "com.microsoft" in domains and "ONNX Runtime only" in fused.notes[0]
    assert "fused" not in Manifest.load(tiny_artifacts).artifacts


def test_dynamic_int8_without_data_uses_token_aware_random_inputs(tmp_path: Path) -> None:
    """No --calib/--eval-data: the held-out inputs are random, at the bound sequence, ids in the vocabulary."""
    from calibration.loaders import open_source
    from convert.config import QuantConfig
    from core.manifest import Manifest

    m, _ = run_convert(ConvertConfig(export=ExportConfig(model=TRANSFORMER), out=tmp_path / "d",
                                     quant=QuantConfig(int8_dynamic=True)), log=lambda _m: None)
    assert m.artifacts["int8_dynamic"].status == "ok"
    spec = Manifest.load(tmp_path / "d").iospec
    feed, _ = next(open_source("synthetic", spec, None, size=4, seed=0).iter_labelled(4))
    assert feed["input_ids"].shape == (4, 16) and feed["input_ids"].max() < 1000 and (feed["attention_mask"] == 1).all()
