"""Does OpenVINO's own post-training INT8 (NNCF, ``int8_nncf``) beat the ONNX Runtime Q/DQ file on OpenVINO?

    python benchmarks/run_nncf_int8.py [--models densenet121,resnet50] [--batch-sizes 1,8] [--rounds 5]
                                       [--iters 30] [--tool-seconds 10] [--quick]

Each model (torchvision, random init) is converted as the user does, ``cli.py convert MODEL --int8 --int8-nncf
--calib imagenet_subset``: the FP32 file (``opt``), ONNX Runtime's static Q/DQ INT8 (``int8_static_minmax``) and
NNCF's INT8 IR (``int8_nncf``), both calibrated on the same calibration part of the data. Beside them the script
makes NNCF's ONNX-backend form (``nncf.quantize`` on the ``onnx.ModelProto``, a Q/DQ ONNX file, same calibration
data), the form convert/int8_nncf.py did not pick, so the choice is measured too (``nncf_onnx``, not a variant).

Every file is compiled by OpenVINO for the CPU as the ``openvino`` runner compiles it (``-hint LATENCY``, f32
compute for what is not quantized: ``core.flops.openvino_config``) and timed call by call, the files alternating in
interleaved rounds (order rotated each round): p50 with the 95% interval of the per-round p50s. Then OpenVINO's own
``benchmark_app`` on the same files and settings (``-hint latency -api sync -load_config``): its median. Accuracy is
each variant's held-out gate from the manifest (cosine to FP32 for random init). The CPU model and its ISA are
recorded. Writes benchmarks/results/nncf_int8_cpu.{json,md}. ``--quick``: the tiny test CNN, batch 1, a few calls:
a smoke test of the script, not a measurement (writes nncf_int8_cpu_quick.{json,md}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write

TINY = ROOT / "tests" / "fixtures" / "tiny_cnn.py"
#: the files timed, by row name (the manifest's variant, or the script's own NNCF ONNX-backend file)
ROWS = ("fp32", "int8_static_minmax", "int8_nncf", "nncf_onnx")


def _convert(model: str, work: Path, quick: bool) -> tuple[Path, list[str]]:
    calib = ["--calib", "synthetic", "--calib-size", "16", "--eval-size", "8"] if quick else \
        ["--calib", "imagenet_subset"]
    flags = ["--int8", "--int8-nncf", *calib]
    key = hashlib.sha256(" ".join([model, *flags]).encode()).hexdigest()[:8]
    return ensure_converted(model, work / f"{Path(model.split(':')[0]).stem}-{key}", flags), flags


def _nncf_onnx(folder: Path, flags: list[str], out: Path) -> dict[str, Any]:
    """NNCF's ONNX backend on the FP32 file the variants derive from, calibrated on the same calibration part."""
    import nncf
    import onnx

    from convert.calibrate import open_quant_data
    from convert.flags import ConvertFlags
    from convert.ovir import quiet as _quiet
    from core.manifest import Manifest

    man = Manifest.load(folder)
    qcfg = ConvertFlags(model="x", int8=True, int8_nncf=True, **_flag_values(flags)).to_config().quant
    assert qcfg is not None
    data = open_quant_data(qcfg, man.iospec, man.source.preprocessing)
    assert data.calib is not None
    feeds = [dict(b) for b in data.calib.iter_batches(1)]
    src = folder / man.artifacts[man.best_fp32()].file.path
    t0 = time.perf_counter()
    with _quiet():
        q = nncf.quantize(onnx.load(str(src)), nncf.Dataset(feeds), preset=nncf.QuantizationPreset.PERFORMANCE,
                          target_device=nncf.TargetDevice.CPU, subset_size=len(feeds))
    onnx.save(q, str(out))
    return {"file": str(out), "seconds": round(time.perf_counter() - t0, 1), "calibration_samples": len(feeds),
            "from": man.best_fp32()}


def _flag_values(flags: list[str]) -> dict[str, Any]:
    """``--calib X --calib-size 16`` -> {"calib": "X", "calib_size": "16"} (the value flags only)."""
    out: dict[str, Any] = {}
    for i, f in enumerate(flags):
        if f.startswith("--") and i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            out[f[2:].replace("-", "_")] = flags[i + 1]
    return out


