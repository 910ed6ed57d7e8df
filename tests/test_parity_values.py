"""Parity at values the model accepts: a dim is varied only to a value the source model runs at (never the
channels of a 3-channel conv, never 321 for a stride-32 detector), integer inputs stay inside the range their
consumer accepts (Gather indices, Reduce axes), NaN from inputs outside a function's domain is no error where the
reference gives the same NaN, and ``--sample-inputs`` values are what the first parity point runs on. Each case is
also shown to still fail where the converted file really differs from its source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convert.config import ConvertConfig, ExportConfig
from convert.pipeline import run_convert
from convert.validate import ort_reference, validate_onnx
from core.errors import ValidationError
from core.iospec import BATCH, IOSpec, TensorSpec, spec_from_onnx
from core.manifest import Manifest
from core.metrics import compare_outputs

OPSET = [helper.make_opsetid("", 18)]


def _convert(model: str, out: Path, logs: list[str] | None = None, **export: object) -> Manifest:
    m, _ = run_convert(ConvertConfig(export=ExportConfig(model=model, **export), out=out),  # type: ignore[arg-type]
                       log=(logs.append if logs is not None else lambda _m: None))
    return m


def _save(path: Path, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto] | None = None) -> Path:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits or []), opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _f(name: str, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _i(name: str, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _conv3(path: Path) -> Path:
    """A conv over 3 channels whose channel axis is declared symbolic: only C=3 runs."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.random.default_rng(0).standard_normal(108))
    return _save(path, [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                 [_f("x", ["N", "C", "H", "W"])], [_f("y", ["N", 4, "H", "W"])], [w])


def _detector(path: Path, stride: int = 32) -> Path:
    """Symbolic H and W that must be multiples of ``stride``: x [N, 3, H, W] reshaped to
    [N, 3, H/stride, stride, W/stride, stride] from its own Shape, then a mean per cell."""
    c = {n: helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
         (("i0", 0), ("i2", 2), ("i3", 3), ("s", stride), ("three", 3))}
    nodes = [helper.make_node("Shape", ["x"], ["shape"])]
    for n, i in (("n", "i0"), ("h", "i2"), ("w", "i3")):
        nodes.append(helper.make_node("Gather", ["shape", i], [n], axis=0))
    nodes += [helper.make_node("Div", ["h", "s"], ["hs"]), helper.make_node("Div", ["w", "s"], ["ws"]),
              helper.make_node("Concat", ["n", "three", "hs", "s", "ws", "s"], ["cells"], axis=0),
              helper.make_node("Reshape", ["x", "cells"], ["r"]),
              helper.make_node("ReduceMean", ["r", "axes"], ["y"], keepdims=0)]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [3, 5])
    return _save(path, nodes, [_f("x", ["N", 3, "H", "W"])], [_f("y", ["N", 3, None, None])],
                 [*c.values(), axes])


# -- 1. never vary a dim that is not really free ----------------------------------------------------------------


def test_symbolic_channels_of_a_3_channel_conv_are_not_varied(tmp_path: Path) -> None:
    """Old code: the opt variant's parity ran C=4 and failed ('ONNX Runtime run at batch 1, C=4, ...')."""
    logs: list[str] = []
    m = _convert(str(_conv3(tmp_path / "conv.onnx")), tmp_path / "out", logs, input_shape=(1, 3, 8, 8))
    assert m.artifacts["opt"].status == "ok"
    assert m.iospec.parity_values == {"C": 3, "H": 9, "W": 9}
    assert m.iospec.parity_notes["C"] == "C not varied: the source does not run at C=4, 6 or 2"
    assert any("C not varied" in line for line in logs)
    assert "batch_2_H_9_W_9" in m.artifacts["opt"].metrics.parity


def test_stride_32_detector_is_checked_at_a_multiple_of_its_bound(tmp_path: Path) -> None:
    """Old code: parity ran H=321 after 320 and failed in the opt variant's Reshape."""
    m = _convert(str(_detector(tmp_path / "det.onnx")), tmp_path / "out", input_shape=(1, 3, 320, 320))
    assert m.iospec.parity_values == {"H": 640, "W": 640}
    assert "batch_1_H_640_W_640" in m.artifacts["opt"].metrics.parity


