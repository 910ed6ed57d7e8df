"""Spine benchmark (issue 2): eager vs TorchScript vs ONNX Runtime on this CPU, plus a bare
``session.run`` loop on the same inputs to measure the harness's own overhead.

    python benchmarks/run_cpu.py [--models densenet121,resnet50] [--batch-sizes 1,8] [--iters 50]

Writes benchmarks/results/cpu_spine.{json,md}. Targets: harness ORT p50 within 3% of the bare loop;
ORT FP32 at least 2x faster than eager for densenet121 at batch 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write


def bare_ort_loop(model_path: Path, feed: dict[str, np.ndarray], warmup: int, iters: int) -> list[float]:
    """The same thing the ORT runner does, with nothing around it: session.run in a loop."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feed)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="densenet121,resnet50")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args()

    from core.manifest import Manifest
    from runtimes.harness import BenchConfig, InputPool, build_pool, run_bench

    batches = [int(b) for b in args.batch_sizes.split(",")]
    payload: dict = {"command": "python " + " ".join(sys.argv), "machine": machine(), "models": {}}
    md = ["# CPU spine benchmark\n", f"Command: `{payload['command']}`  ",
          f"Machine: {payload['machine']['cpu_model']}, {payload['machine']['cpu_count']} cores, "
          f"{payload['machine']['ram_gb']} GiB; random-init weights, 224x224, warm-up {args.warmup}, "
          f"{args.iters} timed iterations.\n",
          "| model | batch | eager p50 ms | torchscript p50 ms | ORT p50 ms | bare ORT p50 ms | "
          "ORT / bare (p50) | eager / ORT (speed-up) |", "|---|---|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        folder = ensure_converted(model, Path(args.work) / model)
        cfg = BenchConfig(artifact_dir=folder, backends=["eager", "torchscript", "ort"], variants=["opt"],
                          batch_sizes=batches, warmup=args.warmup, iters=args.iters, accuracy_samples=8)
        res = run_bench(cfg, log=print)
        manifest = Manifest.load(folder)
        pool: InputPool = build_pool(manifest, cfg, max(8, max(batches)), print)
        rows = {}
        for b in batches:
            p50 = {r.backend: r.latency_ms.p50 for r in res.records if r.batch_size == b}
            # Same feed as the harness used (pool.feed(0, b)), measured right after it.
            bare = bare_ort_loop(folder / manifest.artifacts["opt"].file.path, pool.feed(0, b), args.warmup,
                                 args.iters)
            bare_p50 = float(np.percentile(bare, 50))
            rows[b] = {**{f"{k}_p50_ms": v for k, v in p50.items()}, "bare_ort_p50_ms": bare_p50,
                       "ort_over_bare": p50["ort"] / bare_p50, "eager_over_ort": p50["eager"] / p50["ort"]}
            md.append(f"| {model} | {b} | {p50['eager']:.2f} | {p50['torchscript']:.2f} | {p50['ort']:.2f} | "
                      f"{bare_p50:.2f} | {p50['ort'] / bare_p50:.3f} | {p50['eager'] / p50['ort']:.2f}x |")
        payload["models"][model] = {"rows": rows, "results": res.model_dump(mode="json")}
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
