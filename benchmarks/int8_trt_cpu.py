"""INT8 Q/DQ for TensorRT, run on this CPU: why int8_trt's accuracy gate runs the Q/DQ graph as written.

    python benchmarks/int8_trt_cpu.py [--seeds 0,1,2]

Per seed: trains the digits CNN (scikit-learn's 8x8 digits, tests/digits.py), converts it with
static INT8 plus the TensorRT Q/DQ variant (``QuantConfig(trt_qdq=True)``, what ``convert --trt
--int8`` makes), and measures top-1 accuracy on the held-out split of
- ``opt`` (FP32),
- ``int8_static_minmax`` (ONNX Runtime's CPU layout: UINT8 activations, reduce_range where advised),
- ``int8_trt`` with ONNX Runtime's default graph optimizations (Q/DQ fused into integer kernels),
- ``int8_trt`` as written (graph optimizations off: each Q/DQ pair runs, then the FP32 op; the
  arithmetic TensorRT's INT8 kernels follow, with INT32 accumulation).
Writes benchmarks/results/int8_trt_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write


def accuracy(path: Path, x: np.ndarray, y: np.ndarray, as_written: bool) -> float:
    from runtimes.ort import ort_session

    sess = ort_session(path, simulate_qdq=as_written)
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 100]})[0] for i in range(0, len(x), 100)])
    return float((logits.argmax(1) == y).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()

    from calibration.cpu import cpu_features
    from convert.config import CalibConfig, ConvertConfig, ExportConfig, GateConfig, QuantConfig
    from convert.pipeline import run_convert
    from tests.digits import train_digits_model

    command = "python " + " ".join(sys.argv)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            digits = train_digits_model(Path(d) / "model", seed=seed)
            test = Path(d) / "test.npz"
            np.savez(test, input=digits.x_test, labels=digits.y_test)
            quant = QuantConfig(int8_static=True, trt_qdq=True, calib=CalibConfig(data=str(digits.calib_npz), size=200),
                                gate=GateConfig(eval_data=str(test)))
            cfg = ConvertConfig(export=ExportConfig(model=digits.factory, weights=str(digits.weights)),
                                out=Path(d) / "out", quant=quant)
            manifest, out = run_convert(cfg, log=lambda _m: None)
            files = {n: out / a.file.path for n, a in manifest.artifacts.items()}
            x, y = digits.x_test, digits.y_test
            rows.append({"seed": seed, "fp32": accuracy(files["opt"], x, y, False),
                         "int8_static_minmax": accuracy(files["int8_static_minmax"], x, y, False),
                         "int8_trt_fused": accuracy(files["int8_trt"], x, y, False),
                         "int8_trt_as_written": accuracy(files["int8_trt"], x, y, True), "samples": len(y)})
            print(rows[-1])
    mc = machine()
    cpu = cpu_features()
    lines = ["# INT8 Q/DQ for TensorRT, run by ONNX Runtime on this CPU", "",
             f"Command: `{command}`  ",
             f"Machine: {mc['cpu_model']}, {mc['cpu_count']} cores; CPU features: {cpu.summary}.  ",
             f"Model: the digits CNN (tests/digits.py), trained per seed; top-1 accuracy on the {rows[0]['samples']} "
             "held-out test images; calibration: 200 images of the calibration split, MinMax.", "",
             "| seed | FP32 (opt) | int8_static_minmax (ORT CPU layout) | int8_trt, ORT fused kernels | "
             "int8_trt as written (Q/DQ simulated) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {100 * r['fp32']:.1f}% | {100 * r['int8_static_minmax']:.1f}% | "
                     f"{100 * r['int8_trt_fused']:.1f}% | {100 * r['int8_trt_as_written']:.1f}% |")
    lines += ["", "int8_trt has full-range signed INT8 weights and zero-point-0 activations, as TensorRT requires. "
              "The 'fused' column is what ONNX Runtime's x86 integer kernels compute from it; on CPUs without VNNI "
              "they can saturate intermediate sums with full-range weights (the reason ONNX Runtime advises "
              "reduce_range there). The 'as written' column runs every Q/DQ pair and then the FP32 op, which is "
              "the arithmetic TensorRT's INT8 kernels follow (INT32 accumulation, no such saturation), so that is "
              "what int8_trt's accuracy gate uses.", ""]
    write("int8_trt_cpu", {"command": command, "machine": mc, "cpu_features": cpu.summary, "rows": rows},
          "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
