"""IOSpec: named symbolic dims, bindings, --input-shape parsing and the feeds they give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError
from core.iospec import BATCH, IOSpec, TensorSpec, spec_from_onnx
from core.shapes import bind_shapes, parse_input_shapes


def _tokens() -> IOSpec:
    return IOSpec(inputs=[TensorSpec(name="input_ids", shape=[BATCH, "sequence"], dtype="int64", int_range=(0, 50)),
                          TensorSpec(name="attention_mask", shape=[BATCH, "sequence"], dtype="int64", fill="ones")],
                  outputs=[TensorSpec(name="embedding", shape=[BATCH, 8])])


def test_parse_input_shapes_one_or_named() -> None:
    assert parse_input_shapes("1x3x224x224") == {None: (1, 3, 224, 224)}
    assert parse_input_shapes("input_ids:1x16, attention_mask:1x16") == {"input_ids": (1, 16),
                                                                          "attention_mask": (1, 16)}
    for bad in ("ids:1x16,1x16", "ids:1xq", "ids:1x16,ids:1x16", ":1x2"):
        with pytest.raises(InputError, match="--input-shape"):
            parse_input_shapes(bad)


def test_bind_shapes_binds_each_dim_once() -> None:
    spec = _tokens()
    assert bind_shapes(spec, parse_input_shapes("input_ids:2x16,attention_mask:2x16")) == (2, {"sequence": 16})
    with pytest.raises(InputError, match=r"dim 'sequence' is bound to two values: 16 \(in input_ids\) and 8"):
        bind_shapes(spec, parse_input_shapes("input_ids:1x16,attention_mask:1x8"))
    with pytest.raises(InputError, match="unknown input 'ids'; the model's inputs: input_ids, attention_mask"):
        bind_shapes(spec, parse_input_shapes("ids:1x16"))
    with pytest.raises(InputError, match="rank 3"):
        bind_shapes(spec, parse_input_shapes("input_ids:1x16x2"))
    with pytest.raises(InputError, match="name each one"):
        bind_shapes(spec, parse_input_shapes("1x16"))
    image = IOSpec.for_image_model((1, 3, 32, 32))
    with pytest.raises(InputError, match="dim 1 is fixed to 3"):
        bind_shapes(image, parse_input_shapes("1x4x32x32"))


def test_random_feed_follows_meaning_and_bindings() -> None:
    spec = _tokens().with_dims({"sequence": 12})
    feed = spec.random_feed(3, seed=1)
    assert feed["input_ids"].shape == (3, 12) and feed["input_ids"].dtype == np.int64
    assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < 50
    assert (feed["attention_mask"] == 1).all()
    assert spec.random_feed(2, dims={"sequence": 5})["input_ids"].shape == (2, 5)
    with pytest.raises(InputError, match=r"unbound symbolic dim 'sequence': give it a value with --input-shape "
                                         r"input_ids:1xSEQUENCE"):
        _tokens().random_feed(1)
    with pytest.raises(InputError, match="unknown dim"):
        _tokens().with_dims({"height": 3})
    assert _tokens().with_dims({"sequence": 4}).parity_dims() == [{"sequence": 4}, {"sequence": 5}]


def test_check_feed_names_dims_and_dtypes() -> None:
    spec = _tokens()
    ok = {"input_ids": np.zeros((2, 7), np.int64), "attention_mask": np.ones((2, 7), np.int64)}
    spec.check_feed(ok)
    with pytest.raises(InputError, match="dim 'sequence' is 7 in input_ids but 6 in attention_mask"):
        spec.check_feed({**ok, "attention_mask": np.ones((2, 6), np.int64)})
    with pytest.raises(InputError, match="dtype float32 where the model takes int64"):
        spec.check_feed({**ok, "input_ids": np.zeros((2, 7), np.float32)})
    with pytest.raises(InputError, match="missing inputs"):
        spec.check_feed({"input_ids": ok["input_ids"]})


def test_spec_from_onnx_keeps_dim_names_and_reads_the_vocabulary(tmp_path: Path) -> None:
    import onnx
    import torch

    from tests.fixtures import symbolic_hw, tiny_transformer

    spec = spec_from_onnx(onnx.load(str(symbolic_hw.write(tmp_path / "hw.onnx"))))
    assert spec.inputs[0].shape == [BATCH, 3, "height", "width"] and spec.outputs[0].shape == [BATCH, 5]
    assert spec.unbound_dims() == ["height", "width"]
    module, ex, axes = tiny_transformer.build()
    path = tmp_path / "t.onnx"
    torch.onnx.export(module.eval(), (ex["input_ids"], ex["attention_mask"]), str(path), dynamo=False,
                      input_names=list(ex), output_names=["embedding"], dynamic_axes=axes, opset_version=18)
    spec = spec_from_onnx(onnx.load(str(path)))
    ids, mask = spec.inputs
    assert (ids.shape, ids.dtype, ids.int_range) == ([BATCH, "sequence"], "int64", (0, tiny_transformer.VOCAB))
    assert (mask.shape, mask.fill) == ([BATCH, "sequence"], "ones")


def test_derived_dim_follows_its_parts() -> None:
    """A KV-cache model's attention mask is 'past_sequence + sequence' long: never bound or varied by itself, its
    value is the sum of its parts in every feed (a random feed of another length fails the model's own check)."""
    from core.iospec import IOSpec, TensorSpec, spec_from_examples

    spec = IOSpec(inputs=[TensorSpec(name="input_ids", shape=["batch", "sequence"], dtype="int64"),
                          TensorSpec(name="past", shape=["batch", 2, "past_sequence", 4]),
                          TensorSpec(name="attention_mask", shape=["batch", "past_sequence + sequence"],
                                     dtype="int64", fill="ones")],
                  dims={"sequence": 3, "past_sequence": 5})
    assert spec.symbolic_dims() == ["batch", "sequence", "past_sequence"]
    assert spec.input_shapes(2)["attention_mask"] == (2, 8)
    assert spec.random_feed(1, dims={"sequence": 7})["attention_mask"].shape == (1, 12)
    examples = {"input_ids": np.zeros((2, 3), np.int64), "attention_mask": np.ones((2, 8), np.int64)}
    got = spec_from_examples(examples, {"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "past_sequence + sequence"}},
                             ["logits"], dynamic_batch=True)
    assert got.dims == {"sequence": 3}