def test_a_value_baked_in_still_fails_where_the_source_runs(tmp_path: Path) -> None:
    """The converted file has H fixed to 320 (its Reshape takes a constant shape) where the source is free in H:
    the source runs at H=640, the converted file does not, and parity says so."""
    src = _detector(tmp_path / "det.onnx")
    baked = onnx.load(str(src))
    shape = helper.make_tensor("baked", TensorProto.INT64, [6], [1, 3, 10, 32, -1, 32])
    baked.graph.initializer.append(shape)
    for node in baked.graph.node:
        if node.op_type == "Reshape":
            node.input[1] = "baked"
    onnx.save(baked, str(tmp_path / "baked.onnx"))
    spec = spec_from_onnx(onnx.load(str(src))).with_dims({"H": 320, "W": 320})
    with pytest.raises(ValidationError) as err:
        validate_onnx(tmp_path / "baked.onnx", spec, ort_reference(src), batches=(1,))
    assert any("H=640" in f for f in err.value.failures), err.value.failures


def test_a_module_that_runs_only_at_its_channels_is_not_varied_there(tmp_path: Path) -> None:
    """A torch source: the reference is the module. Its free dim (width) is varied, its channels are not."""
    model = tmp_path / "m.py"
    model.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU()).eval()\n"
        "    return m, {'x': torch.randn(1, 3, 16)}, {'x': {0: 'batch', 1: 'channels', 2: 'width'}}\n",
        encoding="utf-8")
    m = _convert(f"{model}:build", tmp_path / "out")
    assert m.iospec.parity_values == {"channels": 3, "width": 17}
    assert sorted(m.artifacts["fp32"].metrics.parity) == ["batch_1", "batch_1_width_17", "batch_2",
                                                         "batch_2_width_17"]


def test_declared_parity_values_come_first() -> None:
    spec = IOSpec(inputs=[TensorSpec(name="x", shape=[BATCH, "channels", "height"])],
                  dims={"channels": 3, "height": 32}, parity_values={"channels": 3, "height": 64})
    assert spec.parity_dims() == [{"channels": 3, "height": 32}, {"channels": 3, "height": 64}]
    assert spec.model_copy(update={"parity_values": {"channels": 3, "height": 32}}).parity_dims() == \
        [{"channels": 3, "height": 32}]  # nothing varies: one point


# -- 2. integer inputs inside the range their consumer accepts --------------------------------------------------


def _gather(path: Path, axis: int) -> Path:
    out = [5, 4, 3]
    out[axis] = 3
    return _save(path, [helper.make_node("Gather", ["data", "indices"], ["y"], axis=axis)],
                 [_f("data", [5, 4, 3]), _i("indices", [3])], [_f("y", out)])


def test_gather_indices_stay_inside_the_gathered_axis(tmp_path: Path) -> None:
    """Old code: indices drawn from [0, 100) and ONNX Runtime refused them (out of data bounds)."""
    for axis, size in ((0, 5), (1, 4), (-1, 3)):
        spec = spec_from_onnx(onnx.load(str(_gather(tmp_path / f"g{axis}.onnx", axis))))
        assert spec.input("indices").int_range == (0, size)
    m = _convert(str(tmp_path / "g1.onnx"), tmp_path / "out")
    assert m.artifacts["opt"].status == "ok"


def test_reduce_axes_input_stays_inside_the_rank(tmp_path: Path) -> None:
    src = _save(tmp_path / "rs.onnx", [helper.make_node("ReduceSum", ["data", "axes"], ["y"], keepdims=1)],
                [_f("data", [3, 2, 2]), _i("axes", [1])], [_f("y", [None, None, None])])
    assert spec_from_onnx(onnx.load(str(src))).input("axes").int_range == (-3, 3)
    m = _convert(str(src), tmp_path / "out")
    assert m.artifacts["opt"].status == "ok"


# -- 3. outside a function's domain ----------------------------------------------------------------------------


def _unary(path: Path, op: str, clip: bool = False) -> Path:
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"])] if clip else []
    nodes.append(helper.make_node(op, ["c" if clip else "x", *(["half"] if op == "Pow" else [])], ["y"]))
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("lo", -1.0), ("hi", 1.0), ("half", .5))]
    used = {i for n in nodes for i in n.input}
    return _save(path, nodes, [_f("x", ["N", 6])], [_f("y", ["N", 6])], [t for t in inits if t.name in used])


def test_nan_where_the_reference_has_the_same_nan_is_no_error(tmp_path: Path) -> None:
    """asin of |x| > 1 and pow(x, 0.5) of x < 0 are NaN in the source and in the converted file alike. Old code:
    every such output failed parity (max abs err nan)."""
    for op in ("Asin", "Pow"):
        src = _unary(tmp_path / f"{op}.onnx", op)
        spec = spec_from_onnx(onnx.load(str(src)))
        metrics = validate_onnx(src, spec, ort_reference(src))
        stats = metrics.parity["batch_2"]
        assert np.isfinite(stats.max_abs_err) and stats.max_abs_err == 0.0 and stats.cosine > 0.9999
    m = _convert(str(tmp_path / "Asin.onnx"), tmp_path / "out")
    assert m.artifacts["opt"].status == "ok"


