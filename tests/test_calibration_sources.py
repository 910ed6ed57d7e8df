"""Calibration sources: the built-in set, windows, streaming, labels, and every bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from calibration.builtin import builtin_path
from calibration.cpu import CpuFeatures, cpu_features
from calibration.loaders import count_samples, open_source, resolve_preprocessing
from calibration.ort_reader import OrtCalibrationReader
from calibration.sources import CalibrationSource
from convert.quantize import parse_methods
from core.errors import InputError
from core.iospec import IOSpec, TensorSpec

RGB = IOSpec.for_image_model((1, 3, 32, 32))
GRAY = IOSpec.for_image_model((1, 1, 16, 16))


def _images(folder: Path, n: int, size: int = 40, start: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_builtin_set_is_shipped_small_and_documented() -> None:
    folder = builtin_path("imagenet_subset")
    files = sorted(folder.glob("*.jpg"))
    assert 24 <= len(files) <= 60
    assert sum(f.stat().st_size for f in files) < 5 * 2**20
    meta = json.loads((folder / "SOURCES.json").read_text())
    recorded = {r["file"]: r for r in meta["files"]}
    assert sorted(recorded) == [f.name for f in files]
    for f in files:
        assert hashlib.sha256(f.read_bytes()).hexdigest() == recorded[f.name]["sha256"]
        assert recorded[f.name]["licence"] and recorded[f.name]["package"] in ("skimage", "sklearn", "matplotlib")


def test_builtin_set_opens_offline_for_rgb_and_gray_models() -> None:
    src = open_source("imagenet_subset", RGB, None, size=10, seed=0)
    assert isinstance(src, CalibrationSource)
    batches = list(src.iter_batches(4))
    assert [len(b["input"]) for b in batches] == [4, 4, 2]
    assert batches[0]["input"].shape[1:] == (3, 32, 32) and batches[0]["input"].dtype == np.float32
    gray = next(open_source("imagenet_subset", GRAY, None, size=3, seed=0).iter_batches(3))["input"]
    assert gray.shape == (3, 1, 16, 16)
    assert "built-in imagenet_subset" in src.describe() and len(src.digest()) == 64


def test_symbolic_image_size_takes_the_bound_dims() -> None:
    """A Hugging Face vision export's pixel_values is ['batch', 3, 'height', 'width']: the photos are cropped to the
    size its IOSpec binds (the export's sample size); unbound, it is the one clear line it was."""
    spec = IOSpec(inputs=[TensorSpec(name="pixel_values", shape=["batch", 3, "height", "width"])],
                  dims={"height": 48, "width": 48})
    batch = next(open_source("imagenet_subset", spec, None, size=2, seed=0).iter_batches(2))["pixel_values"]
    assert batch.shape == (2, 3, 48, 48)
    unbound = spec.model_copy(update={"dims": {}})
    with pytest.raises(InputError, match="needs an NCHW input with 1 or 3 channels; input 'pixel_values' is"):
        open_source("imagenet_subset", unbound, None, size=2, seed=0)


def test_windows_are_disjoint_seeded_and_hashed(tmp_path: Path) -> None:
    _images(tmp_path / "imgs", 12)
    held = open_source(str(tmp_path / "imgs"), RGB, None, size=4, seed=3)
    calib = open_source(str(tmp_path / "imgs"), RGB, None, size=8, seed=3, offset=4)
    assert set(held.order).isdisjoint(calib.order) and len(calib.order) == 8
    again = open_source(str(tmp_path / "imgs"), RGB, None, size=8, seed=3, offset=4)
    assert list(again.order) == list(calib.order) and again.digest() == calib.digest()
    assert open_source(str(tmp_path / "imgs"), RGB, None, size=7, seed=3, offset=4).digest() != calib.digest()
    assert count_samples(str(tmp_path / "imgs")) == 12


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    _images(tmp_path, 3)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    src = open_source(str(tmp_path), RGB, None, size=None, seed=0)
    assert src.num_samples == 3 and len(src.probe_skipped) == 1
    assert "1 unreadable file(s) skipped" in src.describe()
    assert sum(len(b["input"]) for b in src.iter_batches(2)) == 3


def test_class_folders_give_labels(tmp_path: Path) -> None:
    _images(tmp_path / "3", 2)
    _images(tmp_path / "7", 2, start=10)
    src = open_source(str(tmp_path), RGB, None, size=None, seed=0)
    labels = np.concatenate([lab for _, lab in src.iter_labelled(3) if lab is not None])
    assert sorted(labels.tolist()) == [3, 3, 7, 7]


def test_npz_streams_from_a_memory_map_with_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((10, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x, labels=np.arange(10))
    src = open_source(str(tmp_path / "d.npz"), GRAY, None, size=6, seed=1, offset=2)
    assert isinstance(src.arrays["input"], np.memmap) and src.has_labels
    got = [(b["input"], lab) for b, lab in src.iter_labelled(4)]
    assert [len(b) for b, _ in got] == [4, 2]
    order = list(src.order)
    np.testing.assert_array_equal(np.concatenate([b for b, _ in got]), x[order])
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in got if lab is not None]), order)
    np.savez_compressed(tmp_path / "c.npz", input=x)
    comp = open_source(str(tmp_path / "c.npz"), GRAY, None, size=None, seed=0)
    assert comp.num_samples == 10 and any("compressed" in w for w in comp.warnings)
    np.save(tmp_path / "d.npy", x)
    assert open_source(str(tmp_path / "d.npy"), GRAY, None, size=None, seed=0).num_samples == 10


