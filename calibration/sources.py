"""Calibration sources: real inputs for INT8 calibration and held-out accuracy checks.

A source is a seeded, shuffled, *streaming* sequence of samples: it never holds more than one batch
in memory. Specs understood by :func:`open_source`:

- a folder of images (flat, or one sub-folder per class = labels); unreadable files are skipped and
  counted, an empty folder is an error;
- a ``.npy`` file (single-input models) or a ``.npz`` keyed by input name, plus an optional ``labels``
  array; arrays are memory-mapped (``np.savez`` writes them uncompressed), so they stream too;
- ``imagenet_subset``: the built-in photographs (:mod:`calibration.builtin`), offline;
- ``synthetic``: seeded random inputs, only when asked for, with a warning recorded in the manifest.

``offset``/``size`` select a window of the seeded order, so a calibration window and an evaluation
window taken from the same source never share a sample.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from calibration.images import load_image
from core.errors import InputError
from core.fsutil import sha256_file
from core.iospec import IOSpec, TensorSpec
from core.manifest import Preprocessing

#: How errors name the data: what ``--calib`` gives, and what ``--eval-data`` gives.
CALIB_ROLE = "calibration"
EVAL_ROLE = "held-out (--eval-data)"
SYNTHETIC = "synthetic"
LABELS_KEY = "labels"
DEFAULT_SYNTHETIC_SIZE = 64
# torchvision's classification presets resize to crop / 0.875 (256 for 224) before the center crop.
RESIZE_RATIO = 0.875
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@runtime_checkable
class CalibrationSource(Protocol):
    """What calibrators (ONNX Runtime, TensorRT via Polygraphy) need from a source of inputs."""

    @property
    def input_names(self) -> list[str]: ...

    @property
    def num_samples(self) -> int: ...

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of up to ``batch_size`` samples, input name -> array with the batch first (streams)."""
        ...

    def describe(self) -> str:
        """One human line: what the data is, how many samples, how it is preprocessed."""
        ...

    def digest(self) -> str:
        """sha256 over the exact content this source yields (files, selection, preprocessing)."""
        ...


