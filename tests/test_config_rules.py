"""The rules that combine flags live in the configs, not in cli.py: built through the Python API (ConvertConfig,
convert.flags.ConvertFlags, a sweep plan's conversion), each is refused with the same one line the CLI prints
(tests/test_quantize_cli.py, test_cli_flags.py and test_recover.py check the CLI side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.errors import InputError

VARIANT_FLAGS = "--fp16, --int8, --int8-dynamic, --int8-nncf, --int4 or --int4-ov"  # the flags of the rows of convert.variants.VARIANTS


def _config(**sections: Any) -> Any:
    from convert.config import ConvertConfig, ExportConfig

    return ConvertConfig(export=ExportConfig(model="m"), **sections)


@pytest.mark.parametrize("quant,message", [
    ({}, f"calibration, precision and accuracy-gate flags apply to a variant: add {VARIANT_FLAGS}"),
    ({"int8_static": True}, "--int8 needs calibration data: --calib DIR|FILE.npz|imagenet_subset"),
    ({"int8_dynamic": True, "gate": {"auto": True}}, "--auto tunes static INT8: add --int8"),
    ({"fp16": True, "extra_layouts": [{"quant_format": "qoperator", "per_channel": True,
                                       "activation_type": "uint8"}]},
     "--int8-layouts are layouts of static INT8: add --int8"),
    ({"fp16": True, "exclude_op_types": ["Add"]},
     "--exclude-nodes/--exclude-op-types apply to --int8 and --int8-dynamic"),
], ids=["no_variant", "int8_without_calib", "auto_without_int8", "layouts_without_int8", "exclude_without_int8"])
def test_quant_rules_hold_for_a_config_built_directly(quant: dict[str, Any], message: str) -> None:
    from convert.config import QuantConfig

    with pytest.raises(InputError) as err:
        _config(quant=QuantConfig(**quant))
    assert str(err.value).startswith(message) and err.value.exit_code == 2


def test_section_rules_hold_for_a_config_built_directly() -> None:
    from convert.config import EngineConfig, QuantConfig, SparsityConfig, TrainConfig

    with pytest.raises(InputError, match="^--eval-data measures variants: add --fp16, --int8, --int8-dynamic, --int8-nncf, --int4, --int4-ov, "
                                         "--sparsity, --prune-channels or --distill-into$"):
        _config(sparsity=SparsityConfig(eval_data="test.npz"))
    with pytest.raises(InputError, match="^--recover distill fine-tunes a pruned or sparse variant"):
        _config(sparsity=SparsityConfig(recover=TrainConfig(data="train.npz")))
    # what is allowed: an FP16 engine asks for the fp16 variant itself; eval data with a sparse variant
    assert _config(quant=QuantConfig(), engine=EngineConfig(fp16=True)).engine.fp16
    assert _config(sparsity=SparsityConfig(pattern="2:4", eval_data="test.npz")).sparsity.enabled


@pytest.mark.parametrize("flags,message", [
    ({"calib_method": "entropy"}, f"--calib-method applies to FP16/INT8 variants: add {VARIANT_FLAGS}"),
    ({"sparsity": "2:4", "auto": True, "eval_size": 50}, f"--auto, --eval-size apply to FP16/INT8 variants: add "
                                                         f"{VARIANT_FLAGS}"),
    ({"dim_range": "sequence=1:8:16"}, "--dim-range sets a TensorRT profile: add --trt"),
    ({"epochs": 3}, "--epochs tune training: add --recover distill or --distill-into with --train-data"),
    ({"train_data": "t.npz"}, "--train-data trains something: add --recover distill"),
    ({"distill_into": "s.py:build"}, "--distill-into needs --train-data DATA"),
    ({"prune_channels": "0.3", "recover": "distill"}, "--recover distill needs --train-data DATA"),
    ({"recover": "distill", "train_data": "t.npz"}, "--recover distill fine-tunes a pruned or sparse variant"),
    ({"prune_channels": "0.3", "recover": "finetune", "train_data": "t.npz"}, "unsupported --recover 'finetune'"),
    ({"exporter": "tflite"}, "unknown --exporter 'tflite'; choose torchscript or dynamo"),
    ({"int8": True, "calib": "synthetic", "activation_type": "int4"}, "unknown --activation-type 'int4'"),
    ({"int8": True, "calib": "synthetic", "calib_method": "kl"}, "unknown --calib-method 'kl'"),
    ({"int8": True}, "--int8 needs calibration data"),
    ({"eval_data": "t.npz"}, "--eval-data measures variants"),
    ({"int4": True, "eval_text": "/no/such.txt"}, "--eval-text '/no/such.txt': no such file"),  # before the export
    ({"prune_channels": "0.3", "recover": "distill", "train_data": "t.npz", "train_device": "tpu"},
     "unknown --train-device 'tpu'; choose cpu or cuda"),
])
def test_flag_rules_hold_through_the_python_api(flags: dict[str, Any], message: str) -> None:
    from convert.flags import from_flags

    with pytest.raises(InputError) as err:
        from_flags(model="m", **flags)
    assert str(err.value).startswith(message), str(err.value)


def test_an_explicit_default_is_still_a_given_flag() -> None:
    """A flag given with its default value still acts on nothing without a variant (the CLI passes given flags)."""
    from convert.flags import ConvertFlags, from_flags

    assert from_flags(model="m").quant is None  # nothing given: nothing refused
    with pytest.raises(InputError, match="^--calib-method applies"):
        ConvertFlags(model="m", calib_method="minmax")


def test_flags_map_to_the_config_the_cli_builds() -> None:
    from convert.flags import from_flags

    cfg = from_flags(model="m", int8=True, calib="synthetic", calib_method="minmax,entropy", mean="0.5,0.5,0.5",
                     int8_layouts="qop_pt_u8", exclude_op_types="Add, Mul", trt=True, dim_range="sequence=1:8:16",
                     prune_channels="0.25", recover="distill", train_data="t.npz", train_time=30.0, seed=3,
                     input_shape="1x3x32x32")
    assert cfg.export.input_shape == (1, 3, 32, 32) and cfg.export.seed == 3
    q = cfg.quant
    assert q is not None and q.int8_static and q.calib.methods == ["minmax", "entropy"] and q.calib.seed == 3
    assert q.calib.mean == [0.5, 0.5, 0.5] and [x.name for x in q.extra_layouts] == ["qop_pt_u8"]
    assert q.exclude_op_types == ["Add", "Mul"]
    assert cfg.engine is not None and cfg.engine.int8 and cfg.engine.dim_ranges == {"sequence": (1, 8, 16)}
    assert cfg.sparsity.prune_channels == 0.25 and cfg.sparsity.recover is not None
    assert cfg.sparsity.recover.max_seconds == 30.0 and cfg.distill is None


def test_a_sweep_conversion_shares_the_mapping_and_its_rules(tmp_path: Path) -> None:
    from sweep.plan import Conversion, ModelEntry

    entry = ModelEntry(model="m", input_shape="1x3x8x8")
    cfg = Conversion(fp16=True, calib_methods=["entropy"], calib="synthetic").to_config(entry, tmp_path)
    assert cfg.quant is not None and cfg.quant.calib.methods == ["entropy"] and cfg.export.input_shape == (1, 3, 8, 8)
    assert cfg.out == tmp_path
    with pytest.raises(InputError, match="^--int8 needs calibration data"):
        Conversion(int8=True).to_config(entry, tmp_path)


def test_the_cli_defaults_are_the_flags_defaults() -> None:
    """cli.py passes only the flags given: a default shown by --help must be the one ConvertFlags applies."""
    import typer

    import cli
    from convert.flags import ConvertFlags

    params = typer.main.get_command(cli.app).commands["convert"].params  # type: ignore[attr-defined]
    asked = {"model": "m", "fp16": True, "int8": True, "int4": True, "int4_ov": True, "int8_nncf": True,  # every rule met
             "train_data": "t.npz", "distill_into": "s.py:build", "eval_text": "stdlib"}
    shown = {p.name: p.default for p in params if p.default is not None and p.name not in asked}
    unset = [p.name for p in params if p.default is None and p.name not in asked]
    assert set(shown) | set(unset) | set(asked) == set(ConvertFlags.model_fields)
    assert ConvertFlags(**asked, **shown).model_dump() == ConvertFlags(**asked).model_dump()
    assert all(ConvertFlags.model_fields[n].get_default(call_default_factory=True) in (None, [], {}) for n in unset)


# -- bench and tune: their flags' rules are BenchConfig's and TuneConfig's own validators ---------------------------
@pytest.mark.parametrize("fields,message", [
    ({"backends": " , "}, "--backends is empty"),
    ({"batch_sizes": "1,x"}, "--batch-sizes must be comma-separated integers, got '1,x'"),
    ({"batch_sizes": "0,8"}, "--batch-sizes must be >= 1, got '0,8'"),
    ({"device": "tpu"}, "unknown --device 'tpu'; choose auto, cpu or cuda"),
    ({"dims": "sequence"}, "malformed --dims 'sequence': expected NAME=V1,V2"),
    ({"dims": "sequence=16,x"}, "--dims sequence must be comma-separated integers"),
    ({"dims": {"sequence": [0, 16]}}, "--dims values must be positive integers"),
    ({"options": {"openvino_hint": "fast"}}, "unknown --openvino-hint 'fast'; choose LATENCY or THROUGHPUT"),
    ({"precisions": "fp8"}, "unknown precision(s) ['fp8']; choose from fp32, fp16, bf16"),
    ({"precisions": "fp32,fp16", "options": {"cuda_graphs": True}},
     "--precisions fp16, --cuda-graphs: only measured with --device cuda"),
    ({"device": "cpu", "options": {"include_transfers": True}}, "--include-transfers: only measured with --device cuda"),
])
def test_bench_rules_hold_through_the_python_api(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    from runtimes.harness import BenchConfig

    with pytest.raises(InputError) as err:
        BenchConfig.model_validate({"artifact_dir": tmp_path, **fields})
    assert str(err.value).startswith(message), str(err.value)


def test_bench_flags_map_to_the_config_the_cli_builds(tmp_path: Path) -> None:
    from runtimes.harness import BenchConfig

    cfg = BenchConfig.model_validate({"artifact_dir": tmp_path, "backends": "ort, openvino", "batch_sizes": "1,8",
                                      "precisions": "fp32", "variants": "opt,int8_dynamic", "dims": "sequence=16,128",
                                      "options": {"openvino_hint": "throughput"}, "device": "cpu"})
    assert cfg.backends == ["ort", "openvino"] and cfg.batch_sizes == [1, 8] and cfg.precisions == ["fp32"]
    assert cfg.variants == ["opt", "int8_dynamic"] and cfg.dims == {"sequence": [16, 128]}
    assert cfg.options == {"openvino_hint": "THROUGHPUT"}
    assert BenchConfig.model_validate({"artifact_dir": tmp_path, "variants": "", "dims": ""}).variants is None
    assert BenchConfig.model_validate({"artifact_dir": tmp_path, "variants": None, "dims": None}).dims == {}
    assert BenchConfig(artifact_dir=tmp_path, device="cuda", precisions=["fp16"], options={"cuda_graphs": True})


@pytest.mark.parametrize("fields,message", [
    ({"objective": "speed"}, "unknown --objective 'speed'; choose latency or throughput"),
    ({"screen": 2}, "screen of 2 call(s): at least 3 (its interval needs three rounds), or 0 for none"),
    ({"batch_sizes": "1,-2"}, "--batch-sizes must be >= 1, got '1,-2'"),
    ({"backends": ""}, "--backends is empty"),
])
def test_tune_rules_hold_through_the_python_api(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    from runtimes.tune import TuneConfig

    with pytest.raises(InputError) as err:
        TuneConfig.model_validate({"artifact_dir": tmp_path, **fields})
    assert str(err.value).startswith(message), str(err.value)
    cfg = TuneConfig.model_validate({"artifact_dir": tmp_path, "backends": "ort", "batch_sizes": "1,8",
                                     "objective": "throughput", "variants": "opt", "screen": 0})
    assert (cfg.backends, cfg.batch_sizes, cfg.variants, cfg.screen) == (["ort"], [1, 8], ["opt"], 0)


def test_every_variant_row_has_its_convert_flag() -> None:
    """ConvertFlags maps each QuantConfig variant field from its flag (--int8 sets int8_static): a row's flag must be
    a ConvertFlags field, or the flag would do nothing."""
    from convert.config import QuantConfig, flag_fields
    from convert.flags import ConvertFlags, from_flags

    fields = flag_fields(QuantConfig)
    for name, flag in fields.items():
        attr = flag.removeprefix("--").replace("-", "_")
        assert attr in ConvertFlags.model_fields, f"{flag} (QuantConfig.{name}) is no convert flag"
    cfg = from_flags(model="m", int8_dynamic=True, fp16=True)
    assert cfg.quant is not None and cfg.quant.int8_dynamic and cfg.quant.fp16 and not cfg.quant.int8_static
