"""Static INT8 layouts on this CPU: QDQ vs QOperator, per-channel vs per-tensor weights, u8 vs s8 activations.

    python benchmarks/run_int8_layouts.py [--models densenet121,resnet50] [--batch-sizes 1,8] [--iters 20]

Why (issue 17): on one Xeon with VNNI, ORT static INT8 was faster than FP32 at batch 1 and slower at batch 8.
For each model (random init; calibrated with Entropy on crops of the built-in photos, held-out crops of other
photos, as in run_quant.py) it runs ``cli.py convert MODEL --int8 --int8-layouts ...``, which writes one static
INT8 variant per layout from the same ranges, then times FP32 (``opt``) and every layout with the bench
harness' ONNX Runtime runner *interleaved* (one call of each in turn, spinning off) at each batch size, and
records p50 with its 95% interval, the ratio to FP32, held-out agreement, and what ONNX Runtime ran: the op
types of the graph after its optimizations (saved with ``optimized_model_filepath``), e.g. how many
QLinearConv and how many QuantizeLinear/DequantizeLinear transitions remain around FP32 islands.
Writes benchmarks/results/int8_layouts_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write
from benchmarks.run_quant import split_photo_folders

LAYOUTS = ["qdq_pt_u8", "qdq_pc_s8", "qop_pc_u8", "qop_pt_u8"]  # the main variant is qdq_pc_u8
SHOWN_OPS = ("QLinearConv", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear", "QLinearConcat",
             "QLinearAdd", "QLinearGlobalAveragePool", "Conv", "FusedConv", "BatchNormalization")


def optimized_ops(path: Path) -> dict[str, int]:
    """Op types of the graph ONNX Runtime runs after its CPU optimizations (all levels)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # the warning that NCHWc layouts are CPU-specific: known, and why we look
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        return dict(collections.Counter(n.op_type for n in graph.node))


def _row(model: str, variant: str, art: Any, batch: int, t: Any, base: float, ops: dict[str, int]) -> dict[str, Any]:
    lo, hi = t.p50_interval or (t.p50, t.p50)
    acc = art.metrics.accuracy
    return {"model": model, "variant": variant, "layout": getattr(art.params, "layout", None) or "fp32",
            "batch": batch, "p50_ms": round(t.p50, 2), "p50_interval_ms": [round(lo, 2), round(hi, 2)],
            "p50_vs_fp32": round(t.p50 / base, 2), "samples_per_s": round(batch * 1000 / t.p50, 2),
            "held_out_top1_agreement": None if acc is None else acc.top1_agreement,
            "optimized_ops": {k: v for k, v in ops.items() if k in SHOWN_OPS}}


def _markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = ["# Static INT8 layouts vs FP32 on CPU (ONNX Runtime)", "", f"Command: `{payload['command']}`", "",
             f"CPU: {m['cpu_model']} ({payload['cpu_summary']}), {m['cpu_count']} cores; ONNX Runtime "
             f"{payload['onnxruntime']}; random init, 224x224, Entropy calibration on 100 crops, held-out agreement "
             f"on 32 crops of other photos. Variants timed interleaved, {payload['iters']} calls each per batch size, "
             f"spinning off. 1-min load average before {payload['load_before']:.2f}, after "
             f"{payload['load_after']:.2f}.", "",
             "Layout: FORMAT_SCALES_ACTIVATIONS (qdq/qop = QDQ or QOperator; pc/pt = per-channel or per-tensor "
             "weight scales; u8/s8 = activations). Ops: the graph ONNX Runtime runs after its optimizations "
             "(QLinearConv / QuantizeLinear / DequantizeLinear counts).", "",
             "| model | batch | layout | p50 ms | 95% interval | vs FP32 | samples/s | held-out agreement | "
             "ops after ORT optimization |", "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r["optimized_ops"].items()))
        agree = r["held_out_top1_agreement"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['layout']} | {r['p50_ms']} | "
                     f"{r['p50_interval_ms'][0]}-{r['p50_interval_ms'][1]} | {r['p50_vs_fp32']}x | "
                     f"{r['samples_per_s']} | {'' if agree is None else f'{100 * agree:.0f}%'} | {ops} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="densenet121,resnet50")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench_int8_layouts"))
    args = ap.parse_args()
    import onnxruntime

    from calibration.cpu import cpu_features
    from core.manifest import Manifest
    from runtimes.timing import interleaved_latency

    work = Path(args.work)
    calib, held = split_photo_folders(ROOT / "artifacts" / "bench_quant_photos", 100, 32)
    payload: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": machine(),
                               "cpu_summary": cpu_features().summary, "onnxruntime": onnxruntime.__version__,
                               "iters": args.iters, "rows": []}
    converted = {m: ensure_converted(m, work / m, [
        "--int8", "--calib", str(calib), "--calib-size", "100", "--calib-method", "entropy", "--eval-data", str(held),
        "--eval-size", "32", "--int8-layouts", ",".join(LAYOUTS)]) for m in args.models.split(",")}
    payload["load_before"] = os.getloadavg()[0]
    for model, folder in converted.items():
        manifest = Manifest.load(folder)
        names = ["opt", "int8_static_entropy", *(f"int8_static_entropy_{lay}" for lay in LAYOUTS)]
        arts = [manifest.artifacts[n] for n in names]
        ops = {n: optimized_ops(folder / a.file.path) for n, a in zip(names, arts, strict=True)}
        for b in (int(x) for x in args.batch_sizes.split(",")):
            print(f"{model}: timing {len(names)} variants interleaved at batch {b}", flush=True)
            stats = interleaved_latency(manifest, folder, arts, manifest.iospec.random_feed(b, seed=0), warmup=2,
                                        iters=args.iters)
            payload["rows"] += [_row(model, n, a, b, t, stats[0].p50, ops[n])
                                for n, a, t in zip(names, arts, stats, strict=True)]
    payload["load_after"] = os.getloadavg()[0]
    j, m = write("int8_layouts_cpu", payload, _markdown(payload))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
