"""IOSpec, manifest and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError, ValidationError
from core.fsutil import atomic_path, ensure_writable_dir, sha256_file
from core.iospec import IOSpec, feed_digest
from core.manifest import Manifest, SourceInfo
from core.records import ExportParams
from core.shapes import parse_shape


@pytest.mark.parametrize("text,want", [("1x3x224x224", (1, 3, 224, 224)), ("8X3x64x64", (8, 3, 64, 64)),
                                       (" 1,3,32,32 ", (1, 3, 32, 32))])
def test_parse_shape_ok(text: str, want: tuple[int, ...]) -> None:
    assert parse_shape(text) == want


@pytest.mark.parametrize("text", ["", "1x3xx224", "abc", "1x-3x4", "1x0x4", "1.5x3"])
def test_parse_shape_rejects_malformed(text: str) -> None:
    with pytest.raises(InputError, match="--input-shape"):
        parse_shape(text)


def test_iospec_dynamic_axes_and_feeds() -> None:
    spec = IOSpec.for_image_model((1, 3, 8, 8))
    assert spec.dynamic_axes() == {"input": {0: "batch"}, "logits": {0: "batch"}}
    a, b = spec.random_feed(4, seed=3), spec.random_feed(4, seed=3)
    assert a["input"].shape == (4, 3, 8, 8) and a["input"].dtype == np.float32
    assert feed_digest(a) == feed_digest(b)
    assert feed_digest(a) != feed_digest(spec.random_feed(4, seed=4))
    spec.check_feed(a)
    with pytest.raises(InputError, match="missing inputs"):
        spec.check_feed({"x": a["input"]})
    with pytest.raises(InputError, match="shape"):
        spec.check_feed({"input": np.zeros((4, 3, 9, 8), np.float32)})


def test_fixed_batch_spec_refuses_other_batches() -> None:
    spec = IOSpec.for_image_model((4, 3, 8, 8), dynamic_batch=False)
    assert spec.fixed_batch() == 4 and spec.dynamic_axes() == {}
    with pytest.raises(InputError, match="fixed batch of 4"):
        spec.random_feed(2)


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_ensure_writable_dir_rejects_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="cannot be written"):
        ensure_writable_dir(f / "sub")


def _manifest(tmp_path: Path) -> Manifest:
    m = Manifest(source=SourceInfo(model="m", kind="factory"), iospec=IOSpec.for_image_model((1, 3, 4, 4)))
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    m.record(tmp_path, f, name="fp32", kind="onnx", params=ExportParams(exporter="torchscript", opset=18,
                                                                         dynamic_batch=True))
    return m


def test_manifest_roundtrip_and_verify(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    m.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded.artifacts["fp32"].file.sha256 == sha256_file(tmp_path / "a.bin")
    assert loaded.verify(tmp_path) == []
    (tmp_path / "a.bin").write_bytes(b"hellp")
    assert loaded.verify(tmp_path) == ["fp32: a.bin sha256 does not match the manifest"]
    (tmp_path / "a.bin").unlink()
    assert "missing" in loaded.verify(tmp_path)[0]


def test_manifest_load_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(InputError, match="schema_version 99"):
        Manifest.load(tmp_path)
    data = json.loads(_manifest(tmp_path).model_dump_json())
    data["unknown_field"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="not a valid manifest"):
        Manifest.load(tmp_path)


def test_first_line_of_an_error() -> None:
    from core.errors import first_line

    assert first_line(ValueError("bad shape\n  long context\n  more")) == "bad shape"
    assert first_line(ValueError("  \n")) == "ValueError"  # empty message: the type, not an IndexError
    assert first_line(KeyError("x"), with_type=True) == "KeyError: 'x'"


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_schema_1_manifest_reads_into_typed_records(tmp_path: Path) -> None:
    """A manifest written by the previous toolkit (free params/metrics/extra dicts; converted digits CNN with
    every CPU variant, plus a TensorRT plan entry) loads into the typed records with the same values."""
    from core.records import (
        CopyParams,
        EngineParams,
        PruneParams,
        SparsityParams,
        StaticQuantParams,
        TrtQdqParams,
        WeightsParams,
    )

    raw = json.loads((FIXTURES / "manifest_v1.json").read_text())
    assert raw["schema_version"] == 1
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    m = Manifest.load(tmp_path)
    assert m.schema_version == 2 and sorted(m.artifacts) == sorted(raw["artifacts"])
    for name, old in raw["artifacts"].items():  # every artifact keeps its step, status and file
        art = m.artifacts[name]
        assert (art.kind, art.status, art.file.sha256, art.parent) == (old["kind"], old["status"],
                                                                      old["file"]["sha256"], old["parent"])
        assert art.step == old["step"] or (old["step"], art.step) == ("export", "save_weights")
    static = m.artifacts["int8_static_minmax"].params
    old_static = raw["artifacts"]["int8_static_minmax"]["params"]
    assert isinstance(static, StaticQuantParams) and static.calibration.sha256 == old_static["calibration"]["sha256"]
    assert static.auto is not None and static.auto.chosen_method == old_static["auto"]["chosen_method"]
    assert isinstance(m.artifacts["int8_trt"].params, TrtQdqParams)
    assert isinstance(m.artifacts["torch"].params, WeightsParams)
    gate = m.artifacts["int8_static_minmax"].metrics.gate
    assert gate is not None and gate.passed is raw["artifacts"]["int8_static_minmax"]["metrics"]["gate"]["passed"]
    sparse = m.artifacts["sparse24"]
    assert isinstance(sparse.params, SparsityParams) and sparse.metrics.sparsity is not None
    assert sparse.metrics.sparsity.fraction_groups_2of4 == \
        raw["artifacts"]["sparse24"]["metrics"]["sparsity"]["fraction_groups_2of4"]
    pruned = m.artifacts["pruned_0.3"]
    assert isinstance(pruned.params, PruneParams) and pruned.metrics.pruning is not None
    assert pruned.metrics.pruning.params_after == raw["artifacts"]["pruned_0.3"]["metrics"]["params_after"]
    assert pruned.metrics.latency is not None and pruned.metrics.latency.speedup_p50 > 0
    plan = m.artifacts["trt_fp32"]
    assert isinstance(plan.params, EngineParams) and (plan.params.min_batch, plan.params.max_batch) == (1, 32)
    assert plan.engine is not None and plan.engine.gpu_name == "NVIDIA H100"
    assert m.artifacts["opt"].metrics.parity["batch_1"].cosine > 0.999
    # Saved again, it is schema 2 and reads back unchanged.
    m.save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["schema_version"] == 2
    assert Manifest.load(tmp_path).artifacts == m.artifacts
    assert CopyParams(copied_from="x.onnx").step == "copy"


def test_typed_records_refuse_unknown_fields() -> None:
    from pydantic import ValidationError as PydanticError

    from core.records import ArtifactMetrics

    with pytest.raises(PydanticError):
        ArtifactMetrics.model_validate({"gate": {"drop_points": 1.0, "basis": "x", "budget_points": 1.0,
                                                 "passed": True, "samples": 3, "typo": 1}})
    with pytest.raises(PydanticError):  # params of an unknown step
        ExportParams.model_validate({"step": "export", "exporter": "torchscript", "opset": 18, "dynamic_batch": True,
                                     "extra_key": 1})


def test_state_dict_file_keeps_module_versions(tmp_path: Path) -> None:
    """torchvision's MNASNet refuses a state dict without the per-module versions torch.save keeps
    (coverage: mnasnet0_5 failed in bench's eager runner); a DataParallel 'module.' prefix is removed from both."""
    import torch
    import torchvision

    from core.models import apply_state_dict, load_state_dict_file

    model = torchvision.models.mnasnet0_5()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    apply_state_dict(torchvision.models.mnasnet0_5(), load_state_dict_file(tmp_path / "w.pt"), "w.pt")
    wrapped = torch.nn.DataParallel(model).state_dict()
    torch.save(wrapped, tmp_path / "dp.pt")
    state = load_state_dict_file(tmp_path / "dp.pt")
    assert "" in state._metadata and not any(k.startswith("module.") for k in state)  # type: ignore[attr-defined]
    apply_state_dict(torchvision.models.mnasnet0_5(), state, "dp.pt")


def test_random_init_weights_are_gated_on_the_output_not_on_class_agreement() -> None:
    """A random resnet's INT8 variant has cosine 0.9997 yet flips near-tied top-1 classes: with random weights
    (a torchvision name without --weights) the gate reads the output cosine; trained weights keep top-1."""
    from convert.config import Budget
    from convert.gates import gate_verdict
    from core.manifest import SourceInfo
    from core.metrics import AccuracyStats
    from core.models import is_random_init

    stats = AccuracyStats(reference="ref", samples=11, max_abs_err=0.01, mean_abs_err=0.001, cosine=0.9997,
                          top1_agreement=9 / 11)
    assert is_random_init(SourceInfo(model="resnet50", kind="torchvision"))
    assert not is_random_init(SourceInfo(model="resnet50", kind="torchvision", weights="w.pt"))
    assert not is_random_init(SourceInfo(model="m.onnx", kind="onnx"))
    random_gate = gate_verdict(stats, Budget(), random_init=True)
    assert random_gate.passed and "random-init" in random_gate.basis and random_gate.drop_points == 0.03
    trained_gate = gate_verdict(stats, Budget())
    assert not trained_gate.passed and "lost 18.18 points of top-1 agreement" in (trained_gate.reason or "")
