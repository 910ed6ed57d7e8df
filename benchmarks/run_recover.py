"""Recovery by distillation (issue 14) on the digits CNN, with ONNX Runtime on CPU.

    python benchmarks/run_recover.py [--epochs 20] [--iters 600] [--rounds 20]

Trains the digits CNN of the tests (scikit-learn's bundled digits: 1197 train / 200 calibration / 400 test),
then one ``convert --sparsity 2:4 --prune-channels 0.3 --recover distill --distill-into <student>`` with
the train split as --train-data and the test split as --eval-data (neither calibration nor training saw
it). Reports the test accuracy of FP32, of each variant before and after recovery, and of the distilled
student; file sizes; and batch-1 ONNX Runtime latency of every variant against FP32, timed in interleaved
rounds with rotated order (:func:`runtimes.timing.interleaved`), with the 95% interval of the median of
the per-round p50s. Targets: each recovered variant within 1 point of FP32; pruned+recovered >= 1.3x
faster than FP32 at batch 1. Writes benchmarks/results/recover_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import ROOT, machine, write

STUDENT = ROOT / "tests" / "fixtures" / "digits_student.py"
SPEED_MISS = ("- Why the speed target is missed: the digits CNN (28k parameters, 16x16 input) runs in well under "
              "0.1 ms per call at batch 1, so ONNX Runtime's fixed per-call cost dominates and removing 30% of the "
              "channels cannot show; the intervals overlap, so no variant but the much "
              "smaller distilled student is faster here. On a model where compute dominates, pruning 0.3 is "
              "1.46x faster (resnet50, benchmarks/results/prune_cpu.md); recovery does not change a pruned "
              "model's shapes, so its speed is that of the unrecovered one.")
VARIANTS = ["opt", "pruned_0.3", "pruned_0.3_recovered", "sparse24", "sparse24_recovered", "distilled"]


def _convert(work: Path, epochs: int) -> tuple[Any, Path, Any]:
    from convert.config import Budget, ConvertConfig, DistillConfig, ExportConfig, SparsityConfig, TrainConfig
    from convert.pipeline import run_convert
    from core.errors import AccuracyGateError
    from core.manifest import Manifest
    from tests.digits import train_digits_model

    d = train_digits_model(work / "digits")
    np.savez(work / "train.npz", input=d.x_train, labels=d.y_train)
    np.savez(work / "test.npz", input=d.x_test, labels=d.y_test)
    train = TrainConfig(data=str(work / "train.npz"), epochs=epochs, lr=2e-3, patience=5, threads=1)
    cfg = ConvertConfig(export=ExportConfig(model=d.factory, weights=str(d.weights)), out=work / "out",
                        sparsity=SparsityConfig(pattern="2:4", prune_channels=0.3, eval_data=str(work / "test.npz"),
                                                latency_iters=5, budget=Budget(), recover=train),
                        distill=DistillConfig(student=f"{STUDENT}:build",
                                              train=train.model_copy(update={"epochs": 2 * epochs, "lr": 1e-2})))
    t0 = time.perf_counter()
    gate_error = None
    try:
        run_convert(cfg, log=print)
    except AccuracyGateError as exc:
        gate_error = str(exc)
    print(f"convert took {time.perf_counter() - t0:.1f} s; gate: {gate_error or 'every gate passed'}")
    return Manifest.load(work / "out"), work / "out", (d, gate_error)


def _latency(manifest: Any, out: Path, feed: dict[str, np.ndarray], iters: int, rounds: int) -> dict[str, Any]:
    from core.metrics import LatencyStats
    from runtimes.base import RunnerOptions
    from runtimes.ort import OrtRunner
    from runtimes.timing import interleaved

    opts = RunnerOptions(device="cpu", threads=None, ort_spinning=False)
    with contextlib.ExitStack() as stack:
        runners = [stack.enter_context(OrtRunner(manifest, out, manifest.artifacts[v], opts)) for v in VARIANTS]
        prepared = [r.prepare(feed) for r in runners]
        timed = interleaved(runners, prepared, warmup=20, iters=iters, rounds=rounds)
    return {v: LatencyStats.from_samples(t.samples, t.rounds) for v, t in zip(VARIANTS, timed, strict=True)}


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 100]})[0] for i in range(0, len(x), 100)])
    return float((logits.argmax(1) == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    from core.metrics import clearly_slower

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        manifest, out, (d, gate_error) = _convert(Path(tmp), args.epochs)
        lat = _latency(manifest, out, {"input": d.x_test[:1]}, args.iters, args.rounds)
        rows = {}
        for v in VARIANTS:
            a = manifest.artifacts[v]
            t = getattr(a.params, "training", None)
            rows[v] = {"test_accuracy": _accuracy(out / a.file.path, d.x_test, d.y_test), "status": a.status,
                       "gate": a.metrics.gate.model_dump() if a.metrics.gate else None,
                       "file_bytes": a.file.size_bytes, "latency_ms": lat[v].model_dump(),
                       "speedup_p50": lat["opt"].p50 / lat[v].p50,
                       "clearly_faster": clearly_slower(lat["opt"], lat[v]),
                       "epochs_run": t.epochs_run if t else None, "best_epoch": t.best_epoch if t else None,
                       "training_seconds": t.seconds if t else None}
    fp32 = rows["opt"]["test_accuracy"]
    targets = {f"{v} within 1 point of FP32": fp32 - rows[v]["test_accuracy"] <= 0.01
               for v in ("pruned_0.3_recovered", "sparse24_recovered")}
    targets["pruned_0.3_recovered >= 1.3x faster than FP32 (p50, batch 1)"] = \
        rows["pruned_0.3_recovered"]["speedup_p50"] >= 1.3
    payload = {"command": "python " + " ".join(sys.argv), "machine": machine(), "load_avg_before": load_before,
               "load_avg_after": os.getloadavg(), "gate_error": gate_error, "variants": rows, "targets": targets,
               "params": {"student": manifest.artifacts["distilled"].params.model_dump(include={"params_student",
                                                                                                 "params_teacher"})}}
    write("recover_cpu", payload, _markdown(payload, args))


def _markdown(p: dict[str, Any], args: argparse.Namespace) -> str:
    m = p["machine"]
    md = ["# Recovery by distillation on the digits CNN (ONNX Runtime, CPU)\n", f"Command: `{p['command']}`  ",
          f"Machine: {m['cpu_model']}, {m['cpu_count']} cores; 1-min load average before {p['load_avg_before'][0]:.2f}, "
          f"after {p['load_avg_after'][0]:.2f} (a shared CPU inflates and scatters timings).  ",
          "Data: scikit-learn digits at 16x16, 1197 train (--train-data; 15% of it held out for early stopping), "
          "400 test (--eval-data and the accuracy below; never trained or calibrated on).  ",
          f"Latency: batch 1, {args.iters} calls each in {args.rounds} interleaved rounds (rotated order), "
          "ORT intra-op spinning off; [lo, hi] = 95% interval of the median of the per-round p50s.\n",
          "| variant | test accuracy | vs FP32 (points) | gate | file KB | p50 ms [95% interval] | speed-up (p50) "
          "| epochs (best) |", "|---|---|---|---|---|---|---|---|"]
    fp32 = p["variants"]["opt"]["test_accuracy"]
    for v, r in p["variants"].items():
        lat = r["latency_ms"]
        lo, hi = lat["p50_interval"] or (float("nan"), float("nan"))
        gate = "-" if r["gate"] is None else ("pass" if r["gate"]["passed"] else "FAIL")
        ep = "-" if r["epochs_run"] is None else f"{r['epochs_run']} ({r['best_epoch']})"
        md.append(f"| {v} | {100 * r['test_accuracy']:.2f}% | {100 * (r['test_accuracy'] - fp32):+.2f} | {gate} | "
                  f"{r['file_bytes'] / 1024:.1f} | {lat['p50']:.4f} [{lo:.4f}, {hi:.4f}] | {r['speedup_p50']:.2f}x | "
                  f"{ep} |")
    md.append("")
    md += [f"- target {k}: {'met' if ok else 'MISSED'}" for k, ok in p["targets"].items()]
    ps = p["params"]["student"]
    md.append(f"- distilled student: {ps['params_student']:,} parameters vs {ps['params_teacher']:,} for the teacher.")
    if not p["targets"]["pruned_0.3_recovered >= 1.3x faster than FP32 (p50, batch 1)"]:
        md.append(SPEED_MISS)
    if p["gate_error"]:
        md.append(f"- convert's gate verdict: {p['gate_error']}")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
