"""vit_b_16's accuracy drops with the seeded head the toolkit now gives a random-init ViT (issue 28).

    python benchmarks/run_vit_accuracy.py [--backends ort,openvino] [--samples 32] [--reduce-range auto,off]
        [--work artifacts/vit_accuracy]

benchmarks/results/deploy_cpu.* recorded a drop of exactly 0.000 for every vit_b_16 variant: torchvision
zero-initialises the ViT head, so the random-init model output 0 for every input and each check compared zeros
with zeros. This script does not re-time anything (run_deploy.py does, in an hour); it measures the drops alone,
as run_deploy.py gets them:

1. ``convert vit_b_16`` with run_deploy.py's flags for image models (``--int8 --calib imagenet_subset
   --int8-layouts qop_pc_u8``), through cli.py, into a folder of its own (never an earlier run's zero-head one:
   the manifest's weights note must say the head was re-initialised); once per ``--reduce-range`` setting:
   ``auto`` is the toolkit's default (7-bit weights where the CPU has no VNNI), ``off`` what that default is on a
   VNNI CPU such as the Intel Xeon deploy_cpu was measured on. An INT8 gate failing (exit 5) is recorded, not fatal.
2. The variants run_deploy.py benches (every ONNX artifact but ``fp32``; those that failed their gate too, named
   as ``bench --variants`` names them) on each backend, through the harness
   bench and tune use (``runtimes.harness``: the eager FP32 reference, ``pool_accuracy``), graded by
   ``core.metrics.accuracy_drop`` with random-init weights (tune's and run_deploy's rule: 100 x (1 - output cosine
   vs FP32)), on two pools: ``random`` (32 seeded random-normal inputs, seed 0: the pool bench used when
   deploy_cpu was measured) and ``bench`` (whatever the harness picks now: the artifact's held-out photos where it
   keeps them). eager is the reference (0 by definition); compile, the same PyTorch model compiled, is not run.
3. The convert gate of each variant as the manifest records it (held-out photos, ONNX Runtime).

Writes benchmarks/results/vit_accuracy_cpu.{json,md} with the command, the CPU and the library versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine, write

MODEL = "vit_b_16"
#: run_deploy.py's convert flags for an image model at its default --layouts
FLAGS = ["--int8", "--calib", "imagenet_subset", "--int8-layouts", "qop_pc_u8"]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _grade(setup: Any, log: Any) -> list[dict[str, Any]]:
    """Every target's statistics against the reference on ``setup``'s pool, and its drop on tune's basis."""
    from core.errors import BackendUnavailableError
    from core.metrics import accuracy_drop
    from core.models import is_random_init
    from runtimes import RUNNERS
    from runtimes.base import RunnerOptions
    from runtimes.harness import pool_accuracy

    rows = []
    for t in setup.targets:
        row: dict[str, Any] = {"backend": t.backend, "variant": t.artifact.name, "precision": t.precision}
        try:
            runner = RUNNERS[t.backend](setup.manifest, setup.base, t.artifact, RunnerOptions(precision=t.precision))
            with runner:
                acc = pool_accuracy(setup, runner)
        except BackendUnavailableError as exc:
            row["skipped"] = str(exc)
            rows.append(row)
            log(f"  {t.backend}:{t.artifact.name}: skipped: {exc}")
            continue
        drop, basis = accuracy_drop(acc, is_random_init(setup.manifest.source))
        row |= {"drop_points": round(drop, 6), "basis": basis, "cosine": acc.cosine, "max_abs_err": acc.max_abs_err,
                "top1_agreement": acc.top1_agreement, "not_measurable": acc.not_measurable, "samples": acc.samples}
        log(f"  {t.backend}:{t.artifact.name}: drop {drop:.3f} points (cosine {acc.cosine:.6f})")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="ort,openvino", help="run_deploy.py's ONNX backends (eager: the reference)")
    ap.add_argument("--samples", type=int, default=32, help="accuracy samples (bench's default, which run_deploy "
                                                           "keeps)")
    ap.add_argument("--reduce-range", default="auto,off", help="convert's INT8 weights, one run each: auto (the "
                                                                  "toolkit's default on this CPU), on, off")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "vit_accuracy"))
    args = ap.parse_args()
    if args.samples < 2:
        ap.error("--samples must be at least 2 (a constant output is told by comparing inputs)")
    t0 = time.perf_counter()
    runs = [_measure(rr, args) for rr in args.reduce_range.split(",")]
    payload = {"command": "python " + " ".join(sys.argv), "machine": machine(), "versions": _versions(),
               "model": MODEL, "convert_flags": FLAGS, "runs": runs, "seconds": round(time.perf_counter() - t0, 1)}
    write("vit_accuracy_cpu", payload, _markdown(payload))


def _convert(folder: Path, flags: list[str]) -> dict[str, Any]:
    """``convert`` unless ``folder`` holds a manifest; its exit code and last error line (5: a gate failed)."""
    if (folder / "manifest.json").is_file():
        return {"exit": None, "error": None, "note": "reused an earlier run's folder"}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "convert", MODEL, "--out", str(folder), *flags],
                          cwd=ROOT, stderr=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(proc.stderr)
    last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), None)
    if proc.returncode not in (0, 5) or not (folder / "manifest.json").is_file():
        sys.exit(f"convert {MODEL} {' '.join(flags)} failed (exit {proc.returncode}): {last}")
    return {"exit": proc.returncode, "error": last if proc.returncode else None}


