"""Do the numbers hold? Two back-to-back `bench` runs of the same artifacts, compared row by row.

    python benchmarks/run_stability.py [--models resnet50,densenet121] [--batch-sizes 1,8] [--iters 60] [--rounds 6]

Each model is converted once with ``--int8 --calib imagenet_subset`` (random-init weights; the convert's wall
time is recorded when this run made it), then benchmarked twice in a row with the harness as `bench` runs it
(eager + ONNX Runtime fp32, opt and static INT8; interleaved rounds, order rotated). Targets (issue 12): every
row's p50 within 5% between the two runs, and fp32 vs opt within 3% in each run (they run the same compute
once ONNX Runtime has loaded them). Each p50 is recorded with the 95% interval of its rounds. Writes
benchmarks/results/stability_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine, write


def _convert(model: str, out: Path) -> float | None:
    """Convert with static INT8 unless ``out`` holds a manifest; the wall time in seconds, None if reused."""
    if (out / "manifest.json").is_file():
        return None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "convert", model, "--int8", "--calib", "imagenet_subset",
                    "--out", str(out)], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _rows(results: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for r in results.records:
        key = f"{r.backend}:{r.variant} batch {r.batch_size}"
        out[key] = {"p50_ms": r.latency_ms.p50, "ci95_ms": list(r.latency_ms.p50_interval or []),
                    "round_p50s_ms": r.latency_ms.round_p50s}
    return out


def _verdicts(model: str, runs: list[dict[str, dict[str, Any]]]) -> list[str]:
    a, b = runs
    lines = []
    worst = max(abs(b[k]["p50_ms"] / a[k]["p50_ms"] - 1) for k in a if k in b)
    lines.append(f"{model}: largest p50 change between the two runs {100 * worst:.1f}% (target <= 5%): "
                 + ("met" if worst <= 0.05 else "MISSED"))
    for i, run in enumerate(runs, 1):
        for key in sorted(k for k in run if k.startswith("ort:fp32 ")):
            opt = run.get(key.replace("ort:fp32 ", "ort:opt "))
            if opt is None:
                continue
            d = opt["p50_ms"] / run[key]["p50_ms"] - 1
            lines.append(f"{model} run {i} {key.split(' ', 1)[1]}: opt vs fp32 {100 * d:+.1f}% (target within 3%): "
                         + ("met" if abs(d) <= 0.03 else "MISSED"))
    return lines


def _markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = ["# Two back-to-back bench runs: do the numbers hold?", "", f"Command: `{payload['command']}`", "",
             f"CPU: {m['cpu_model']} ({m.get('cpu_count')} cores visible); iterations {payload['iters']} in "
             f"{payload['rounds']} interleaved rounds per point, warm-up {payload['warmup']}, ONNX Runtime thread "
             "spinning on (its default). p50 with the 95% interval of the median of the per-round p50s.", ""]
    for model, res in payload["models"].items():
        conv = res["convert_s"]
        lines += [f"## {model}", "", "convert --int8 --calib imagenet_subset: "
                  + (f"{conv:.0f} s" if conv is not None else "reused from an earlier run (not timed)")
                  + f"; load average before the runs {res['load_avg_before']}", "",
                  "| row | run 1 p50 ms [95%] | run 2 p50 ms [95%] | change |", "|---|---|---|---|"]
        r1, r2 = res["runs"]
        for key in r1:
            if key in r2:
                lo1, hi1 = r1[key]["ci95_ms"] or (float("nan"), float("nan"))
                lo2, hi2 = r2[key]["ci95_ms"] or (float("nan"), float("nan"))
                lines.append(f"| {key} | {r1[key]['p50_ms']:.2f} [{lo1:.2f}-{hi1:.2f}] | {r2[key]['p50_ms']:.2f} "
                             f"[{lo2:.2f}-{hi2:.2f}] | {100 * (r2[key]['p50_ms'] / r1[key]['p50_ms'] - 1):+.1f}% |")
        lines += [""]
    lines += ["## Targets", "", *[f"- {v}" for v in payload["verdicts"]], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="resnet50,densenet121")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench_stability"))
    args = ap.parse_args()
    from runtimes.harness import BenchConfig, run_bench

    payload: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": machine(), "iters": args.iters,
                               "rounds": args.rounds, "warmup": args.warmup, "models": {}, "verdicts": []}
    for model in args.models.split(","):
        folder = Path(args.work) / model
        convert_s = _convert(model, folder)
        cfg = BenchConfig(artifact_dir=folder, backends=["eager", "ort"],
                          batch_sizes=[int(b) for b in args.batch_sizes.split(",")], warmup=args.warmup,
                          iters=args.iters, rounds=args.rounds, accuracy_samples=8)
        load = os.getloadavg()
        runs = [_rows(run_bench(cfg, log=print)) for _ in range(2)]
        payload["models"][model] = {"convert_s": convert_s, "load_avg_before": load, "runs": runs}
        payload["verdicts"] += _verdicts(model, runs)
    j, m = write("stability_cpu", payload, _markdown(payload))
    print("\n".join(payload["verdicts"]))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
