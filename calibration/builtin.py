"""Built-in calibration sets that ship inside the repository, so calibration works offline.

``imagenet_subset`` is a few dozen real photographs (about 1 MB of JPEG, 256 px on the shorter side)
made from the sample photos that ship *inside* registry packages: scikit-image's bundled data (only
the files in the wheel, never the ones scikit-image fetches with pooch), scikit-learn's
``load_sample_images`` and matplotlib's ``sample_data``. Each photo gives its full frame plus a few
crops (still real photographs, different framings); grayscale photos are stored as RGB.

The set is unlabelled on purpose: none of these photos has a single unambiguous ImageNet class, so it
serves calibration and FP32-agreement checks, not accuracy. ``SOURCES.json`` beside the images says
where every file came from, its crop box and its licence.

The files are committed; ``python -m calibration.builtin`` rebuilds them (maintainers only: it needs
the dev extras scikit-image, scikit-learn and matplotlib, and rewrites the folder deterministically).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_SETS = {"imagenet_subset": DATA_DIR / "imagenet_subset"}
SHORT_SIDE = 256
JPEG_QUALITY = 88

# Relative crop boxes (left, top, right, bottom) as fractions of the frame.
_COLOR_CROPS = {"full": (0.0, 0.0, 1.0, 1.0), "center": (0.2, 0.2, 0.8, 0.8),
                "left": (0.0, 0.0, 0.62, 1.0), "right": (0.38, 0.0, 1.0, 1.0)}


@dataclass(frozen=True)
class _Photo:
    package: str  # the registry package that ships the file
    relpath: str  # path inside that package
    content: str
    licence: str
    crops: tuple[str, ...] = tuple(_COLOR_CROPS)


_PHOTOS = (
    _Photo("skimage", "data/astronaut.png", "astronaut Eileen Collins in uniform, portrait",
           "public domain (NASA)"),
    _Photo("skimage", "data/chelsea.png", "a tabby cat (Chelsea) on a rug", "CC0 (Stefan van der Walt)"),
    _Photo("skimage", "data/coffee.png", "a cup of coffee on a saucer", "CC0 (Rachel Michetti)"),
    _Photo("skimage", "data/rocket.jpg", "Falcon 9 launch with DSCOVR", "public domain (SpaceX)"),
    _Photo("skimage", "data/motorcycle_left.png", "a motorcycle in a garage (stereo left view)",
           "Middlebury stereo dataset, as shipped in scikit-image"),
    _Photo("skimage", "data/motorcycle_right.png", "a motorcycle in a garage (stereo right view)",
           "Middlebury stereo dataset, as shipped in scikit-image", crops=("center", "left")),
    _Photo("skimage", "data/hubble_deep_field.jpg", "Hubble deep field: galaxies", "public domain (NASA)",
           crops=("full", "center")),
    _Photo("skimage", "data/retina.jpg", "fundus photograph of a human retina", "CC0 (Wikimedia Commons)",
           crops=("full",)),
    _Photo("sklearn", "datasets/images/china.jpg", "a Chinese temple roof and trees",
           "CC BY 2.0, danielbuechele on Flickr"),
    _Photo("sklearn", "datasets/images/flower.jpg", "a pink dahlia flower", "CC BY 2.0, vultilion on Flickr"),
    _Photo("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "Rear Admiral Grace Hopper in uniform",
           "public domain (US Navy)"),
    _Photo("skimage", "data/camera.png", "a man with a camera on a tripod (grayscale)", "CC0 (Lav Varshney)",
           crops=("full", "center")),
    _Photo("skimage", "data/coins.png", "Greek coins (grayscale)", "no known copyright restrictions",
           crops=("full",)),
    _Photo("skimage", "data/clock_motion.png", "a wall clock, motion blurred (grayscale)",
           "public domain (Stefan van der Walt)", crops=("full",)),
    _Photo("skimage", "data/grass.png", "grass (grayscale texture photo)", "CC0 (CC0Textures)", crops=("full",)),
    _Photo("skimage", "data/gravel.png", "gravel (grayscale texture photo)", "CC0 (CC0Textures)", crops=("full",)),
    _Photo("skimage", "data/brick.png", "a brick wall (grayscale texture photo)", "CC0 (CC0Textures)",
           crops=("full",)),
)


#: Different files of one scene (the two views of a stereo pair): one source photo for a split.
_SAME_SCENE = {"data/motorcycle_right.png": "data/motorcycle_left.png"}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_SETS)


def builtin_path(name: str) -> Path:
    """The folder of a built-in set; a missing folder (broken install) is one clear error."""
    folder = BUILTIN_SETS[name]
    if not folder.is_dir() or not any(folder.glob("*.jpg")):
        raise InputError(f"built-in calibration set {name!r} is missing from {folder}: the package was installed "
                         "without its data files (reinstall from the repository, or rebuild it with "
                         "`python -m calibration.builtin`)")
    return folder


def source_photos(folder: Path) -> dict[str, str]:
    """File name -> the photo it was cropped from (``package:path``, from ``SOURCES.json``): what a split
    between calibration and held-out data keeps on one side."""
    meta_path = folder / "SOURCES.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return {r["file"]: f"{r['package']}:{_SAME_SCENE.get(r['source_file'], r['source_file'])}"
                for r in meta["files"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{meta_path} is missing or malformed ({type(exc).__name__}): the built-in set cannot "
                         "say which photo each file came from; rebuild it with `python -m calibration.builtin`") from None


def _package_file(package: str, relpath: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"rebuilding the built-in set needs {package} (pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise InputError(f"{package} does not ship {relpath} in this version (it may be a pooch download); "
                         "the built-in set only uses files bundled in the wheel")
    return path


def build_imagenet_subset(dest: Path | None = None) -> Path:
    """Write the JPEGs and SOURCES.json into ``dest`` (default: the shipped folder), deterministically."""
    from PIL import Image

    dest = Path(dest or BUILTIN_SETS["imagenet_subset"])
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.jpg"):
        old.unlink()
    records = []
    for photo in _PHOTOS:
        src = _package_file(photo.package, photo.relpath)
        with Image.open(src) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        for crop in photo.crops:
            fl, ft, fr, fb = _COLOR_CROPS[crop]
            box = (round(fl * w), round(ft * h), round(fr * w), round(fb * h))
            part = rgb.crop(box)
            scale = SHORT_SIDE / min(part.size)
            part = part.resize((round(part.size[0] * scale), round(part.size[1] * scale)), Image.Resampling.BICUBIC)
            name = f"{Path(photo.relpath).stem}_{crop}.jpg"
            part.save(dest / name, quality=JPEG_QUALITY, optimize=True)
            records.append({"file": name, "package": photo.package, "source_file": photo.relpath,
                            "crop_box_px": list(box), "content": photo.content, "licence": photo.licence,
                            "sha256": hashlib.sha256((dest / name).read_bytes()).hexdigest()})
    meta = {"name": "imagenet_subset", "images": len(records), "short_side_px": SHORT_SIDE,
            "labels": "none: no photo has one unambiguous ImageNet class; use it for calibration and agreement",
            "built_by": "python -m calibration.builtin", "files": records}
    (dest / "SOURCES.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return dest


if __name__ == "__main__":
    out = build_imagenet_subset()
    total = sum(f.stat().st_size for f in out.glob("*.jpg"))
    print(f"wrote {len(list(out.glob('*.jpg')))} images ({total / 2**20:.2f} MB) to {out}")