def _measure(reduce_range: str, args: argparse.Namespace) -> dict[str, Any]:
    from calibration.pools import random_pool
    from core.manifest import Manifest
    from runtimes.harness import BenchConfig, prepare_bench, reference_runner, run_pool

    if reduce_range not in ("auto", "on", "off"):
        sys.exit(f"--reduce-range: auto, on or off, not {reduce_range!r}")
    flags = FLAGS + {"auto": [], "on": ["--reduce-range"], "off": ["--no-reduce-range"]}[reduce_range]
    key = hashlib.sha256(" ".join([MODEL, *flags]).encode()).hexdigest()[:8]
    folder = Path(args.work) / f"{MODEL}-{key}"
    converted = _convert(folder, flags)
    manifest = Manifest.load(folder)
    note = manifest.source.weights_note or ""
    if "re-initialised" not in note:
        sys.exit(f"{folder} holds a ViT converted before its zero head was re-initialised ({note!r}): delete it")
    variants = [a.name for a in manifest.artifacts.values() if a.kind == "onnx" and a.name != "fp32"
                and (a.status == "ok" or (a.metrics.gate is not None and a.metrics.gate.passed is False))]
    cfg = BenchConfig(artifact_dir=folder, backends=args.backends.split(","), batch_sizes=[1, 8], variants=variants,
                      accuracy_samples=args.samples, seed=0)
    print(f"reduce_range {reduce_range}: {folder}")
    setup = prepare_bench(cfg, print)
    pools: dict[str, dict[str, Any]] = {"bench": {"inputs": setup.pool.source, "rows": _grade(setup, print)}}
    rand = random_pool(setup.manifest.iospec, max(args.samples, 8), 0)
    with reference_runner(setup.manifest, setup.base, None) as ref:
        ref_out = run_pool(ref, rand, setup.chunk)
    print(f"random pool: {rand.source}")
    pools["random"] = {"inputs": rand.source, "rows": _grade(dataclasses.replace(setup, pool=rand, ref_out=ref_out),
                                                              print)}
    quant = {a.name: {"reduce_range": getattr(a.params, "reduce_range", None), "status": a.status}
             for a in manifest.artifacts.values() if a.precision == "int8"}
    gates = {a.name: a.metrics.gate.model_dump(mode="json") for a in manifest.artifacts.values()
             if a.metrics.gate is not None}
    return {"reduce_range": reduce_range, "convert_flags": flags, "convert": converted, "weights_note": note,
            "variants": variants, "int8": quant, "reference": setup.ref_label, "pools": pools,
            "convert_gates": gates}


def _markdown(p: dict[str, Any]) -> str:
    lines = ["# vit_b_16 accuracy drops with the seeded head (issue 28)", "",
             f"Command: `{p['command']}`; {p['seconds']:.0f} s.", "",
             f"CPU: {p['machine']['cpu_model']} ({p['machine']['cpu_flags']['summary']}); "
             + ", ".join(f"{k} {v}" for k, v in p["versions"].items()) + ".", "",
             f"Model: {p['model']} at random init, its zero-initialised head re-initialised (seeded); convert "
             f"`{' '.join(p['convert_flags'])}` (run_deploy.py's flags). Drops on tune's and run_deploy.py's basis "
             "(core.metrics.accuracy_drop, random-init weights: 100 x (1 - output cosine vs FP32)) against the eager "
             "FP32 reference (eager: 0 by definition). benchmarks/results/deploy_cpu.* shows 0.000 for every "
             "variant: zeros against zeros before the head was re-initialised.", ""]
    for run in p["runs"]:
        rr = {k: v["reduce_range"] for k, v in run["int8"].items()}
        lines += [f"## reduce_range {run['reduce_range']} (`{' '.join(run['convert_flags'])}`; INT8 files' "
                  f"reduce_range: {rr})", ""]
        if run["convert"].get("error"):
            lines += [f"convert exit {run['convert']['exit']}: {run['convert']['error']}", ""]
        for name, pool in run["pools"].items():
            lines += [f"Pool '{name}': {pool['inputs']}", "", "| backend | variant | drop pts | cosine | max abs err |",
                      "|---|---|---|---|---|"]
            for r in pool["rows"]:
                if "skipped" in r:
                    lines.append(f"| {r['backend']} | {r['variant']} | skipped: {r['skipped']} | | |")
                else:
                    lines.append(f"| {r['backend']} | {r['variant']} | {r['drop_points']:.3f} | {r['cosine']:.6f} | "
                                 f"{r['max_abs_err']:.4g} |")
            lines.append("")
        lines += ["convert's gates (held-out photos, ONNX Runtime):", "", "| variant | drop pts | basis | passed |",
                  "|---|---|---|---|"]
        for name, g in run["convert_gates"].items():
            drop = "-" if g["drop_points"] is None else f"{g['drop_points']:.3f}"
            lines.append(f"| {name} | {drop} | {g['basis']} | {g['passed']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
