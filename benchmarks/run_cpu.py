"""Spine benchmark (issue 2): eager vs TorchScript vs ONNX Runtime on this CPU, plus a bare
``session.run`` loop on the same inputs, interleaved with the harness, to measure the harness's own overhead.

    python benchmarks/run_cpu.py [--models densenet121,resnet50] [--batch-sizes 1,8] [--iters 50]

Writes benchmarks/results/cpu_spine.{json,md}. Targets: harness ORT p50 within 3% of the bare loop;
ORT FP32 at least 2x faster than eager for densenet121 at batch 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write


def harness_vs_bare(folder: Path, feed: dict[str, np.ndarray], warmup: int, iters: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of the harness's ORT runner and of a bare ``session.run`` on the same session and feed,
    one call of each in turn, so that drift in machine load falls on both alike."""
    from core.manifest import Manifest
    from runtimes.base import RunnerOptions
    from runtimes.ort import OrtRunner

    manifest = Manifest.load(folder)
    art = manifest.artifacts["opt"]
    with OrtRunner(manifest, folder, art, RunnerOptions()) as runner:
        # The bare loop: the runner's own session, called directly with nothing around session.run. (A second
        # session would bring a second spinning thread pool, and the two would fight over the cores.)
        sess = runner.session
        prepared = runner.prepare(feed)
        for _ in range(warmup):
            runner.run_once(prepared)
            sess.run(None, feed)
        harness: list[float] = []
        bare: list[float] = []
        for i in range(iters):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                if which == 0:
                    harness.extend(runner.time_iterations(prepared, 0, 1))
                else:
                    t0 = time.perf_counter_ns()
                    sess.run(None, feed)
                    bare.append((time.perf_counter_ns() - t0) / 1e6)
    return harness, bare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="densenet121,resnet50")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args()

    from calibration.pools import InputPool
    from core.manifest import Manifest
    from runtimes.harness import BenchConfig, build_pool, run_bench

    batches = [int(b) for b in args.batch_sizes.split(",")]
    payload: dict = {"command": "python " + " ".join(sys.argv), "machine": machine(), "models": {}}
    md = ["# CPU spine benchmark\n", f"Command: `{payload['command']}`  ",
          f"Machine: {payload['machine']['cpu_model']}, {payload['machine']['cpu_count']} cores, "
          f"{payload['machine']['ram_gb']} GiB; random-init weights, 224x224, warm-up {args.warmup}, "
          f"{args.iters} timed iterations.\n",
          "Columns 3-5 come from one `bench` run (eager, TorchScript, ORT `opt`, in that order). Columns 6-7 "
          "time the harness's ORT runner and a bare `session.run` loop one call each in turn on the same "
          "feed, so their ratio is not skewed by load drift between runs.\n",
          "| model | batch | eager p50 ms | torchscript p50 ms | ORT p50 ms | harness ORT p50 ms (interleaved) | "
          "bare ORT p50 ms (interleaved) | harness / bare | eager / ORT (speed-up) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        folder = ensure_converted(model, Path(args.work) / model)
        cfg = BenchConfig(artifact_dir=folder, backends=["eager", "torchscript", "ort"], variants=["opt"],
                          batch_sizes=batches, warmup=args.warmup, iters=args.iters, accuracy_samples=8)
        load_before = os.getloadavg()[0]
        res = run_bench(cfg, log=print)
        manifest = Manifest.load(folder)
        pool: InputPool = build_pool(manifest, cfg, max(8, max(batches)), print)
        rows = {}
        for b in batches:
            p50 = {r.backend: r.latency_ms.p50 for r in res.records if r.batch_size == b}
            # Harness overhead: the harness's ORT runner and a bare session.run, interleaved on the same feed
            # the harness used (pool.feed(0, b)).
            h, bare = harness_vs_bare(folder, pool.feed(0, b), args.warmup, args.iters)
            h_p50, bare_p50 = float(np.percentile(h, 50)), float(np.percentile(bare, 50))
            rows[b] = {**{f"{k}_p50_ms": v for k, v in p50.items()}, "interleaved_harness_ort_p50_ms": h_p50,
                       "interleaved_bare_ort_p50_ms": bare_p50, "ort_over_bare": h_p50 / bare_p50,
                       "eager_over_ort": p50["eager"] / p50["ort"]}
            md.append(f"| {model} | {b} | {p50['eager']:.2f} | {p50['torchscript']:.2f} | {p50['ort']:.2f} | "
                      f"{h_p50:.2f} | {bare_p50:.2f} | {h_p50 / bare_p50:.3f} | {p50['eager'] / p50['ort']:.2f}x |")
        payload["models"][model] = {"rows": rows, "results": res.model_dump(mode="json"),
                                    "load_avg_1min_before_after": [load_before, os.getloadavg()[0]]}
    dn = payload["models"].get("densenet121", {}).get("rows", {}).get(1)
    if dn:
        ok_overhead = all(abs(r["ort_over_bare"] - 1) <= 0.03 for m in payload["models"].values()
                          for r in m["rows"].values())
        md += ["", f"- Harness overhead target (ORT within 3% of the bare loop, every row): "
                   f"{'met' if ok_overhead else 'NOT met'}",
               f"- Speed-up target (ORT >= 2x eager, densenet121 batch 1): {dn['eager_over_ort']:.2f}x — "
               f"{'met' if dn['eager_over_ort'] >= 2 else 'NOT met'}"]
    j, m = write("cpu_spine", payload, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"written: {j} {m}")


if __name__ == "__main__":
    main()