class Source(ABC):
    """Shared machinery: a window ``order`` of sample indices, read one sample at a time."""

    kind: str = "source"
    split_by: str = "sample index"  # what a split between parts keeps on one side (see calibration.split)

    def __init__(self, input_names: list[str], order: np.ndarray, labels: np.ndarray | None) -> None:
        self.input_names = list(input_names)
        self.order = np.asarray(order, dtype=np.int64)
        self._labels = labels
        self.warnings: list[str] = []
        self.probe_skipped: list[str] = []  # unreadable files found when the source was opened
        self.skipped: list[str] = []  # files that failed to decode during the last pass
        self._digest: str | None = None

    @property
    def num_samples(self) -> int:
        return len(self.order)

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @abstractmethod
    def _sample(self, index: int) -> dict[str, np.ndarray] | None:
        """One sample (no batch dim) by its index in the underlying data; None when unreadable."""

    @abstractmethod
    def _content_hash(self, h: Any) -> None:
        """Feed everything that decides the yielded content into ``h``."""

    @abstractmethod
    def describe(self) -> str: ...

    def iter_labelled(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Like :meth:`iter_batches`, with the labels of each batch (None for unlabelled sources)."""
        if batch_size < 1:
            raise InputError(f"calibration batch size must be >= 1, got {batch_size}")
        self.skipped = []
        buf: list[dict[str, np.ndarray]] = []
        labs: list[int] = []
        for idx in self.order:
            sample = self._sample(int(idx))
            if sample is None:
                continue
            buf.append(sample)
            if self._labels is not None:
                labs.append(int(self._labels[idx]))
            if len(buf) == batch_size:
                yield self._stack(buf), (np.asarray(labs) if self._labels is not None else None)
                buf, labs = [], []
        if buf:
            yield self._stack(buf), (np.asarray(labs) if self._labels is not None else None)

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for batch, _ in self.iter_labelled(batch_size):
            yield batch

    def _stack(self, samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {n: np.ascontiguousarray(np.stack([s[n] for s in samples])) for n in self.input_names}

    def member(self, index: int) -> str:
        """A sample's name in the manifest (a file path, a row)."""
        return f"#{index}"

    def group(self, index: int) -> str:
        """The sample's split key: two disjoint parts of one source never share one."""
        return self.member(index)

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            h.update(self.kind.encode())
            h.update(self.order.tobytes())
            self._content_hash(h)
            self._digest = h.hexdigest()
        return self._digest

    def manifest_record(self) -> dict[str, Any]:
        """What the manifest keeps about the data a variant was calibrated or checked on."""
        return {"source": self.describe(), "kind": self.kind, "sha256": self.digest(), "num_samples": self.num_samples,
                "skipped": len(self.probe_skipped) + len(self.skipped), "labels": self.has_labels,
                "warnings": list(self.warnings), "split_by": self.split_by,
                "members": [self.member(int(i)) for i in self.order],
                "groups": sorted({self.group(int(i)) for i in self.order})}


class ImageFolderSource(Source):
    """Images decoded and preprocessed one by one (resize, center crop, normalize)."""

    kind = "images"

    def __init__(self, root: Path, files: list[Path], labels: np.ndarray | None, order: np.ndarray,
                 input_name: str, pre: Preprocessing, channels: int, label_source: str = "",
                 name: str | None = None, photos: dict[str, str] | None = None,
                 file_sha: dict[int, str] | None = None) -> None:
        super().__init__([input_name], order, labels)
        self.root, self.files, self.pre, self.channels = root, files, pre, channels
        self.label_source, self.name = label_source, name
        self.photos = photos  # built-in sets: file name -> source photo (SOURCES.json)
        self._sha = file_sha if file_sha is not None else {}  # file index -> content sha256 (shared by a split)
        self.split_by = "source photo (SOURCES.json)" if photos else "file content (sha256)"

    def file_sha(self, index: int) -> str:
        if index not in self._sha:
            self._sha[index] = sha256_file(self.files[index])
        return self._sha[index]

    def member(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def group(self, index: int) -> str:
        if self.photos is not None:
            return self.photos.get(self.files[index].name, self.file_sha(index))
        return self.file_sha(index)

    def _sample(self, index: int) -> dict[str, np.ndarray] | None:
        try:
            return {self.input_names[0]: load_image(self.files[index], self.pre, self.channels)}
        except (OSError, ValueError) as exc:
            self.skipped.append(f"{self.files[index].name}: {type(exc).__name__}")
            return None

    def _content_hash(self, h: Any) -> None:
        h.update(self.pre.model_dump_json(exclude={"source"}).encode())
        h.update(str(self.channels).encode())
        for idx in self.order:
            f = self.files[int(idx)]
            h.update(str(f.relative_to(self.root)).encode())
            h.update(self.file_sha(int(idx)).encode())

    def describe(self) -> str:
        what = f"built-in {self.name} ({self.root})" if self.name else f"image folder {self.root}"
        skipped = len(self.probe_skipped) + len(self.skipped)
        parts = [f"{what}: {self.num_samples} images"]
        if skipped:
            parts.append(f"{skipped} unreadable file(s) skipped")
        if self.has_labels:
            parts.append(f"labels: {self.label_source}")
        parts.append(f"resize {self.pre.resize}, center crop {self.pre.crop}, "
                     f"{'grayscale' if self.channels == 1 else 'RGB'}, mean {fmt_values(self.pre.mean)} "
                     f"std {fmt_values(self.pre.std)} ({self.pre.source})")
        return "; ".join(parts)


class ArraySource(Source):
    """Rows of memory-mapped arrays from a .npy/.npz file, cast to the model's input dtypes."""

    kind = "arrays"
    split_by = "row of the file"

    def __init__(self, path: Path, arrays: dict[str, np.ndarray], dtypes: dict[str, str],
                 labels: np.ndarray | None, order: np.ndarray, total: int) -> None:
        super().__init__(list(arrays), order, labels)
        self.path, self.arrays, self.dtypes, self.total = path, arrays, dtypes, total

    def _sample(self, index: int) -> dict[str, np.ndarray]:
        out = {n: np.asarray(a[index], dtype=self.dtypes[n]) for n, a in self.arrays.items()}
        for n, a in out.items():  # NaN/inf would poison ranges and accuracy alike: refuse, naming the row
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise InputError(f"{self.path}: {n!r} row {index} holds NaN or infinite values; tensors for "
                                 "calibration and accuracy checks must be finite")
        return out

    def member(self, index: int) -> str:
        return f"row {index}"

    def _content_hash(self, h: Any) -> None:
        h.update(sha256_file(self.path).encode())

    def describe(self) -> str:
        shapes = ", ".join(f"{n} {list(a.shape[1:])}" for n, a in self.arrays.items())
        lab = ", with labels" if self.has_labels else ""
        return f"tensors from {self.path}: {self.num_samples} of {self.total} samples ({shapes}{lab})"


class SyntheticSource(Source):
    """Seeded random inputs (standard normal floats): only when the user explicitly asks for it."""

    kind = "synthetic"
    split_by = "seeded sample index"

    def __init__(self, iospec: IOSpec, order: np.ndarray, seed: int) -> None:
        super().__init__(iospec.input_names, order, None)
        self.spec, self.seed = iospec, seed
        self.warnings.append("synthetic calibration data (random normal inputs): the quantization ranges do not "
                             "reflect real inputs; accuracy may suffer. Use real images or tensors (--calib PATH)")

    def _sample(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, index))
        out: dict[str, np.ndarray] = {}
        for t in self.spec.inputs:  # token ids inside the vocabulary, masks of ones (TensorSpec.random)
            out[t.name] = t.random(rng, sample_shape(t, self.spec.dims))
        return out

    def _content_hash(self, h: Any) -> None:
        h.update(self.spec.model_dump_json().encode())
        h.update(str(self.seed).encode())

    def describe(self) -> str:
        return f"synthetic: {self.num_samples} random normal samples (seed {self.seed})"


def fmt_values(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def sample_shape(t: TensorSpec, dims: dict[str, int] | None = None) -> tuple[int, ...]:
    """One sample's shape (no batch dim), with the bound values of the other symbolic dims."""
    return t.concrete_shape(1, dims)[1:]


def sample_window(total: int, size: int | None, seed: int, offset: int) -> np.ndarray:
    if size is not None and size < 1:
        raise InputError(f"--calib-size must be >= 1, got {size}")
    perm = np.random.default_rng(seed).permutation(total)
    end = None if size is None else offset + size
    return perm[offset:end]


# -- preprocessing ----------------------------------------------------------------------------------


# -- opening ---------------------------------------------------------------------------------------


