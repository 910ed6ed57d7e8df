"""The bench harness: same inputs for every backend, accuracy vs the FP32 reference, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from core.errors import BackendUnavailableError, InputError
from core.metrics import accuracy_stats
from reports.models import BenchResults
from runtimes import RUNNERS
from runtimes.harness import BenchConfig, run_bench
from runtimes.ort import OrtRunner


def _bench(folder: Path, **kw: object) -> BenchResults:
    cfg = BenchConfig(artifact_dir=folder, warmup=1, iters=3, **kw)  # type: ignore[arg-type]
    return run_bench(cfg, log=lambda _m: None)


def test_every_backend_sees_the_same_inputs_and_agrees(resnet18_artifacts: Path) -> None:
    res = _bench(resnet18_artifacts, batch_sizes=[1, 3], accuracy_samples=6)
    got = {(r.backend, r.variant, r.batch_size) for r in res.records}
    assert got == {(b, v, n) for b, v in [("eager", "torch"), ("torchscript", "torch"), ("ort", "fp32"),
                                          ("ort", "opt")] for n in (1, 3)}
    for n in (1, 3):
        digests = {r.input_digest for r in res.records if r.batch_size == n}
        assert len(digests) == 1, "backends were fed different inputs"
    for r in res.records:
        assert r.accuracy is not None and r.accuracy.samples == 6
        # random inputs (the artifact has no held-out data): graded on the output cosine, no top-1 on noise
        assert r.accuracy.top1_agreement is None and r.accuracy.cosine > 0.9999
        assert r.accuracy_drop is not None and r.accuracy_drop < 0.01
        assert r.accuracy.max_abs_err < 1e-3
        lat = r.latency_ms
        assert 0 < lat.min <= lat.p50 <= lat.p90 <= lat.p99 <= lat.max and lat.iters == 3
        assert r.throughput == pytest.approx(r.batch_size / (lat.mean / 1e3))
        assert r.ram_mb and r.ram_mb > 0 and r.model_size_mb and r.model_size_mb > 1
        assert r.cpu_util is not None and r.device == "cpu"
    eager = [r for r in res.records if r.backend == "eager"]
    assert all(r.accuracy and r.accuracy.max_abs_err == 0.0 for r in eager)  # the reference itself


def test_accuracy_stats_detects_disagreement() -> None:
    ref = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.1]], np.float32)
    same = accuracy_stats([ref.copy()], [ref], np.array([1, 1]), "ref")
    assert same.top1_agreement == 1.0 and same.top1_acc == 0.5 and same.ref_top1_acc == 0.5
    swapped = accuracy_stats([ref[:, [1, 2, 0]].copy()], [ref], None, "ref")
    assert swapped.top1_agreement == 0.0 and swapped.top1_acc is None
    assert swapped.max_abs_err == pytest.approx(2.0)


def test_accuracy_stats_cover_every_output_by_name() -> None:
    """A second output that a variant ruins is seen (worst cosine, and by name), and top-k come from the output
    that is class scores even when it is not the first."""
    rng = np.random.default_rng(0)
    emb, logits = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((8, 5)).astype(np.float32)
    stats = accuracy_stats([emb, -logits], [emb, logits], None, "ref", ["embedding", "logits"])
    assert stats.per_output["embedding"].cosine == pytest.approx(1.0)
    assert stats.per_output["logits"].cosine == pytest.approx(-1.0) and stats.cosine == pytest.approx(-1.0)
    assert stats.scored_output == "logits" and stats.top1_agreement == 0.0


def test_labelled_image_folder_gives_accuracy(tmp_path: Path, resnet18_artifacts: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("0", "7"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "0" / "broken.jpg").write_bytes(b"not an image")
    res = _bench(resnet18_artifacts, backends=["ort"], variants=["opt"], batch_sizes=[2], data=tmp_path,
                 accuracy_samples=6)
    acc = res.records[0].accuracy
    assert acc is not None and acc.samples == 6
    assert acc.top1_acc is not None and acc.ref_top1_acc is not None and acc.top1_agreement == 1.0
    assert "6 images" in res.config["inputs"] and "labels" in res.config["inputs"]


def test_bad_requests_are_clear(resnet18_artifacts: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown backend.*available: eager, torchscript, ort"):
        _bench(resnet18_artifacts, backends=["ort", "tensorflow"])
    if RUNNERS["eager"].available("cuda") is not None:
        with pytest.raises(BackendUnavailableError, match="unavailable on cuda"):
            _bench(resnet18_artifacts, backends=["eager"], device="cuda")
    with pytest.raises(InputError, match="unknown variant"):
        _bench(resnet18_artifacts, backends=["ort"], variants=["int8"])
    with pytest.raises(InputError, match="no manifest.json"):
        _bench(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        _bench(resnet18_artifacts, backends=["ort"], data=tmp_path / "nope")


def test_tampered_artifact_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, copy)
    with open(copy / "model.opt.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(InputError, match="sha256 does not match"):
        _bench(copy, backends=["ort"])


def test_class_folders_named_after_categories_map_to_model_indices(tmp_path: Path) -> None:
    from PIL import Image

    from calibration.images import scan_image_folder
    from core.manifest import SourceInfo
    from core.models import categories_for

    cats = categories_for(SourceInfo(model="resnet18", kind="torchvision"))
    assert cats is not None and cats[0] == "tench" and cats[1] == "goldfish"
    for name in ("goldfish", "tench"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    images = scan_image_folder(tmp_path, cats)
    assert images.labels == [1, 0] and "category names" in images.label_source
    other = scan_image_folder(tmp_path, None)
    assert other.labels == [0, 1] and "sorted order" in other.label_source


def test_device_auto_picks_cuda_only_when_a_gpu_is_visible() -> None:
    import torch

    from runtimes.harness import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(InputError, match="choose auto, cpu or cuda"):
        resolve_device("tpu")


class HalfLoadingRunner(OrtRunner):
    """The ONNX Runtime runner on a machine where its backend gives out halfway through loading."""

    name = "half-loading"
    closed: ClassVar[list[str]] = []

    def _load(self) -> None:
        self.session = object()  # acquired before the failure: close() must release it
        raise BackendUnavailableError("the device went away while loading")

    def _close(self) -> None:
        type(self).closed.append(self.artifact.name)
        super()._close()


def test_a_backend_that_fails_to_load_is_closed_and_skipped(tiny_artifacts: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RUNNERS, "half-loading", HalfLoadingRunner)
    monkeypatch.setattr(HalfLoadingRunner, "closed", [])
    res = _bench(tiny_artifacts, backends=["half-loading", "ort"], batch_sizes=[1], accuracy_samples=4)
    assert sorted(HalfLoadingRunner.closed) == ["fp32", "opt"]  # closed once per target, after the failed load
    assert [w for w in res.warnings if "skipped" in w] == [
        f"half-loading:{v} (fp32) skipped: the device went away while loading" for v in ("fp32", "opt")]
    assert {(r.backend, r.variant) for r in res.records} == {("ort", "fp32"), ("ort", "opt")}
    with pytest.raises(BackendUnavailableError, match="no backend could be measured: half-loading:fp32"):
        _bench(tiny_artifacts, backends=["half-loading"], batch_sizes=[1], accuracy_samples=4)


def test_runner_capabilities_are_class_attributes() -> None:
    torch_like = {n for n, r in RUNNERS.items() if r.torch_like}
    assert torch_like == {n for n, r in RUNNERS.items() if r.needs_weights} == {"eager", "torchscript", "compile"}
    assert {n for n, r in RUNNERS.items() if r.tensorrt_like} == {"ort-trt", "trt"}
    assert {n: r.profiler for n, r in RUNNERS.items() if r.profiler} == {"eager": "torch", "torchscript": "torch",
                                                                          "compile": "torch", "ort": "onnxruntime"}
