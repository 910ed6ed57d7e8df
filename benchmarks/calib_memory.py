"""Peak memory of INT8 calibration with 32 and with 512 images: it must not grow with the image count.

    python benchmarks/calib_memory.py [--model resnet18] [--counts 32,512] [--methods minmax,entropy]

Converts the model once (random init, 224x224), makes a folder of 512 real photographs (seeded random
crops and flips of the built-in ``imagenet_subset`` photos, JPEG), then runs ``convert.calibrate.calibrate``
(the streaming calibration ``--int8`` uses) once per (method, image count), each in a fresh process,
and records that process' RSS before calibration, its peak during calibration (sampled every 5 ms)
and its lifetime peak (``ru_maxrss``). Writes benchmarks/results/calib_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write


def make_photo_folder(dest: Path, count: int, size: int = 256, seed: int = 0,
                      photos: list[Path] | None = None) -> Path:
    """``count`` JPEGs: random square crops (40-100% of the short side) and flips of ``photos`` (default:
    every built-in photo)."""
    from PIL import Image, ImageOps

    from calibration.builtin import builtin_path

    done = dest / f".complete_{count}"
    if done.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    photos = sorted(photos or builtin_path("imagenet_subset").glob("*.jpg"))
    import numpy as np

    rng = np.random.default_rng(seed)
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = int(min(w, h) * rng.uniform(0.4, 1.0))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                crop = ImageOps.mirror(crop)
            crop.save(dest / f"photo_{i:04d}.jpg", quality=90)
    done.touch()
    return dest


def child(model: str, images: str, count: int, method: str, batch: int) -> None:
    """One measurement, printed as JSON on the last line (run in a fresh process)."""
    import psutil

    from calibration.loaders import open_source
    from convert.calibrate import calibrate
    from convert.ort_quant import preprocess_for_quantization, quantizable_op_types
    from core.manifest import Manifest

    folder = Path(model)
    manifest = Manifest.load(folder)
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        preprocess_for_quantization(folder / manifest.artifacts["opt"].file.path, prepped)
        source = open_source(images, manifest.iospec, manifest.source.preprocessing, size=count, seed=0)
        rss_before = psutil.Process().memory_info().rss
        run = calibrate(prepped, source, method, batch, None, Path(tmp), quantizable_op_types([]),  # type: ignore[arg-type]
                        Path(tmp) / "calib.json")
    print(json.dumps({"images": run.samples, "method": method, "batch": batch, "seconds": round(run.seconds, 2),
                      "rss_before_mb": round(rss_before / 2**20, 1), "peak_rss_during_mb": run.peak_rss_mb,
                      "growth_during_mb": run.rss_growth_mb,
                      "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--counts", default="32,512")
    ap.add_argument("--methods", default="minmax,entropy")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench_calib"))
    ap.add_argument("--child", nargs=4, metavar=("MODEL_DIR", "IMAGES", "COUNT", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3], args.batch)
        return
    counts = [int(c) for c in args.counts.split(",")]
    work = Path(args.work)
    folder = ensure_converted(args.model, work / args.model)
    images = make_photo_folder(work / "photos", max(counts))
    rows = []
    load_before = os.getloadavg()
    for method in args.methods.split(","):
        for n in counts:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--child", str(folder),
                                  str(images), str(n), method], capture_output=True, text=True, check=True, cwd=ROOT)
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"wall_s": round(time.perf_counter() - t0, 1)}
            print(row, flush=True)
            rows.append(row)
    payload = {"command": "python " + " ".join(sys.argv), "model": args.model, "machine": machine(),
               "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "rows": rows}
    md = ["# Calibration peak memory vs number of images\n",
          f"Command: `{payload['command']}`  ",
          f"Model: {args.model} (random init, 224x224, ONNX Runtime quant_pre_process'd), batch {args.batch}; "
          f"images: seeded crops/flips of the built-in photos; machine: {payload['machine']['cpu_model']}, "
          f"{payload['machine']['cpu_count']} cores; each row a fresh process; 1-min load average before "
          f"{load_before[0]:.2f}, after {payload['load_avg_after'][0]:.2f}.\n",
          "| method | images | calibration s | RSS before MB | peak RSS during MB | growth during MB | "
          "process peak (ru_maxrss) MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['images']} | {r['seconds']} | {r['rss_before_mb']} | "
                  f"{r['peak_rss_during_mb']} | {r['growth_during_mb']} | {r['ru_maxrss_mb']} |")
    by = {(r["method"], r["images"]): r for r in rows}
    lo, hi = min(counts), max(counts)
    md.append("")
    for method in args.methods.split(","):
        a, b = by.get((method, lo)), by.get((method, hi))
        if a and b:
            md.append(f"- {method}: {hi} images peak {b['peak_rss_during_mb']} MB vs {lo} images "
                      f"{a['peak_rss_during_mb']} MB (ratio {b['peak_rss_during_mb'] / a['peak_rss_during_mb']:.2f}); "
                      f"time ratio {b['seconds'] / max(a['seconds'], 1e-9):.1f}x")
    j, m = write("calib_memory", payload, "\n".join(md) + "\n")
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
