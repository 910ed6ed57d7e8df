"""Input pools: the exact inputs every backend (and every held-out check) is run on.

A pool holds one array per input name, plus labels when known. ``bench`` builds one from random
inputs or an image folder; the convert steps build theirs from ``--eval-data`` through the same
sources as calibration (:mod:`calibration.sources`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from core.errors import InputError
from core.iospec import IOSpec
from core.manifest import HeldOutFile, SourceInfo


@dataclass
class InputPool:
    """The inputs every backend sees: one array per input name, plus labels when known."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    kind: Literal["held-out", "data", "random"] = "data"  # the artifact's own held-out data, given data, noise
    #: Inputs without a batch axis (a merged decoder's use_cache_branch): every feed takes them whole
    unbatched: frozenset[str] = frozenset()

    @property
    def size(self) -> int:
        return len(next(a for n, a in self.arrays.items() if n not in self.unbatched))

    def feed(self, start: int, batch: int) -> dict[str, np.ndarray]:
        """``batch`` samples from ``start``, wrapping around so any batch size can be served."""
        idx = (np.arange(start, start + batch)) % self.size
        return {n: np.ascontiguousarray(a if n in self.unbatched else a[idx]) for n, a in self.arrays.items()}


def random_pool(spec: IOSpec, size: int, seed: int) -> InputPool:
    """``size`` seeded random samples; a static-batch model gets stacked fixed-size batches."""
    fixed = spec.fixed_batch()
    if fixed is None:
        feed = spec.random_feed(size, seed=seed)
    else:
        parts = [spec.random_feed(fixed, seed=seed + i) for i in range(-(-size // fixed))]
        feed = {n: np.concatenate([p[n] for p in parts])[:size] for n in spec.input_names}
    unbatched = frozenset(t.name for t in spec.inputs if fixed is None and not t.has_dynamic_batch)
    return InputPool(arrays=feed, labels=None, source=f"random normal (seed {seed})", kind="random",
                     unbatched=unbatched)


def heldout_pool(base: Path, held: HeldOutFile, spec: IOSpec, size: int) -> InputPool | str:
    """The artifact's own held-out inputs (``Manifest.held_out``: what convert graded the variants on), the first
    ``size`` of them; or why they cannot feed ``spec`` as bench binds it (another --input-shape), in one line."""
    from calibration.sources import LABELS_KEY

    path = Path(base) / held.file.path
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"held-out data {path} is not a readable .npz file: {exc}") from None
    labels = arrays.pop(LABELS_KEY, None)
    want = spec.random_feed(spec.fixed_batch() or 1, seed=0)
    for name, ref in want.items():
        got = arrays.get(name)
        if got is None:
            return f"{held.file.path} has no input {name!r} (it has {sorted(arrays)})"
        if got.shape[1:] != ref.shape[1:] or got.dtype != ref.dtype:
            return (f"its {name} is {got.dtype}{list(got.shape[1:])} per sample, the run needs "
                    f"{ref.dtype}{list(ref.shape[1:])}")
    n = min(size, len(arrays[spec.input_names[0]]))
    what = f"{n} of the {held.of_samples}" if n < held.of_samples else f"the {n}"
    return InputPool(arrays={k: np.ascontiguousarray(arrays[k][:n]) for k in spec.input_names},
                     labels=None if labels is None else labels[:n],
                     source=f"held-out data of the artifact ({held.file.path}): {what} samples its variants' gates "
                            f"were graded on, from {held.source}", kind="held-out")


def image_pool(spec: IOSpec, source: SourceInfo, folder: Path, size: int, log: Callable[[str], None],
               seed: int = 0) -> InputPool:
    """``size`` readable images of ``folder``, read through the same image source as calibration. With class
    sub-folders (labels, named after the model's categories when known) the pick is stratified: one image
    of each class per round, in seeded order, so every class is sampled; a flat folder is sampled in seeded
    order. Never the first files in sorted order: those are all one class."""
    from calibration.images import scan_image_folder
    from calibration.loaders import image_input, resolve_preprocessing
    from calibration.sources import ImageFolderSource
    from calibration.split import stratified_order
    from core.models import categories_for

    if len(spec.inputs) != 1:
        raise InputError("--data gives images; this model has several inputs")
    # The model's own preprocessing (torchvision weights' transforms), fitted to its input size.
    pre = resolve_preprocessing(spec, source.preprocessing)
    images = scan_image_folder(folder, categories_for(source))
    labels = np.asarray(images.labels) if images.labels is not None else None
    order = (stratified_order(labels, seed) if labels is not None
             else np.random.default_rng(seed).permutation(len(images.files)))
    src = ImageFolderSource(folder, images.files, labels, order, spec.input_names[0], pre,
                            image_input(spec)[1], images.label_source)
    arrays: list[np.ndarray] = []
    got_labels: list[np.ndarray] = []
    for feed, lab in src.iter_labelled(1):
        arrays.append(feed[spec.input_names[0]])
        if lab is not None:
            got_labels.append(lab)
        if len(arrays) == size:
            break
    if not arrays:
        raise InputError(f"none of the {len(images.files)} files in {folder} could be read as an image")
    if src.skipped:
        log(f"skipped {len(src.skipped)} unreadable file(s) in {folder}")
    desc = f"{len(arrays)} images from {folder} (seed {seed})"
    if images.labels is not None:
        n_classes = len(np.unique(np.concatenate(got_labels))) if got_labels else 0
        desc += f" with labels ({images.label_source}), {n_classes} of {len(images.class_names)} classes"
        if n_classes < len(images.class_names):
            log(f"the accuracy pool holds {len(arrays)} images: {n_classes} of the {len(images.class_names)} "
                "classes are sampled (raise --accuracy-samples to sample them all)")
    return InputPool(arrays={spec.input_names[0]: np.concatenate(arrays)},
                     labels=np.concatenate(got_labels) if got_labels else None, source=desc)


def source_pool(data: str, spec: IOSpec, source: SourceInfo, seed: int, size: int | None = None,
                role: str | None = None) -> InputPool:
    """Held-out inputs from ``data`` (image folder, .npy/.npz with optional 'labels', or a built-in set),
    read through the same sources as calibration, all in memory."""
    from calibration.loaders import open_source, resolve_preprocessing
    from calibration.sources import EVAL_ROLE

    try:
        pre = resolve_preprocessing(spec, source.preprocessing)
    except InputError:
        pre = None  # not an image model: only tensor files apply, and open_source says so
    src = open_source(data, spec, pre, size=size, seed=seed, role=role or EVAL_ROLE)  # role: how errors name it
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    for feed, lab in src.iter_labelled(64):
        feeds.append(feed)
        if lab is not None:
            labels.append(lab)
    arrays = {n: np.ascontiguousarray(np.concatenate([f[n] for f in feeds])) for n in spec.input_names}
    return InputPool(arrays=arrays, labels=np.concatenate(labels) if labels else None, source=src.describe())
