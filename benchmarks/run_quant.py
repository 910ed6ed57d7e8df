"""FP32 vs FP16 vs dynamic INT8 vs static INT8 (MinMax, Entropy) on this CPU, with ONNX Runtime.

    python benchmarks/run_quant.py [--models densenet121,resnet50] [--batch-sizes 1,8] [--iters 10]

For each model (random init: no weights can be downloaded here, and latency does not depend on them)
it runs ``cli.py convert MODEL --fp16 --int8-dynamic --int8 --calib-method minmax,entropy`` calibrating
on 100 real photographs (seeded crops of the built-in photos, see calib_memory.py) and checking on 32
held-out crops of *other* photos (``--eval-data``: the built-in photos are split by source photo first, so
no photo has crops on both sides; ``split_photo_folders``), then times the five ONNX variants with the bench harness' ONNX Runtime runner on the same input,
*interleaved* (one call of each in turn, ``runtimes.timing.interleaved_latency``, ONNX Runtime thread spinning off), so that load from
other processes on a shared CPU falls on every variant alike instead of on whichever ran first.
Records p50/p90, ratios against FP32, calibration time and peak memory for 100 images, file sizes and
held-out agreement in benchmarks/results/quant_cpu.{json,md}, with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.calib_memory import make_photo_folder
from benchmarks.common import ROOT, ensure_converted, machine, write

VARIANTS = ["opt", "fp16", "int8_dynamic", "int8_static_minmax", "int8_static_entropy"]
HELD_OUT_PHOTOS = 0.25  # the fraction of the built-in source photos kept for the held-out crops


def split_photo_folders(dest: Path, n_calib: int, n_held: int, seed: int = 0) -> tuple[Path, Path]:
    """(calibration folder, held-out folder) of seeded crops, from two disjoint sets of source photos:
    a crop of one photo on each side would make the held-out agreement flatter INT8."""
    import numpy as np

    from calibration.builtin import builtin_path, source_photos

    folder = builtin_path("imagenet_subset")
    by_file = source_photos(folder)
    sources = sorted(set(by_file.values()))
    rng = np.random.default_rng(seed)
    held = {sources[int(i)] for i in rng.permutation(len(sources))[:max(1, round(HELD_OUT_PHOTOS * len(sources)))]}
    files = sorted(folder.glob("*.jpg"))
    calib_files = [f for f in files if by_file[f.name] not in held]
    held_files = [f for f in files if by_file[f.name] in held]
    return (make_photo_folder(dest / "calib", n_calib, seed=seed, photos=calib_files),
            make_photo_folder(dest / "held_out", n_held, seed=seed + 1, photos=held_files))


def _markdown(payload: dict, args: argparse.Namespace, rows_md: list[str], calib_md: list[str]) -> list[str]:
    from calibration.cpu import cpu_features

    cpu = cpu_features()
    return ["# FP32 vs FP16 vs INT8 on CPU (ONNX Runtime)\n", f"Command: `{payload['command']}`  ",
          f"Machine: {payload['machine']['cpu_model']}, {payload['machine']['cpu_count']} cores ({cpu.summary}); "
          f"random-init weights, 224x224; ONNX Runtime CPU runner of `bench`, variants timed interleaved (one call "
          f"each in turn, ONNX Runtime intra-op spinning off so no session steals the cores from the next) on the "
          f"same random input, warm-up {args.warmup}, {args.iters} rounds per batch size, threads "
          f"{args.threads or 'ORT default'}. 1-min load average before "
          f"{payload['load_avg_before'][0]:.2f}, after {payload['load_avg_after'][0]:.2f}: a load above about 2 "
          "(this benchmark's own threads) means other processes shared this CPU.\n",
          "p50 95% interval: bootstrap interval of the median over the timed calls (each call one round). "
          "p50 vs FP32 is the ratio of p50 latencies (below 1 = faster than FP32). Held-out agreement: top-1 "
          "agreement with FP32 on 32 held-out crops of photos no calibration crop comes from (random-init "
          "weights, so agreement, not accuracy).\n",
          "| model | variant | batch | p50 ms | p50 95% interval | p90 ms | samples/s (at p50) | p50 vs FP32 | file MB | "
          "held-out top-1 agreement |",
          "|---|---|---|---|---|---|---|---|---|---|", *rows_md, "",
          "## Calibration (100 images, streaming, batch 8)\n",
          "| model | method | images | seconds | peak RSS MB (process) | RSS growth during calibration MB |",
          "|---|---|---|---|---|---|", *calib_md, ""]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="densenet121,resnet50")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench_quant"))
    return ap.parse_args()


def main() -> None:
    args = _args()
    from core.manifest import Manifest
    from core.records import StaticQuantParams
    from runtimes.timing import interleaved_latency

    work = Path(args.work)
    calib_photos, held_photos = split_photo_folders(ROOT / "artifacts" / "bench_quant_photos", 100, 32)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    payload: dict = {"command": "python " + " ".join(sys.argv), "machine": machine(),
                     "load_avg_before": os.getloadavg(), "models": {}}
    rows_md: list[str] = []
    calib_md: list[str] = []
    for model in args.models.split(","):
        folder = ensure_converted(model, work / model, [
            "--fp16", "--int8-dynamic", "--int8", "--calib", str(calib_photos), "--calib-size", "100",
            "--eval-data", str(held_photos), "--eval-size", "32",
            "--calib-method", "minmax,entropy"])
        manifest = Manifest.load(folder)
        arts = [manifest.artifacts[v] for v in VARIANTS]
        timings = {}
        for b in batches:
            feed = manifest.iospec.random_feed(b, seed=0)
            print(f"{model}: timing {', '.join(VARIANTS)} interleaved at batch {b}", flush=True)
            stats = interleaved_latency(manifest, folder, arts, feed, warmup=args.warmup, iters=args.iters,
                                        threads=args.threads)
            timings.update({(v, b): st for v, st in zip(VARIANTS, stats, strict=True)})
        entry: dict = {"calibration": {}, "latency": []}
        for name in ("int8_static_minmax", "int8_static_entropy"):
            params = manifest.artifacts[name].params
            assert isinstance(params, StaticQuantParams)
            c = params.calibration
            entry["calibration"][name] = c.model_dump(include={"images_used", "batch_size", "seconds", "peak_rss_mb",
                                                               "rss_growth_mb"})
            calib_md.append(f"| {model} | {name.removeprefix('int8_static_')} | {c.images_used} | {c.seconds:.1f} "
                            f"| {c.peak_rss_mb:.0f} | {c.rss_growth_mb:.0f} |")
        for b in batches:
            base = timings[("opt", b)].p50
            for v in VARIANTS:
                t, art = timings[(v, b)], manifest.artifacts[v]
                held = art.metrics.accuracy.top1_agreement if art.metrics.accuracy is not None else None
                lo, hi = t.p50_interval or (t.p50, t.p50)
                row = {"variant": v, "precision": art.precision, "batch": b, "p50_ms": round(t.p50, 2),
                       "p50_interval_ms": [round(lo, 2), round(hi, 2)],
                       "p90_ms": round(t.p90, 2), "throughput": round(b * 1000.0 / t.p50, 2),
                       "p50_vs_fp32": round(t.p50 / base, 2), "file_mb": round(art.file.size_bytes / 2**20, 1),
                       "held_out_top1_agreement": held}
                entry["latency"].append(row)
                rows_md.append(f"| {model} | {v} | {b} | {row['p50_ms']} | {lo:.1f}-{hi:.1f} | {row['p90_ms']} | "
                               f"{row['throughput']} | "
                               f"{row['p50_vs_fp32']}x | {row['file_mb']} | "
                               f"{'' if held is None else f'{100 * held:.0f}%'} |")
        payload["models"][model] = entry
    payload["load_avg_after"] = os.getloadavg()
    md = _markdown(payload, args, rows_md, calib_md)
    j, m = write("quant_cpu", payload, "\n".join(md) + "\n")
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