def _files(folder: Path, nncf_onnx: Path) -> dict[str, Path]:
    from core.manifest import Manifest

    man = Manifest.load(folder)
    names = {"fp32": man.best_fp32(), "int8_static_minmax": "int8_static_minmax", "int8_nncf": "int8_nncf"}
    files = {row: folder / man.artifacts[name].file.path for row, name in names.items() if name in man.artifacts}
    return files | {"nncf_onnx": nncf_onnx}


def _interleaved(files: dict[str, Path], feed: dict[str, np.ndarray], rounds: int, iters: int) -> dict[str, Any]:
    """Each file compiled as the openvino runner compiles it, timed call by call in interleaved rounds."""
    import openvino as ov

    from core.flops import openvino_config
    from core.metrics import LatencyStats

    core, cfg = ov.Core(), openvino_config("LATENCY", None, "fp32")
    reqs = {k: core.compile_model(core.read_model(str(p)), "CPU", cfg).create_infer_request() for k, p in files.items()}
    for r in reqs.values():
        for _ in range(3):
            r.infer(feed)
    samples: dict[str, list[list[float]]] = {k: [] for k in reqs}
    per_round = max(1, iters // rounds)
    for i in range(rounds):
        order = list(reqs)[i % len(reqs):] + list(reqs)[:i % len(reqs)]
        for k in order:
            samples[k].append([])
            for _ in range(per_round):
                t0 = time.perf_counter()
                reqs[k].infer(feed)
                samples[k][-1].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, rs in samples.items():
        lat = LatencyStats.from_samples([x for r in rs for x in r], rs)
        lo, hi = lat.p50_interval or (lat.p50, lat.p50)
        out[k] = {"p50_ms": round(lat.p50, 3), "p50_interval_ms": [round(lo, 3), round(hi, 3)],
                  "calls": per_round * rounds}
    return out


def _benchmark_app(path: Path, shape: str, seconds: float) -> dict[str, Any]:
    """OpenVINO's ``benchmark_app`` on ``path`` with the runner's settings: its median latency."""
    from core.flops import openvino_config

    exe = Path(sys.executable).parent / "benchmark_app"
    config = openvino_config("LATENCY", None, "fp32")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"CPU": {k: str(v) for k, v in config.items()}}, f)
    cmd = [str(exe), "-m", str(path), "-d", "CPU", "-hint", "latency", "-api", "sync", "-data_shape", shape,
           "-t", f"{seconds:g}", "-load_config", f.name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    finally:
        Path(f.name).unlink()
    out = proc.stdout + proc.stderr
    median = re.search(r"Median:\s+([\d.]+)\s*(ms|us)", out)  # sub-ms medians are printed in us
    if proc.returncode != 0 or median is None:
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"}
    count = re.search(r"Count:\s+(\d+)", out)
    return {"median_ms": float(median.group(1)) / (1000.0 if median.group(2) == "us" else 1.0), "calls": int(count.group(1)) if count else None,
            "command": " ".join([*cmd[:-2], "-load_config", json.dumps(config)])}


def _accuracy(folder: Path) -> dict[str, Any]:
    from core.manifest import Manifest

    man = Manifest.load(folder)
    out = {}
    for name in ("int8_static_minmax", "int8_nncf"):
        if (a := man.artifacts.get(name)) is not None and a.metrics.gate is not None:
            out[name] = {"summary": a.metrics.summary, "cosine": a.metrics.gate.cosine, "passed": a.metrics.gate.passed}
    return out | {"failed_variants": [f"{f.name}: {f.reason}" for f in man.failed_variants]}


def _fmt(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    lo, hi = row["p50_interval_ms"]
    return f"{row['p50_ms']:.2f} [{lo:.2f}-{hi:.2f}]"


def _tool(row: dict[str, Any]) -> str:
    return f"{row['median_ms']:.3f}" if "median_ms" in row else str(row.get("error", "-"))


def main() -> None:
    import openvino as ov

    from calibration.cpu import cpu_features
    from core.manifest import Manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="densenet121,resnet50")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30, help="timed calls per file and batch (split over the rounds)")
    ap.add_argument("--tool-seconds", type=float, default=10.0, help="benchmark_app's -t per file and batch")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "nncf_int8_bench")
    ap.add_argument("--quick", action="store_true", help="smoke test: the tiny test CNN, batch 1, a few calls")
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch_sizes, args.rounds, args.iters, args.tool_seconds = f"{TINY}:build", "1", 3, 3, 1.0
    if args.rounds < 3 or args.iters < args.rounds:
        ap.error("need --rounds >= 3 (an interval needs three) and --iters >= --rounds")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    feats = cpu_features()
    entries = []
    for model in args.models.split(","):
        folder, flags = _convert(model, args.work, args.quick)
        nncf_onnx = folder.parent / f"{folder.name}.nncf_onnx.onnx"
        made = _nncf_onnx(folder, flags, nncf_onnx)
        files = _files(folder, nncf_onnx)
        spec = Manifest.load(folder).iospec
        name = spec.input_names[0]
        entry: dict[str, Any] = {"model": model, "artifact_dir": str(folder),
                                 "convert": f"python cli.py convert {model} {' '.join(flags)}",
                                 "nncf_onnx": made, "accuracy": _accuracy(folder), "batches": {}}
        for b in batches:
            feed = spec.random_feed(b, seed=0)
            shape = f"{name}{list(feed[name].shape)}".replace(" ", "")
            timed = _interleaved(files, feed, args.rounds, args.iters)
            tool = {k: _benchmark_app(p, shape, args.tool_seconds) for k, p in files.items()}
            entry["batches"][str(b)] = {"interleaved": timed, "benchmark_app": tool}
            print(f"{model} batch {b}: " + ", ".join(f"{k} {_fmt(timed.get(k))} ms" for k in files))
        entries.append(entry)
    m = machine() | {"cpu_isa": feats.isa, "cpu_summary": feats.summary}
    cmd = "python benchmarks/run_nncf_int8.py" + (" --quick" if args.quick else
                                                  f" --models {args.models} --batch-sizes {args.batch_sizes} --rounds "
                                                  f"{args.rounds} --iters {args.iters} --tool-seconds "
                                                  f"{args.tool_seconds:g}")
    md = [f"# NNCF INT8 vs ONNX Runtime Q/DQ INT8 on OpenVINO{' (smoke test, not a measurement)' if args.quick else ''}",
          "", f"Command: `{cmd}`", "",
          f"CPU: {m['cpu_model']} ({feats.isa}), {m.get('cpu_count')} cores; OpenVINO {ov.__version__}. "
          "Each file compiled as the openvino runner does (LATENCY, f32 compute where not quantized), timed call by "
          f"call in {args.rounds} interleaved rounds (order rotated): p50 ms [95% interval of the per-round p50s]; "
          f"benchmark_app: its median over -t {args.tool_seconds:g} s, same settings.", "",
          "| model | batch | file | interleaved p50 ms [95%] | benchmark_app median ms | vs fp32 |", "|---|---|---|---|---|---|"]
    for e in entries:
        for b, res in e["batches"].items():
            base = res["interleaved"].get("fp32", {}).get("p50_ms")
            for k in ROWS:
                row, tool = res["interleaved"].get(k), res["benchmark_app"].get(k, {})
                ratio = f"{base / row['p50_ms']:.2f}x" if row and base else "-"
                md.append(f"| {Path(e['model']).name} | {b} | {k} | {_fmt(row)} | "
                          f"{_tool(tool)} | {ratio} |")
        md += ["", f"{Path(e['model']).name}: `{e['convert']}`; nncf_onnx (NNCF's ONNX backend, not a variant) made "
                   f"in {e['nncf_onnx']['seconds']} s on {e['nncf_onnx']['calibration_samples']} calibration samples."]
        md += [f"- {k}: {v['summary']}" for k, v in e["accuracy"].items() if isinstance(v, dict)]
        md += [f"- not made: {f}" for f in e["accuracy"]["failed_variants"]]
        md.append("")
    name = "nncf_int8_cpu_quick" if args.quick else "nncf_int8_cpu"
    j, p = write(name, {"machine": m, "openvino": ov.__version__, "command": cmd, "models": entries},
                 "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {j} and {p}")


if __name__ == "__main__":
    main()
