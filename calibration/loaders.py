"""A ``--calib`` / ``--eval-data`` argument -> a :class:`calibration.sources.Source`.

``open_source`` reads an image folder (flat, or one sub-folder per class), a ``.npy``/``.npz`` keyed by
input name (``labels`` optional), a built-in set (``imagenet_subset``) or, only when named explicitly,
``synthetic``; ``resolve_preprocessing`` fits an image model's preprocessing to its input size.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.builtin import BUILTIN_SETS, builtin_path, source_photos
from calibration.images import IMAGE_SUFFIXES, ImageSet, scan_image_folder
from calibration.sources import (
    CALIB_ROLE,
    DEFAULT_SYNTHETIC_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LABELS_KEY,
    RESIZE_RATIO,
    SYNTHETIC,
    ArraySource,
    ImageFolderSource,
    Source,
    SyntheticSource,
    sample_shape,
    sample_window,
)
from calibration.split import assign_parts, grouped_order
from core.errors import InputError, first_line
from core.fsutil import sha256_file
from core.iospec import IOSpec
from core.manifest import Preprocessing


def image_input(iospec: IOSpec) -> tuple[str, int, int, int]:
    """(name, channels, height, width) of a single NCHW image input, or one clear InputError. A symbolic height or
    width (a Hugging Face vision export: ``['batch', 3, 'height', 'width']``) takes the value the IOSpec binds it
    to (``dims``: the export's sample size, or ``--input-shape``)."""
    if len(iospec.inputs) != 1:
        raise InputError(f"image calibration data needs a model with one image input; this one has "
                         f"{iospec.input_names}: pass a .npz keyed by input name instead")
    t = iospec.inputs[0]
    dims = [iospec.dims.get(d, d) if isinstance(d, str) else d for d in t.shape[1:]]
    if len(t.shape) != 4 or not all(isinstance(d, int) for d in dims) or dims[0] not in (1, 3):
        raise InputError(f"image calibration data needs an NCHW input with 1 or 3 channels; input {t.name!r} "
                         f"is {t.shape}: pass a .npy/.npz of tensors instead")
    return t.name, int(dims[0]), int(dims[1]), int(dims[2])


def resolve_preprocessing(iospec: IOSpec, known: Preprocessing | None, *, resize: int | None = None,
                          mean: list[float] | None = None, std: list[float] | None = None) -> Preprocessing:
    """The model's preprocessing (torchvision weights' transforms when known) with the user's overrides,
    fitted to the model's input size: the crop is the input's H/W, the resize scales with it."""
    _, channels, h, w = image_input(iospec)
    if h != w:
        raise InputError(f"image preprocessing center-crops squares; the model's input is {h}x{w}: "
                         "pass a .npy/.npz of tensors instead")
    if known is not None:
        pre = known.model_copy(update={"crop": h, "resize": round(h * known.resize / known.crop)})
    else:
        gray = channels == 1
        pre = Preprocessing(resize=round(h / RESIZE_RATIO), crop=h,
                            mean=[float(np.mean(IMAGENET_MEAN))] if gray else list(IMAGENET_MEAN),
                            std=[float(np.mean(IMAGENET_STD))] if gray else list(IMAGENET_STD),
                            source="default: resize crop/0.875, ImageNet mean/std (model's own is unknown)")
    updates: dict[str, Any] = {}
    if resize is not None:
        if resize < h:
            raise InputError(f"--size {resize} is smaller than the model's input ({h}): the center crop needs "
                             f"at least {h} pixels")
        updates["resize"] = resize
    if mean is not None:
        updates["mean"] = list(mean)
    if std is not None:
        if any(s <= 0 for s in std):
            raise InputError(f"--std values must be > 0, got {std}")
        updates["std"] = list(std)
    if updates:
        pre = pre.model_copy(update=updates | {"source": f"{pre.source}, overridden by --size/--mean/--std"})
    for what, vals in (("--mean", pre.mean), ("--std", pre.std)):
        if len(vals) != channels:
            raise InputError(f"{what} has {len(vals)} value(s) but the model's input has {channels} channel(s)")
    return pre


def open_source(spec: str | None, iospec: IOSpec, preprocessing: Preprocessing | None, *, size: int | None,
                seed: int, allow_synthetic: bool = False, offset: int = 0, role: str = CALIB_ROLE) -> Source:
    """Open a calibration/evaluation source; see the module docstring for ``spec``.

    ``size`` caps the number of samples (None: all), ``offset`` skips the first samples of the
    seeded order (how held-out windows are taken). ``preprocessing`` applies to image sources; None
    means the default for the model's input (see :func:`resolve_preprocessing`). With no ``spec``,
    synthetic data is used only when ``allow_synthetic`` is set. ``role`` names the data in errors
    (``calibration``, or ``held-out (--eval-data)``).
    """
    if spec is None or not str(spec).strip():
        if not allow_synthetic:
            raise InputError("no calibration data given: pass --calib with an image folder, a .npy/.npz file, "
                             f"{' or '.join(repr(n) for n in BUILTIN_SETS)} (built in), or 'synthetic'")
        spec = SYNTHETIC
    spec = str(spec).strip()
    if spec == SYNTHETIC:
        n = size if size is not None else DEFAULT_SYNTHETIC_SIZE
        for t in iospec.inputs:
            sample_shape(t, iospec.dims)
        return SyntheticSource(iospec, np.arange(offset, offset + n), seed)
    if spec in BUILTIN_SETS:
        return _open_images(builtin_path(spec), iospec, preprocessing, size, seed, offset, name=spec)
    path = _data_path(spec, role)
    if path.is_dir():
        return _open_images(path, iospec, preprocessing, size, seed, offset)
    return _open_arrays(path, iospec, size, seed, offset, role)


def _data_path(spec: str, role: str = CALIB_ROLE) -> Path:
    """An image folder or a .npy/.npz file; anything else is one clear InputError."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".npy", ".npz"):
        if not path.is_file():
            raise InputError(f"{role} file {path} does not exist" if not path.exists()
                             else f"{role} file {path} is not a file")
        return path
    if not path.exists():
        hint = ", ".join(repr(n) for n in [*BUILTIN_SETS, SYNTHETIC])
        raise InputError(f"{role} data {spec!r} does not exist (expected an image folder, a .npy/.npz file, "
                         f"or one of {hint})")
    if path.is_dir():
        return path
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"{role} data {path} is a single image: put the images in a folder and pass the folder")
    raise InputError(f"{role} data {path} is neither an image folder nor a .npy/.npz file")


def _open_images(root: Path, iospec: IOSpec, pre: Preprocessing | None, size: int | None, seed: int,
                 offset: int, name: str | None = None) -> ImageFolderSource:
    images = scan_image_folder(root)
    window = sample_window(len(images.files), size, seed, offset)
    if len(window) == 0:
        raise InputError(f"image folder {root} has only {len(images.files)} images: none left after skipping "
                         f"{offset} for another window")
    photos = source_photos(root) if name else None
    return _image_source(root, images, window, iospec, pre, name, photos, {})


def _image_source(root: Path, images: ImageSet, window: np.ndarray, iospec: IOSpec, pre: Preprocessing | None,
                  name: str | None, photos: dict[str, str] | None, file_sha: dict[int, str]) -> ImageFolderSource:
    """The readable files of ``window`` (indices into ``images.files``) as a source."""
    from PIL import Image

    input_name, channels, _, _ = image_input(iospec)
    pre = resolve_preprocessing(iospec, pre)
    readable: list[int] = []
    probe_skipped: list[str] = []
    for idx in window:  # header-only probe of the selected files: cheap, and keeps num_samples exact
        f = images.files[int(idx)]
        try:
            with Image.open(f) as im:
                im.verify()
            readable.append(int(idx))
        except Exception as exc:  # PIL raises many types for garbage files
            probe_skipped.append(f"{f.name}: {type(exc).__name__}")
    if not readable:
        what = (f"the {len(window)} image file(s) picked from {root} ({len(images.files)} there)"
                if len(window) < len(images.files) else f"the {len(window)} image file(s) in {root}")
        raise InputError(f"none of {what} could be read as an image"
                         + (f" (e.g. {probe_skipped[0]})" if probe_skipped else ""))
    labels = np.asarray(images.labels) if images.labels is not None else None
    src = ImageFolderSource(root, images.files, labels, np.asarray(readable), input_name, pre, channels,
                            images.label_source, name, photos, file_sha)
    src.probe_skipped = probe_skipped
    if probe_skipped:
        src.warnings.append(f"{len(probe_skipped)} unreadable file(s) skipped in {root} "
                            f"(e.g. {', '.join(probe_skipped[:3])})")
    return src


def open_parts(spec: str, iospec: IOSpec, preprocessing: Preprocessing | None, *, sizes: Sequence[int | None],
               seed: int, role: str = CALIB_ROLE) -> list[Source]:
    """Disjoint parts of one source (e.g. held-out, selection, calibration), at most ``sizes[i]`` samples each.

    Image folders are split by source (:mod:`calibration.split`): the built-in set by source photo, so
    the crops of one photo land in one part; a user folder by file content, so copies of a file under
    other names land in the part of the first one. Tensor files and synthetic data: consecutive windows
    of the seeded order. A part left empty is one clear InputError.
    """
    spec = str(spec).strip()
    if spec in BUILTIN_SETS or (spec != SYNTHETIC and _data_path(spec, role).is_dir()):
        name = spec if spec in BUILTIN_SETS else None
        root = builtin_path(spec) if name else _data_path(spec, role)
        images = scan_image_folder(root)
        photos = source_photos(root) if name else None
        file_sha: dict[int, str] = {}

        def group_of(i: int) -> str:
            if photos is not None and images.files[i].name in photos:
                return photos[images.files[i].name]
            if i not in file_sha:
                file_sha[i] = sha256_file(images.files[i])
            return file_sha[i]

        order = (grouped_order([group_of(i) for i in range(len(images.files))], seed) if photos is not None
                 else np.random.default_rng(seed).permutation(len(images.files)))
        parts = assign_parts(order, group_of, sizes)
        if any(not p for p in parts):
            _image_source(root, images, order, iospec, preprocessing, name, photos, file_sha)  # unreadable: say so
            raise InputError(f"{spec} has {len(images.files)} images from {len({group_of(int(i)) for i in order})} "
                             f"distinct source(s): too few for {len(sizes)} disjoint parts of at most {sizes} images")
        return [_image_source(root, images, np.asarray(p), iospec, preprocessing, name, photos, file_sha)
                for p in parts]
    out: list[Source] = []
    offset = 0
    for size in sizes:
        out.append(open_source(spec, iospec, preprocessing, size=size, seed=seed, offset=offset, role=role))
        offset += out[-1].num_samples
    return out


def _npz_members(path: Path) -> tuple[dict[str, np.ndarray], bool]:
    """Memory-map every array of an uncompressed .npz; load compressed ones (and say so)."""
    arrays: dict[str, np.ndarray] = {}
    compressed = False
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            key = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                compressed = True
                with zf.open(info) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            raw.seek(info.header_offset)
            local = raw.read(30)
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")
            raw.seek(start)
            version = np.lib.format.read_magic(raw)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(raw) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(raw))
            if dtype.hasobject:
                raise ValueError(f"array {key!r} holds Python objects")
            arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape,
                                    order="F" if fortran else "C")
    return arrays, compressed


def _read_arrays(path: Path, role: str = CALIB_ROLE) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays of a .npy (under the key '') or .npz, memory-mapped where possible."""
    try:
        if path.suffix.lower() == ".npy":
            return {"": np.load(path, mmap_mode="r", allow_pickle=False)}, False
        return _npz_members(path)
    except Exception as exc:
        raise InputError(f"{role} file {path} is not a readable {path.suffix} file: "
                         f"{first_line(exc, with_type=True)}") from None


def _open_arrays(path: Path, iospec: IOSpec, size: int | None, seed: int, offset: int,
                 role: str = CALIB_ROLE) -> ArraySource:
    arrays, compressed = _read_arrays(path, role)
    if "" in arrays:
        if len(iospec.inputs) != 1:
            raise InputError(f"{path.name} holds one array but the model has inputs {iospec.input_names}: "
                             "use a .npz keyed by input name")
        arrays = {iospec.input_names[0]: arrays[""]}
    labels = arrays.pop(LABELS_KEY, None)
    names = iospec.input_names
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        raise InputError(f"{role} file {path} has arrays {sorted(arrays)} but the model's inputs are {names}"
                         + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
                         + f"; key each array by input name (plus an optional {LABELS_KEY!r})")
    problems: list[str] = []
    counts = {n: (arrays[n].shape[0] if arrays[n].ndim else 0) for n in names}
    for t in iospec.inputs:
        arr = arrays[t.name]
        want = t.shape[1:]
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            problems.append(f"{t.name}: dtype {arr.dtype} is not numeric")
        elif (arr.dtype.kind in "iub") != (np.dtype(t.dtype).kind in "iub"):  # never cast ints to floats silently
            problems.append(f"{t.name}: dtype {arr.dtype} where the model takes {t.dtype}")
        elif arr.ndim != len(t.shape) or any(isinstance(w, int) and g != w
                                             for g, w in zip(arr.shape[1:], want, strict=False)):
            problems.append(f"{t.name}: shape {list(arr.shape)} does not match the model's {t.shape} "
                            "(samples first, then the input's dims)")
    if len(set(counts.values())) > 1:
        problems.append(f"arrays have different sample counts {counts}")
    total = next(iter(counts.values()), 0)
    if total == 0 and not problems:
        problems.append("no samples")
    if labels is not None and (labels.ndim != 1 or len(labels) != total or not np.issubdtype(labels.dtype, np.integer)):
        problems.append(f"{LABELS_KEY!r} must be {total} integer class indices, got {labels.dtype} {list(labels.shape)}")
    if problems:
        raise InputError(f"{role} file {path} does not match the model: " + "; ".join(problems))
    window = sample_window(total, size, seed, offset)
    if len(window) == 0:
        raise InputError(f"{role} file {path} has only {total} samples: none left after skipping {offset} "
                         "for another window")
    src = ArraySource(path, {n: arrays[n] for n in names}, {t.name: t.dtype for t in iospec.inputs},
                      np.asarray(labels) if labels is not None else None, window, total)
    if compressed:
        src.warnings.append(f"{path.name} is compressed (np.savez_compressed): its arrays were loaded into memory; "
                            "np.savez or .npy files stream")
    return src


def count_samples(spec: str | None, role: str = CALIB_ROLE) -> int | None:
    """How many samples ``spec`` offers before any window is taken (None: unbounded synthetic data).

    Cheap (no image is decoded, no array is read), so callers can plan disjoint calibration and
    held-out windows; a missing or malformed source raises the same InputError as :func:`open_source`.
    """
    if spec is None or str(spec).strip() in ("", SYNTHETIC):
        return None
    spec = str(spec).strip()
    if spec in BUILTIN_SETS:
        return len(scan_image_folder(builtin_path(spec)).files)
    path = _data_path(spec, role)
    if path.is_dir():
        return len(scan_image_folder(path).files)
    arrays, _ = _read_arrays(path, role)
    return max((a.shape[0] for k, a in arrays.items() if k != LABELS_KEY and a.ndim), default=0)
