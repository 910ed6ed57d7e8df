"""The variant steps are rows of one table (convert/variants.py): a new variant is its own module (here: the code
below), one row registered in ``VARIANTS``, and a real convert runs it, grades it and records it in the manifest
with its own typed params, after the checks its row declares ran before the export."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import ConfigDict

from convert.config import QuantConfig
from convert.context import ConvertContext
from convert.quantize import QuantState, record_variant
from core.errors import InputError
from core.records import VariantParams

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_cnn.py"


# -- the toy variant's own module: weights rounded to a few decimals --------------------------------------------
class RoundedParams(VariantParams):
    """What the toy step did."""

    model_config = ConfigDict(extra="forbid")

    step: Literal["round_weights"] = "round_weights"
    decimals: int
    rounded_tensors: int


#: the tiny CNN's output keeps its input's effect within the 1-point budget at 4 decimals (at 2 it lost 52 points of
#: the centered cosine on the random held-out inputs, which top-1 agreement on those inputs had not seen)
DECIMALS = 4


def step_rounded(ctx: ConvertContext, state: QuantState) -> None:
    """model.rounded.onnx: the FP32 reference with every float initializer rounded to DECIMALS decimals."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(state.reference_file))
    count = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(np.round(arr, DECIMALS).astype(np.float32), init.name))
            count += 1
    built = state.work / "rounded.onnx"
    onnx.save(model, str(built))
    record_variant(ctx, state, built, name="rounded", precision="fp32",
                   params=RoundedParams(decimals=DECIMALS, rounded_tensors=count),
                   stats=state.evaluator.evaluate(built), notes=[])


def check_rounded(cfg: QuantConfig) -> None:
    """Before the export: the toy is graded on at least 8 held-out samples."""
    if cfg.gate.eval_size < 8:
        raise InputError("rounded is graded on at least 8 held-out samples: raise --eval-size")


