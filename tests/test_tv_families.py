"""torchvision by name beyond classification (core.tvzoo): one small builder per family converted with its own
sample input and validated against PyTorch; a detector exported at a fixed batch of 1 with named outputs whose
values vary with the image; --weights state dicts and bench's rebuilt module for a wrapped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convert.config import ConvertConfig, ExportConfig
from convert.pipeline import run_convert
from core.errors import InputError
from core.manifest import Manifest
from core.models import rebuild_module, resolve_model


def _convert(model: str, out: Path, **export: object) -> tuple[Manifest, list[str]]:
    lines: list[str] = []
    cfg = ConvertConfig(export=ExportConfig(model=model, optimize=False, **export), out=out)  # type: ignore[arg-type]
    run_convert(cfg, log=lines.append)
    return Manifest.load(out), lines


def _ort(folder: Path, *feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of model.onnx in ONNX Runtime, for each feed in turn (all concatenated)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return [o for feed in feeds for o in sess.run(None, feed)]


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, list[str]]:
    out = tmp_path_factory.mktemp("det")
    m, lines = _convert("ssdlite320_mobilenet_v3_large", out)
    return out, m, lines


def test_detector_exports_named_outputs_at_a_fixed_batch_of_one(detector: tuple[Path, Manifest, list[str]]) -> None:
    _, m, lines = detector
    assert [t.name for t in m.iospec.inputs] == ["images"] and m.iospec.inputs[0].shape == [1, 3, 320, 320]
    assert m.iospec.output_names == ["boxes", "scores", "labels"]
    fixed = [ln for ln in lines if "batch fixed at 1" in ln]
    assert len(fixed) == 1 and "list of images" in fixed[0]
    assert "20 best detections" in m.source.weights_note and "rescaled" in m.source.weights_note
    parity = m.artifacts["fp32"].metrics.parity
    assert list(parity) == ["batch_1"] and not parity["batch_1"].not_measurable


def test_detector_outputs_vary_with_the_image_and_match_the_rebuilt_module(
        detector: tuple[Path, Manifest, list[str]]) -> None:
    """Two images give other detections (a random-init detector's tied scores would not), the same count in ONNX
    Runtime as in PyTorch, and bench's eager runner (rebuild_module from weights.pt) gives ONNX Runtime's values."""
    import torch

    out, m, _ = detector
    module = rebuild_module(m.source, out / "weights.pt").eval()
    images = [np.random.default_rng(seed).random((1, 3, 320, 320), dtype=np.float32) for seed in (1, 2)]
    onnx_outs = _ort(out, *({"images": x} for x in images))
    got = []
    for i, x in enumerate(images):
        onnx_out = onnx_outs[3 * i:3 * i + 3]
        with torch.no_grad():
            ref = [v.numpy() for v in module(torch.from_numpy(x)).values()]
        assert [a.shape for a in onnx_out] == [r.shape for r in ref] and ref[0].shape == (20, 4)
        np.testing.assert_allclose(onnx_out[0], ref[0], atol=0.05)
        np.testing.assert_allclose(onnx_out[1], ref[1], atol=1e-4)
        assert len(set(ref[1].round(4).tolist())) > 10, "scores differ from one detection to the next"
        got.append(ref)
    assert not np.allclose(got[0][0], got[1][0]) and not np.allclose(got[0][1], got[1][1])


def test_detector_takes_a_plain_torchvision_state_dict(tmp_path: Path) -> None:
    import torch
    import torchvision

    from core import tvzoo

    name = "ssdlite320_mobilenet_v3_large"
    torch.manual_seed(7)
    plain = torchvision.models.get_model(name, weights=None, **tvzoo.builder_kwargs(name))
    torch.save(plain.state_dict(), tmp_path / "w.pt")
    loaded = resolve_model(name, str(tmp_path / "w.pt"))
    assert tvzoo.is_wrapped(loaded.module) and loaded.fixed_batch
    for k, v in plain.state_dict().items():
        assert torch.equal(loaded.module.model.state_dict()[k], v)
    assert loaded.source.weights_note.startswith(f"local state dict {tmp_path / 'w.pt'}")


def test_segmentation_video_and_quantizable_convert(tmp_path: Path) -> None:
    m, _ = _convert("lraspp_mobilenet_v3_large", tmp_path / "seg", input_shape=[1, 3, 64, 64])
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    assert [a.shape for a in _ort(tmp_path / "seg", {"input": x})] == [(1, 21, 64, 64)]
    assert m.source.preprocessing is not None
    assert m.source.preprocessing.crop == 520  # the weights' size: the default input without --input-shape
    assert resolve_model("lraspp_mobilenet_v3_large").default_shape == (1, 3, 520, 520)

    m, _ = _convert("mc3_18", tmp_path / "video", input_shape=[1, 3, 4, 32, 32])
    assert m.iospec.inputs[0].shape == ["batch", 3, 4, 32, 32] and m.iospec.outputs[0].shape == ["batch", 400]
    assert resolve_model("r3d_18").default_shape == (1, 3, 16, 112, 112)

    m, _ = _convert("quantized_shufflenet_v2_x0_5", tmp_path / "q", input_shape=[1, 3, 64, 64])
    assert m.iospec.outputs[0].shape == ["batch", 1000] and m.source.num_classes == 1000


def test_optical_flow_takes_two_images_and_returns_the_final_flow(tmp_path: Path) -> None:
    m, _ = _convert("raft_small", tmp_path / "flow")
    assert m.iospec.input_names == ["image1", "image2"] and m.iospec.output_names == ["flow"]
    assert m.iospec.inputs[0].shape == ["batch", 3, 128, 128]
    pair = {k: np.random.default_rng(i).random((2, 3, 128, 128), dtype=np.float32)
            for i, k in enumerate(m.iospec.input_names)}
    assert [a.shape for a in _ort(tmp_path / "flow", pair)] == [(2, 2, 128, 128)]
    assert "batch_2" in m.artifacts["fp32"].metrics.parity


def test_unknown_name_suggests_any_family() -> None:
    with pytest.raises(InputError, match=r"did you mean keypointrcnn_resnet50_fpn"):
        resolve_model("keypointrcnn_resnet50")
    with pytest.raises(InputError, match=r"unknown model 'no_such_net'"):
        resolve_model("no_such_net")


def test_categories_only_for_classifiers() -> None:
    from core.manifest import SourceInfo
    from core.models import categories_for

    assert categories_for(SourceInfo(model="ssdlite320_mobilenet_v3_large", kind="torchvision")) is None
    assert len(categories_for(SourceInfo(model="quantized_shufflenet_v2_x0_5", kind="torchvision")) or []) == 1000
