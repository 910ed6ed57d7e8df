"""Image folders -> preprocessed NCHW float32 batches (resize, center crop, normalize).

A folder is flat, or has one sub-folder per class. Sub-folder names map to class indices when they
are integers or match the model's category names; otherwise they are numbered in sorted order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import InputError
from core.manifest import Preprocessing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class ImageSet:
    """The image files of a folder, with labels when it has class sub-folders."""

    root: Path
    files: list[Path]
    labels: list[int] | None
    class_names: list[str] = field(default_factory=list)
    label_source: str = ""


def scan_image_folder(root: Path, categories: Sequence[str] | None = None) -> ImageSet:
    """List the images of ``root`` (flat or class sub-folders); an empty or missing folder is an error."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder of images")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        files: list[Path] = []
        labels: list[int] = []
        names = [d.name for d in subdirs]
        lookup = {c.lower(): i for i, c in enumerate(categories or [])}
        if all(n.isdigit() for n in names):
            index = {n: int(n) for n in names}
            source = "folder names are class indices"
        elif categories and all(n.lower().replace("_", " ") in lookup for n in names):
            index = {n: lookup[n.lower().replace("_", " ")] for n in names}
            source = "folder names match the model's category names"
        else:
            index = {n: i for i, n in enumerate(names)}
            source = "folder names numbered in sorted order (as torchvision ImageFolder)"
        for d in subdirs:
            for f in sorted(d.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(index[d.name])
        result = ImageSet(root=root, files=files, labels=labels, class_names=names, label_source=source)
    else:
        files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        result = ImageSet(root=root, files=files, labels=None)
    if not result.files:
        raise InputError(f"image folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return result


def load_image(path: Path, pre: Preprocessing, channels: int = 3) -> np.ndarray:
    """One image -> CHW float32, normalised (RGB, or grayscale when ``channels`` is 1).
    Raises OSError/ValueError for unreadable files."""
    from PIL import Image

    with Image.open(path) as src:
        im = src.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    scale = pre.resize / min(w, h)
    im = im.resize((max(pre.crop, round(w * scale)), max(pre.crop, round(h * scale))),
                   Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - pre.crop) // 2, (h - pre.crop) // 2
    im = im.crop((left, top, left + pre.crop, top + pre.crop))
    arr = np.asarray(im, dtype=np.float32).reshape(pre.crop, pre.crop, -1) / np.float32(255.0)
    norm = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(norm.transpose(2, 0, 1), dtype=np.float32)