@pytest.fixture
def toy_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one table row, registered for this test only."""
    from convert.variants import VARIANTS, Variant, one_attempt

    monkeypatch.setitem(VARIANTS, "rounded", Variant(
        name="rounded", section="quant", field=None, step=one_attempt("rounded", "round_weights", step_rounded),
        params=RoundedParams, precision="fp32", checks=check_rounded))


def test_a_new_row_is_run_graded_and_recorded(toy_row: None, tmp_path: Path) -> None:
    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert
    from core.manifest import Manifest

    out = tmp_path / "out"
    cfg = ConvertConfig(export=ExportConfig(model=f"{TINY}:build", optimize=False), out=out,
                        quant=QuantConfig(extra_variants=["rounded"]))
    man, folder = run_convert(cfg, log=lambda _m: None)
    assert folder == out
    art = Manifest.load(out).artifacts["rounded"]  # read back from manifest.json
    assert art.status == "ok" and art.precision == "fp32" and art.parent == "fp32"
    assert art.params.step == "round_weights"
    assert (art.params.decimals, art.params.rounded_tensors) == (DECIMALS, man.artifacts["rounded"].params.rounded_tensors)
    assert art.params.rounded_tensors > 0
    assert art.metrics.gate is not None and art.metrics.gate.passed is True  # graded against FP32 like any variant
    assert (out / art.file.path).is_file()
    assert Manifest.load(out).verify(out) == []  # its hash matches the file


def test_a_new_row_is_checked_before_the_export(toy_row: None, tmp_path: Path) -> None:
    from convert.config import ConvertConfig, ExportConfig, GateConfig
    from convert.pipeline import run_convert

    out = tmp_path / "out"
    cfg = ConvertConfig(export=ExportConfig(model=f"{TINY}:build", optimize=False), out=out,
                        quant=QuantConfig(extra_variants=["rounded"], gate=GateConfig(eval_size=4)))
    with pytest.raises(InputError, match="rounded is graded on at least 8"):
        run_convert(cfg, log=lambda _m: None)
    assert not out.exists(), "refused before the export"


def test_the_table_lists_the_builtin_variants_and_refuses_unknown_names() -> None:
    from convert.config import ConvertConfig, ExportConfig, variant_flags
    from convert.variants import VARIANTS, asked_variants, check_variants

    assert variant_flags() == "--fp16, --int8, --int8-dynamic, --int8-nncf, --int4 or --int4-ov"  # the section's fields name the flags
    assert {n: (v.flag, v.precision) for n, v in VARIANTS.items()} == {
        "fp16": ("--fp16", "fp16"), "int8_dynamic": ("--int8-dynamic", "int8"), "int8_static": ("--int8", "int8"),
        "int8_nncf": ("--int8-nncf", "int8"), "int4": ("--int4", "int4"), "int4_ov": ("--int4-ov", "int4")}
    assert [n for n, v in VARIANTS.items() if v.per_component is not None] == ["fp16", "int8_dynamic", "int4"]
    q = QuantConfig(fp16=True, int8_dynamic=True, int8_static=True, calib={"data": "synthetic"})
    assert [v.name for v in asked_variants(q)] == ["fp16", "int8_dynamic", "int8_static"]  # the run order
    with pytest.raises(InputError, match="unknown variant step"):  # before the export
        check_variants(ConvertConfig(export=ExportConfig(model="m"), quant=QuantConfig(extra_variants=["rounded"])).quant)


def test_every_precision_a_row_may_declare_is_named_in_reports() -> None:
    """Reports sit below convert (they cannot read the table): the precisions a row may declare carry their report
    label and integer-kernel flag in core.manifest, which reports/recommend.py reads."""
    from typing import get_args

    from convert.variants import VARIANTS
    from core.manifest import INTEGER_PRECISIONS, PRECISION_LABELS, Precision

    assert set(get_args(Precision)) == set(PRECISION_LABELS) and set(PRECISION_LABELS) >= INTEGER_PRECISIONS
    assert all(v.precision in PRECISION_LABELS for v in VARIANTS.values())



# -- a toy row of the pipeline's own table (convert.pipeline.PIPELINE_VARIANTS): a variant of the PyTorch module ----
class TorchRoundedParams(VariantParams):
    model_config = ConfigDict(extra="forbid")

    step: Literal["torch_round"] = "torch_round"
    decimals: int


def check_torch_rounded(ctx: ConvertContext) -> None:
    """Before the export: the source is a PyTorch module, and the toy is graded on at least 8 held-out samples."""
    from convert.sparsity import pytorch_module

    pytorch_module(ctx)
    if ctx.cfg.sparsity.eval_samples < 8:
        raise InputError("torch_rounded is graded on at least 8 held-out samples")


def step_torch_rounded(ctx: ConvertContext) -> None:
    """model.torch_rounded.onnx: the PyTorch module with its weights rounded, exported, validated against itself, and
    graded, timed and sized against FP32 like the sparse/pruned variants."""
    import copy

    import torch

    from convert.context import attempt_variant
    from convert.sparsity import compare_with_fp32, export_variant, fp32_evaluator, pytorch_module

    def make() -> None:
        module = copy.deepcopy(pytorch_module(ctx)).eval()
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.round(p, decimals=DECIMALS + 1))
        art = export_variant(ctx, module, "torch_rounded", params=TorchRoundedParams(decimals=DECIMALS + 1), notes=[])
        ev, pool = fp32_evaluator(ctx, ctx.cfg.sparsity)
        compare_with_fp32(ctx, art, ev, pool, ctx.cfg.sparsity)

    attempt_variant(ctx, "torch_rounded", "torch_round", make, parent=ctx.best_fp32())


@pytest.fixture
def toy_pipeline_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from convert.pipeline import PIPELINE_VARIANTS, PipelineVariant

    monkeypatch.setitem(PIPELINE_VARIANTS, "torch_rounded", PipelineVariant(
        # asked by every conversion (its section's eval_samples is always set): a toy needs no flag of its own
        name="torch_rounded", section="sparsity", field="eval_samples", step=step_torch_rounded,
        params=(TorchRoundedParams,), precision="fp32", checks=check_torch_rounded))


def test_a_new_pipeline_row_is_run_graded_and_recorded(toy_pipeline_row: None, tmp_path: Path) -> None:
    from convert.config import ConvertConfig, ExportConfig
    from convert.pipeline import run_convert
    from core.manifest import Manifest

    out = tmp_path / "out"
    cfg = ConvertConfig(export=ExportConfig(model=f"{TINY}:build", optimize=False), out=out,
                        quant=QuantConfig(fp16=True))
    run_convert(cfg, log=lambda _m: None)
    man = Manifest.load(out)
    art = man.artifacts["torch_rounded"]
    assert art.status == "ok" and art.parent == "fp32" and art.params.step == "torch_round"
    assert art.params.decimals == DECIMALS + 1
    assert art.metrics.gate is not None and art.metrics.gate.passed is True  # graded against FP32
    assert art.metrics.accuracy_vs_fp32 is not None and art.metrics.latency is not None
    assert "fp16" in man.artifacts and man.verify(out) == []  # the quant rows ran too; every hash matches


def test_a_new_pipeline_row_is_checked_before_the_export(toy_pipeline_row: None, tmp_path: Path) -> None:
    from convert.config import ConvertConfig, ExportConfig, SparsityConfig
    from convert.pipeline import run_convert

    out = tmp_path / "out"
    cfg = ConvertConfig(export=ExportConfig(model=f"{TINY}:build", optimize=False), out=out,
                        sparsity=SparsityConfig(eval_samples=4))
    with pytest.raises(InputError, match="torch_rounded is graded on at least 8"):
        run_convert(cfg, log=lambda _m: None)
    assert not out.exists(), "refused before the export"


def test_the_pipeline_table_runs_its_rows_in_order_with_their_checks_first() -> None:
    """The order the pipeline always had: sparsity, recovery, distillation, the quant rows, the engine; their checks
    before the export, the last row's first."""
    from convert.config import (
        ConvertConfig,
        DistillConfig,
        EngineConfig,
        ExportConfig,
        SparsityConfig,
        TrainConfig,
    )
    from convert.pipeline import PIPELINE_VARIANTS, build_steps

    assert list(PIPELINE_VARIANTS) == ["sparsity", "recover", "distill", "quant", "engine"]
    train = TrainConfig(data="t.npz")
    cfg = ConvertConfig(export=ExportConfig(model="m"), quant=QuantConfig(fp16=True), engine=EngineConfig(),
                        sparsity=SparsityConfig(pattern="2:4", recover=train),
                        distill=DistillConfig(student="s.py:build", train=train))
    names = [getattr(s, "__name__", "") for s in build_steps(cfg)]
    assert names == ["_check_quant", "check_distill_inputs", "check_recover_inputs", "check_sparsity_inputs",
                     "step_export", "validate_fp32", "step_optimize", "step_fuse", "step_sparsity", "step_recover",
                     "step_distill", "_quantize", "step_engine"]
    assert [getattr(s, "__name__", "") for s in build_steps(ConvertConfig(export=ExportConfig(model="m")))] == [
        "step_export", "validate_fp32", "step_optimize", "step_fuse"]


