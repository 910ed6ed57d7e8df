"""Image calibration of a Hugging Face vision folder follows its own image processor (preprocessor_config.json):
mean/std and sizes as transformers' processors write them, not ImageNet's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError

pytest.importorskip("transformers")


def _folder(tmp_path: Path, processor: object | None) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    if processor is not None:
        processor.save_pretrained(tmp_path)  # type: ignore[attr-defined]
    return f"hf:{tmp_path}"


@pytest.mark.parametrize("name,settings,expected", [
    ("ViTImageProcessor", {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
     (32, 32, [0.5] * 3, "resize to 32x32")),
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 224}, "crop_pct": 0.875},
     (256, 224, [0.5] * 3, "size / crop_pct 0.875")),
    ("CLIPImageProcessor", {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}},
     (40, 32, [0.48145466, 0.4578275, 0.40821073], "resize 40, center crop 32")),
])
def test_processor_file_gives_the_preprocessing(tmp_path: Path, name: str, settings: dict[str, object],
                                                expected: tuple[int, int, list[float], str]) -> None:
    import transformers

    from core.hf import image_preprocessing

    pre = image_preprocessing(_folder(tmp_path, getattr(transformers, name)(**settings)))
    assert pre is not None
    resize, crop, mean, how = expected
    assert (pre.resize, pre.crop) == (resize, crop) and np.allclose(pre.mean, mean)
    assert pre.source.startswith(f"preprocessor_config.json ({name}): ") and how in pre.source


def test_no_processor_file_keeps_the_defaults(tmp_path: Path) -> None:
    import transformers

    from core.hf import image_preprocessing

    assert image_preprocessing(_folder(tmp_path, None)) is None
    plain = image_preprocessing(_folder(tmp_path, transformers.ViTImageProcessor(do_normalize=False)))
    assert plain is not None and plain.mean == [0.0] * 3 and plain.std == [1.0] * 3  # no normalization
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="preprocessor_config.json is not a JSON object"):
        image_preprocessing(f"hf:{tmp_path}")


def test_calibration_images_use_the_processor(tmp_path: Path) -> None:
    """Fitted to a 16-pixel input, a ViT processor's mean/std 0.5 reach the calibration arrays: a white photo
    becomes (1 - 0.5) / 0.5 = 1.0, where ImageNet's defaults would give 2.2-2.6."""
    import transformers
    from PIL import Image

    from calibration.loaders import open_source, resolve_preprocessing
    from core.hf import image_preprocessing
    from core.iospec import IOSpec, TensorSpec

    (tmp_path / "m").mkdir()
    (tmp_path / "imgs").mkdir()
    known = image_preprocessing(_folder(tmp_path / "m", transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)))
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(tmp_path / "imgs" / "white.png")
    spec = IOSpec(inputs=[TensorSpec(name="pixel_values", shape=["batch", 3, "height", "width"])],
                  dims={"height": 16, "width": 16})
    pre = resolve_preprocessing(spec, known)
    assert (pre.resize, pre.crop) == (16, 16)
    batch = next(open_source(str(tmp_path / "imgs"), spec, pre, size=1, seed=0).iter_batches(1))["pixel_values"]
    assert batch.shape == (1, 3, 16, 16) and np.allclose(batch, 1.0)