def test_synthetic_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no calibration data given"):
        open_source(None, GRAY, None, size=4, seed=0)
    syn = open_source("synthetic", GRAY, None, size=4, seed=0)
    assert syn.warnings and "synthetic" in syn.describe()
    a = next(syn.iter_batches(4))["input"]
    b = next(open_source("synthetic", GRAY, None, size=4, seed=0, offset=4).iter_batches(4))["input"]
    assert a.shape == (4, 1, 16, 16) and not np.allclose(a, b)


@pytest.mark.parametrize("case", ["missing", "empty", "non_images", "npz_names", "npz_shapes", "npz_labels",
                                  "npy_multi_input", "single_image", "not_data"])
def test_bad_inputs_are_one_clear_error(tmp_path: Path, case: str) -> None:
    spec, expect = GRAY, ""
    if case == "missing":
        target, expect = tmp_path / "nope", "does not exist"
    elif case == "empty":
        (target := tmp_path / "empty").mkdir()
        expect = "has no images"
    elif case == "non_images":
        (target := tmp_path / "junk").mkdir()
        for name in ("a.jpg", "b.png", "c.webp"):
            (target / name).write_text("not an image")
        expect = "could be read as an image"
    elif case == "npz_names":
        np.savez(target := tmp_path / "n.npz", images=np.zeros((4, 1, 16, 16), np.float32))
        expect = r"has arrays \['images'\] but the model's inputs are \['input'\]"
    elif case == "npz_shapes":
        np.savez(target := tmp_path / "s.npz", input=np.zeros((4, 3, 16, 16), np.float32))
        expect = "does not match the model's"
    elif case == "npz_labels":
        np.savez(target := tmp_path / "l.npz", input=np.zeros((4, 1, 16, 16), np.float32), labels=np.arange(3))
        expect = "'labels' must be 4 integer class indices"
    elif case == "npy_multi_input":
        spec = IOSpec(inputs=[TensorSpec(name="a", shape=["batch", 4]), TensorSpec(name="b", shape=["batch", 4])])
        np.save(target := tmp_path / "x.npy", np.zeros((4, 4), np.float32))
        expect = "use a .npz keyed by input name"
    elif case == "single_image":
        target = _images(tmp_path, 1)[0]
        expect = "is a single image"
    else:
        (target := tmp_path / "notes.txt").write_text("hello")
        expect = "neither an image folder nor a .npy/.npz file"
    with pytest.raises(InputError, match=expect):
        open_source(str(target), spec, None, size=None, seed=0)


def test_preprocessing_overrides_and_channel_checks() -> None:
    pre = resolve_preprocessing(RGB, None, resize=40, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert (pre.resize, pre.crop, pre.mean, pre.std) == (40, 32, [0.5] * 3, [0.25] * 3)
    with pytest.raises(InputError, match="--mean has 3 value"):
        resolve_preprocessing(GRAY, None, mean=[0.5, 0.5, 0.5])
    with pytest.raises(InputError, match="smaller than the model's input"):
        resolve_preprocessing(RGB, None, resize=16)


def test_ort_reader_streams_and_respects_a_fixed_batch() -> None:
    src = open_source("synthetic", GRAY, None, size=10, seed=0)
    reader = OrtCalibrationReader(src, batch_size=4)
    sizes = [len(b["input"]) for b in iter(reader.get_next, None)]
    assert sizes == [4, 4, 2] and len(reader) == 3
    fixed = OrtCalibrationReader(src, batch_size=4, fixed_batch=3)
    assert [len(b["input"]) for b in iter(fixed.get_next, None)] == [3, 3, 3] and fixed.dropped == 1


def test_cpu_features_and_advice() -> None:
    here = cpu_features()
    assert here.summary and isinstance(here.avx2, bool)
    old = CpuFeatures(arch="x86_64", avx2=True)
    assert old.needs_reduce_range and "may be none" in (old.int8_advice(dynamic=False) or "")
    assert "several times slower" in (old.int8_advice(dynamic=True) or "")
    vnni = CpuFeatures(arch="x86_64", avx2=True, avx512=True, vnni=True)
    assert not vnni.needs_reduce_range and vnni.int8_advice(dynamic=False) is None
    assert not CpuFeatures(arch="aarch64", arm_dotprod=True).needs_reduce_range


def test_unknown_calibration_method() -> None:
    assert parse_methods("minmax, entropy") == ["minmax", "entropy"]
    with pytest.raises(InputError, match="unknown --calib-method 'kl'"):
        parse_methods("kl")