def test_a_row_without_per_component_is_refused_for_a_multi_file_model(toy_row: None, tmp_path: Path) -> None:
    """A model Optimum exports as several files gets only the rows that say how to make them per component
    (``Variant.per_component``); any other row asked for is one line before the export, never silently skipped."""
    from convert.config import ConvertConfig, ExportConfig
    from convert.variants import check_quant_inputs, per_component_flags
    from core.hf import HFModel
    from core.manifest import SourceInfo
    from core.models import LoadedModel

    hf = HFModel(model=None, task="text2text-generation-with-past", onnx_config=None,
                 components={"encoder_model": (None, None), "decoder_model": (None, None)})
    loaded = LoadedModel(source=SourceInfo(model="hf:t5", kind="hf"), hf=hf)
    cfg = ConvertConfig(export=ExportConfig(model="hf:t5"), quant=QuantConfig(fp16=True, extra_variants=["rounded"]))
    ctx = ConvertContext(cfg=cfg, out=tmp_path, loaded=loaded, manifest=None)  # type: ignore[arg-type]
    assert cfg.quant is not None
    with pytest.raises(InputError, match="^rounded: text2text-generation-with-past exports as several files "
                                         r"\(encoder_model, decoder_model\); a multi-file model gets "
                                         f"{per_component_flags()} per component"):
        check_quant_inputs(ctx, cfg.quant)
    assert per_component_flags().startswith("--fp16, --int8-dynamic")