def test_nan_on_one_side_only_is_an_error(tmp_path: Path) -> None:
    """The reference clips into asin's domain: finite everywhere; the converted file gives NaN where |x| > 1."""
    converted, reference = _unary(tmp_path / "asin.onnx", "Asin"), _unary(tmp_path / "clip.onnx", "Asin", clip=True)
    spec = spec_from_onnx(onnx.load(str(converted)))
    with pytest.raises(ValidationError) as err:
        validate_onnx(converted, spec, ort_reference(reference), batches=(1,))
    assert any("NaN or inf where the reference is finite" in f for f in err.value.failures), err.value.failures
    with pytest.raises(ValidationError) as err:  # and the other way round
        validate_onnx(reference, spec, ort_reference(converted), batches=(1,))
    assert any("finite where the reference is NaN or inf" in f for f in err.value.failures), err.value.failures


def test_compare_outputs_on_matching_and_mismatching_nan() -> None:
    ref = np.array([[0.5, np.nan, 1.0, -np.inf]], np.float32)
    same = compare_outputs([ref.copy()], [ref], ["y"])
    assert same.max_abs_err == 0.0 and same.cosine == pytest.approx(1.0)
    one_side = compare_outputs([np.array([[0.5, 0.0, 1.0, -np.inf]], np.float32)], [ref], ["y"])
    assert one_side.max_abs_err == float("inf")
    other_side = compare_outputs([ref], [np.array([[0.5, 0.0, 1.0, -np.inf]], np.float32)], ["y"])
    assert other_side.max_abs_err == float("inf")


# -- 4. --sample-inputs values are what parity runs on ----------------------------------------------------------


def _gather_symbolic(path: Path) -> Path:
    """GatherElements along a symbolic axis: the indices must be < n, a value no static shape gives."""
    return _save(path, [helper.make_node("GatherElements", ["data", "idx"], ["y"], axis=1)],
                 [_f("data", ["N", "n"]), _i("idx", ["N", 2])], [_f("y", ["N", 2])])


def test_sample_inputs_are_what_parity_runs_on(tmp_path: Path) -> None:
    src = _gather_symbolic(tmp_path / "ge.onnx")
    with pytest.raises(ValidationError, match="ONNX Runtime run at batch 1"):  # random indices in [0, 100)
        _convert(str(src), tmp_path / "random", input_shape={"data": (1, 5), "idx": (1, 2)})
    samples = tmp_path / "samples.npz"
    np.savez(samples, data=np.arange(5, dtype=np.float32)[None], idx=np.array([[0, 4]], np.int64))
    m = _convert(str(src), tmp_path / "given", sample_inputs=str(samples))
    assert m.iospec.input("idx").int_range == (0, 5)  # the span of the given values
    assert m.artifacts["opt"].status == "ok"


def test_a_factory_s_example_values_are_what_parity_runs_on(tmp_path: Path) -> None:
    """A module that only runs on indices < its input's width: its example inputs have them, random ones would not.
    Old code: parity drew indices from [0, 100) and stopped at the first run."""
    model = tmp_path / "m.py"
    model.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class M(nn.Module):\n"
        "    def forward(self, x, idx):\n"
        "        return torch.gather(x, 1, idx) * 2\n\n"
        "def build():\n"
        "    return M(), {'x': torch.randn(1, 5), 'idx': torch.tensor([[0, 4]])}, "
        "{'x': {0: 'batch', 1: 'n'}, 'idx': {0: 'batch'}}\n", encoding="utf-8")
    m = _convert(f"{model}:build", tmp_path / "out")
    assert m.artifacts["opt"].status == "ok" and "batch_2_n_6" in m.artifacts["opt"].metrics.parity


def test_sample_inputs_at_another_size_give_the_second_value(tmp_path: Path) -> None:
    """Samples at 352x352 and --input-shape at 320: parity runs at both, 352 being a value the user says the model
    takes. Old code: the samples' size was dropped and parity ran 321."""
    src = _detector(tmp_path / "det.onnx")
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.random.default_rng(0).standard_normal((1, 3, 352, 352)).astype(np.float32))
    m = _convert(str(src), tmp_path / "out", sample_inputs=str(samples), input_shape=(1, 3, 320, 320))
    assert m.iospec.dims == {"H": 320, "W": 320} and m.iospec.parity_values == {"H": 352, "W": 352}
    assert "batch_2_H_352_W_352" in m.artifacts["opt"].metrics.parity
