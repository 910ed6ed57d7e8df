"""Held-out data that holds: no source on both sides of a split, every class in bench's pool, and an
``--auto`` gate graded on data the choice never looked at.

Each test checks the property independently of the code under test (SOURCES.json read here, files
hashed here, accuracies computed here), so it fails on the bugs it guards against: a random split that
puts crops of one photo (or copies of one file) on both sides, a pool of the first files in sorted order
(one class), and ``--auto`` reporting the gate of the split it chose on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from calibration.builtin import builtin_path
from calibration.split import assign_parts, stratified_order
from convert.calibrate import open_quant_data
from convert.config import CalibConfig, ConvertConfig, ExportConfig, GateConfig, QuantConfig
from core.iospec import IOSpec
from core.manifest import SourceInfo
from core.records import DataRecord

RGB = IOSpec.for_image_model((1, 3, 32, 32))


def _photo_of_each_file() -> dict[str, str]:
    """File name -> source photo, straight from SOURCES.json (the stereo pair is one scene)."""
    meta = json.loads((builtin_path("imagenet_subset") / "SOURCES.json").read_text())
    scene = {"data/motorcycle_right.png": "data/motorcycle_left.png"}
    return {r["file"]: scene.get(r["source_file"], r["source_file"]) for r in meta["files"]}


def _members(src: Any) -> list[str]:
    return DataRecord.model_validate(src.manifest_record()).members


def _random_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = folder / f"img{seed:02d}_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.mark.parametrize("auto", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_builtin_set_never_puts_one_photo_on_both_sides(seed: int, auto: bool) -> None:
    quant = QuantConfig(int8_static=True, calib=CalibConfig(data="imagenet_subset", seed=seed),
                        gate=GateConfig(auto=auto))
    data = open_quant_data(quant, RGB, None)
    photo = _photo_of_each_file()
    parts = [p for p in (data.held, data.selection, data.calib) if p is not None]
    assert len(parts) == (3 if auto else 2) and all(p.num_samples > 0 for p in parts)
    photos = [{photo[m] for m in _members(p)} for p in parts]
    for i in range(len(photos)):
        for j in range(i + 1, len(photos)):
            assert not photos[i] & photos[j], f"photos on two sides: {photos[i] & photos[j]}"
    records = [DataRecord.model_validate(p.manifest_record()) for p in parts]
    assert all(r.split_by == "source photo (SOURCES.json)" for r in records)
    assert not set(records[0].groups) & set(records[-1].groups), "the manifest shows the split too"


def test_user_folder_splits_by_content_not_name(tmp_path: Path) -> None:
    """Ten images, each also saved under two other names: copies never straddle the split."""
    folder = tmp_path / "imgs"
    for f in _random_images(folder, 10):
        for k in range(2):
            shutil.copyfile(f, folder / f"copy{k}_{f.name}")
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()}
    for seed in range(4):
        quant = QuantConfig(int8_static=True, calib=CalibConfig(data=str(folder), seed=seed, size=20),
                            gate=GateConfig(eval_size=7))
        data = open_quant_data(quant, RGB, None)
        assert data.calib is not None
        held = {digest[m] for m in _members(data.held)}
        calib = {digest[m] for m in _members(data.calib)}
        assert held and calib and not held & calib, f"seed {seed}: one file's content on both sides"
        rec = DataRecord.model_validate(data.held.manifest_record())
        assert rec.split_by == "file content (sha256)" and set(rec.groups) == held


def test_assign_parts_gives_each_group_one_part() -> None:
    groups = [f"g{i // 3}" for i in range(30)]  # ten groups of three, interleaved by the order below
    order = np.random.default_rng(0).permutation(30)
    parts = assign_parts(order, lambda i: groups[i], [5, 5, None])
    owners = [{groups[i] for i in p} for p in parts]
    assert [len(p) <= 5 for p in parts[:2]] == [True, True]
    assert not owners[0] & owners[1] and not owners[0] & owners[2] and not owners[1] & owners[2]


def test_bench_data_samples_every_class(tmp_path: Path) -> None:
    from calibration.pools import image_pool

    for c in range(4):  # 12 images per class: the first 32 in sorted order are classes 0-2 only
        _random_images(tmp_path / f"class_{c}", 12, seed=c)
    source = SourceInfo(model="tiny.onnx", kind="onnx")
    for size in (4, 8, 32):
        pool = image_pool(RGB, source, tmp_path, size, lambda _m: None, seed=0)
        assert pool.labels is not None and pool.size == size
        assert set(pool.labels.tolist()) == {0, 1, 2, 3}, f"{size} samples: classes {set(pool.labels.tolist())}"
        counts = np.bincount(pool.labels, minlength=4)
        assert counts.max() - counts.min() <= 1, "stratified: as even as the size allows"
    again = image_pool(RGB, source, tmp_path, 8, lambda _m: None, seed=0)
    other = image_pool(RGB, source, tmp_path, 8, lambda _m: None, seed=1)
    assert np.array_equal(again.arrays["input"], image_pool(RGB, source, tmp_path, 8, lambda _m: None).arrays["input"])
    assert not np.array_equal(again.arrays["input"], other.arrays["input"]), "seeded"


def test_stratified_order_prefix_covers_the_classes() -> None:
    labels = np.array([0] * 20 + [1] * 3 + [2] * 7)
    order = stratified_order(labels, seed=5)
    assert sorted(order.tolist()) == list(range(30))
    assert set(labels[order[:3]].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("eval_separate", [False, True])
def test_auto_parts_are_disjoint(tmp_path: Path, eval_separate: bool) -> None:
    gray = IOSpec.for_image_model((1, 1, 16, 16))
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).normal(size=(60, 1, 16, 16)).astype(np.float32))
    ev = tmp_path / "eval.npz"
    np.savez(ev, input=np.random.default_rng(1).normal(size=(30, 1, 16, 16)).astype(np.float32))
    gate = GateConfig(auto=True, max_accuracy_drop=1.0, eval_size=20, eval_data=str(ev) if eval_separate else None)
    data = open_quant_data(QuantConfig(int8_static=True, calib=CalibConfig(data=str(calib), size=30), gate=gate),
                           gray, None)
    assert data.selection is not None and data.calib is not None
    held, sel = set(_members(data.held)), set(_members(data.selection))
    assert held and sel and not held & sel
    if eval_separate:
        assert data.held.num_samples == data.selection.num_samples == 15, "half of --eval-data each"
    else:
        assert not (held | sel) & set(_members(data.calib))


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())


def test_auto_gate_is_graded_on_data_it_did_not_choose_on(digits_model: Any, tmp_path: Path) -> None:
    """--auto's trials are graded on its selection part; the artifact's gate on the held-out part, and it
    matches an accuracy computed here on exactly those rows."""
    data = tmp_path / "digits.npz"
    x, y = digits_model.x_test, digits_model.y_test
    np.savez(data, input=x, labels=y)
    quant = QuantConfig(int8_static=True, calib=CalibConfig(data=str(data), size=100),
                        gate=GateConfig(auto=True, max_accuracy_drop=5.0))
    cfg = ConvertConfig(export=ExportConfig(model=digits_model.factory, weights=str(digits_model.weights)),
                        out=tmp_path / "out", quant=quant)
    from convert.pipeline import run_convert

    manifest, out = run_convert(cfg, log=lambda _m: None)
    art = next(a for a in manifest.artifacts.values() if a.step == "quantize_static")
    auto, held, calib = art.params.auto, art.metrics.held_out, art.params.calibration
    assert auto is not None and auto.selected_on is not None and held is not None
    sel_rows, held_rows = set(auto.selected_on.members), set(held.members)
    assert sel_rows and held_rows and not sel_rows & held_rows
    assert not (sel_rows | held_rows) & set(calib.members)
    rows = np.array([int(m.removeprefix("row ")) for m in held.members])
    fp32 = _accuracy(out / manifest.artifacts["opt"].file.path, x[rows], y[rows])
    int8 = _accuracy(out / art.file.path, x[rows], y[rows])
    assert art.metrics.gate is not None and art.metrics.gate.samples == len(rows)
    assert art.metrics.gate.drop_points == pytest.approx(100 * (fp32 - int8), abs=1e-3)
