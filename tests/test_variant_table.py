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


DECIMALS = 2


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

    assert variant_flags() == "--fp16, --int8 or --int8-dynamic"  # the section's fields name the flags
    assert {n: (v.flag, v.precision) for n, v in VARIANTS.items()} == {
        "fp16": ("--fp16", "fp16"), "int8_dynamic": ("--int8-dynamic", "int8"), "int8_static": ("--int8", "int8")}
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
