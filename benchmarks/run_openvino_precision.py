"""What OpenVINO's CPU plugin computes an FP32 model in, by default and with f32 pinned (the runner's setting).

    python benchmarks/run_openvino_precision.py [--n 1024] [--iters 40] [--rounds 5]

One n x n FP32 MatMul ONNX file, compiled twice (OpenVINO's default INFERENCE_PRECISION_HINT, and f32 as
``core.flops.openvino_config`` sets it), timed call by call alternately in interleaved rounds: GFLOP/s at the
p50 with its 95% interval, and the largest error against a float64 product relative to its largest entry. On a
CPU with AMX the default is bf16: an "fp32" row run that way is a bf16 one. Writes
benchmarks/results/openvino_precision_cpu.{json,md}; a few seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write


def main() -> None:
    import onnx
    import openvino as ov

    from core.flops import _matmul_model, openvino_config
    from core.metrics import LatencyStats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=40, help="timed calls per setting (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.n < 1 or args.rounds < 3 or args.iters < args.rounds:
        ap.error("need --n >= 1, --rounds >= 3 (an interval needs three) and --iters >= --rounds")
    n = args.n
    rng = np.random.default_rng(0)
    feed = {"A": rng.standard_normal((n, n)).astype(np.float32), "B": rng.standard_normal((n, n)).astype(np.float32)}
    exact = feed["A"].astype(np.float64) @ feed["B"].astype(np.float64)
    settings = {"default": {"PERFORMANCE_HINT": "LATENCY"}, "f32": openvino_config("LATENCY", None)}
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        onnx.save(_matmul_model(n), str(path))
        compiled = {k: core.compile_model(core.read_model(str(path)), "CPU", cfg) for k, cfg in settings.items()}
    requests = {k: c.create_infer_request() for k, c in compiled.items()}
    rounds: dict[str, list[list[float]]] = {k: [] for k in requests}
    for r in requests.values():
        r.infer(feed)  # warm-up
    per_round = max(1, args.iters // args.rounds)
    for _ in range(args.rounds):
        for k in requests:
            rounds[k].append([])
        for _ in range(per_round):
            for k, req in requests.items():  # alternate call by call: both see the same moment of the machine
                t0 = time.perf_counter()
                req.infer(feed)
                rounds[k][-1].append((time.perf_counter() - t0) * 1e3)
    rows: dict[str, dict[str, Any]] = {}
    for k, req in requests.items():
        req.infer(feed)
        got = np.array(req.get_output_tensor(0).data, dtype=np.float64)
        lat = LatencyStats.from_samples([x for r in rounds[k] for x in r], rounds[k])
        lo, hi = lat.p50_interval or (lat.p50, lat.p50)
        rows[k] = {"inference_precision": compiled[k].get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                   "p50_ms": lat.p50, "p50_interval_ms": [lo, hi], "gflops_at_p50": 2 * n**3 / lat.p50 / 1e6,
                   "gflops_interval": [2 * n**3 / hi / 1e6, 2 * n**3 / lo / 1e6],
                   "max_rel_error": float(np.abs(got - exact).max() / np.abs(exact).max())}
    m = machine()
    md = [f"# OpenVINO's CPU compute precision for an FP32 model\n\nCommand: `python benchmarks/run_openvino_precision.py "
          f"--n {n} --iters {args.iters} --rounds {args.rounds}`\n\nCPU: {m['cpu_model']}, {m['cpu_count']} cores; "
          f"OpenVINO {ov.__version__}; {n}^3 FP32 MatMul, {per_round * args.rounds} calls each, alternating, in "
          f"{args.rounds} rounds; p50 with the 95% bootstrap interval of the per-round p50s.\n",
          "| setting | computes in | p50 ms | GFLOP/s at p50 [95%] | max error / max entry |", "|---|---|---|---|---|"]
    md += [f"| {k} | {r['inference_precision']} | {r['p50_ms']:.2f} | {r['gflops_at_p50']:.0f} "
           f"[{r['gflops_interval'][0]:.0f}-{r['gflops_interval'][1]:.0f}] | {r['max_rel_error']:.1e} |"
           for k, r in rows.items()]
    j, p = write("openvino_precision_cpu", {"machine": m, "openvino": ov.__version__, "n": n, "settings": rows},
                 "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {j} and {p}")


if __name__ == "__main__":
    main()
