"""Sparsity / pruning benchmark (issue 3): FP32 vs 2:4 sparse vs channel-pruned, with ONNX Runtime on CPU.

    python benchmarks/run_prune.py [--models resnet50] [--prune 0.3] [--batch-sizes 1] [--iters 50]

Converts each model (random init, 224x224) with ``--sparsity 2:4 --prune-channels F``, then times the
three ONNX variants with the bench harness' ONNX Runtime runner on the same inputs, one call of each in
turn so that load from other processes falls on all three alike. Writes benchmarks/results/prune_cpu.{json,md}
with file size, parameters, MACs (from the manifest) and latency before/after, and the machine's load
average, since a shared CPU inflates and scatters the timings.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="resnet50")
    ap.add_argument("--prune", default="0.3")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench_prune"))
    args = ap.parse_args()

    from convert.sparsity import parse_prune_ratio
    from core.manifest import Manifest
    from runtimes.timing import interleaved_latency

    ratio = parse_prune_ratio(args.prune)
    pruned = f"pruned_{ratio:g}"
    batches = [int(b) for b in args.batch_sizes.split(",")]
    load_before = os.getloadavg()
    payload: dict = {"command": "python " + " ".join(sys.argv), "machine": machine(), "load_avg_before": load_before,
                     "models": {}}
    md = ["# Sparsity and channel pruning on CPU (ONNX Runtime)\n", f"Command: `{payload['command']}`  ",
          f"Machine: {payload['machine']['cpu_model']}, {payload['machine']['cpu_count']} cores, "
          f"{payload['machine']['ram_gb']} GiB; random-init weights, 224x224; the three variants are timed in turn "
          f"(one call each, ONNX Runtime intra-op spinning off, {args.iters} rounds after {args.warmup} warm-up calls), threads "
          f"{args.threads or 'ORT default'}; 1-min load average before: {load_before[0]:.2f}.\n",
          "| model | variant | file MB | params | GMACs | batch | ORT p50 ms | p90 ms | speed-up vs opt (p50) | "
          "top-1 agreement vs FP32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        folder = ensure_converted(model, Path(args.work) / f"{model}_p{ratio:g}",
                                  ["--sparsity", "2:4", "--prune-channels", str(ratio)])
        manifest = Manifest.load(folder)
        spec = manifest.iospec
        variants = ["opt", "sparse24", pruned]
        p = manifest.artifacts[pruned].metrics.pruning
        assert p is not None, f"{pruned} has no pruning statistics"
        facts = {"opt": (p.params_before, p.macs_before), "sparse24": (p.params_before, p.macs_before),
                 pruned: (p.params_after, p.macs_after)}
        rows = []
        for b in batches:
            stats = interleaved_latency(manifest, folder, [manifest.artifacts[v] for v in variants],
                                        spec.random_feed(b, seed=0), warmup=args.warmup, iters=args.iters,
                                        threads=args.threads)
            for v, lat in zip(variants, stats, strict=True):
                art = manifest.artifacts[v]
                params, macs = facts[v]
                change = art.metrics.accuracy_vs_fp32
                agree = change.top1_agreement if v != "opt" and change is not None else None
                row = {"variant": v, "batch": b, "size_bytes": art.file.size_bytes, "params": params, "macs": macs,
                       "p50_ms": lat.p50, "p90_ms": lat.p90, "speedup_p50": stats[0].p50 / lat.p50,
                       "top1_agreement": agree, "latency": lat.model_dump()}
                rows.append(row)
                md.append(f"| {model} | {v} | {art.file.size_bytes / 2**20:.1f} | {params / 1e6:.2f} M | "
                          f"{macs / 1e9:.2f} | {b} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                          f"{row['speedup_p50']:.2f}x | {'-' if agree is None else f'{agree:.3f}'} |")
        sp = manifest.artifacts["sparse24"].metrics.sparsity
        assert sp is not None, "sparse24 has no 2:4 check"
        payload["models"][model] = {"rows": rows, "sparsity": sp.model_dump(),
                                    "convert_latency": {v: manifest.artifacts[v].metrics.latency.model_dump()
                                                        for v in ("sparse24", pruned)
                                                        if manifest.artifacts[v].metrics.latency is not None}}
        md += ["", f"- {model} 2:4: {sp.fraction_groups_2of4:.4f} of groups satisfy the pattern in the ONNX "
                   f"file; {sp.fraction_weights_2of4:.4f} of all Conv/Linear weights are covered "
                   f"(not covered: {', '.join(sp.ineligible_weights) or 'none'})."]
    payload["load_avg_after"] = os.getloadavg()
    md += ["- 2:4 sparsity is not expected to be faster or smaller here: the shapes are unchanged and ONNX Runtime's "
           "CPU kernels are dense. Only TensorRT's sparse kernels on Ampere or newer GPUs use it.",
           "- Random-init weights: top-1 agreement (64 random inputs, from the manifest) only shows how far the "
           "outputs moved; "
           "no fine-tuning was done after pruning.",
           f"- 1-min load average after: {payload['load_avg_after'][0]:.2f} "
           "(this run counts for about 1; more means other processes shared the CPU)."]
    cores = payload["machine"]["cpu_count"] or 1
    if max(load_before[0], payload["load_avg_after"][0]) > cores:
        md.append(f"- **The CPU was shared** (load above its {cores} cores): absolute latencies are inflated and "
                  "scattered; only the speed-ups (variants timed in turn on the same inputs) are meaningful, and "
                  "differences within about 10% are noise.")
    j, m = write("prune_cpu", payload, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"written: {j} {m}")


if __name__ == "__main__":
    main()
