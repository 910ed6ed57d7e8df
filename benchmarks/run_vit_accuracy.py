"""vit_b_16's accuracy drops with the seeded head the toolkit now gives a random-init ViT (issue 28).

    python benchmarks/run_vit_accuracy.py [--backends ort,openvino] [--samples 32] [--work artifacts/vit_accuracy]

benchmarks/results/deploy_cpu.* recorded a drop of exactly 0.000 for every vit_b_16 variant: torchvision
zero-initialises the ViT head, so the random-init model output 0 for every input and each check compared zeros
with zeros. This script does not re-time anything (run_deploy.py does, in an hour); it measures the drops alone,
as run_deploy.py gets them:

1. ``convert vit_b_16`` with run_deploy.py's flags for image models (``--int8 --calib imagenet_subset
   --int8-layouts qop_pc_u8``), through cli.py, into a folder of its own (never an earlier run's zero-head one:
   the manifest's weights note must say the head was re-initialised).
2. The variants run_deploy.py benches (every ok ONNX artifact but ``fp32``) on each backend, through the harness
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
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write

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
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "vit_accuracy"))
    args = ap.parse_args()
    if args.samples < 2:
        ap.error("--samples must be at least 2 (a constant output is told by comparing inputs)")
    t0 = time.perf_counter()
    from calibration.pools import random_pool
    from core.manifest import Manifest
    from runtimes.harness import BenchConfig, prepare_bench, reference_runner, run_pool

    key = hashlib.sha256(" ".join([MODEL, *FLAGS]).encode()).hexdigest()[:8]
    folder = ensure_converted(MODEL, Path(args.work) / f"{MODEL}-{key}", FLAGS)
    manifest = Manifest.load(folder)
    note = manifest.source.weights_note or ""
    if "re-initialised" not in note:
        sys.exit(f"{folder} holds a ViT converted before its zero head was re-initialised ({note!r}): delete it")
    variants = [a.name for a in manifest.artifacts.values() if a.kind == "onnx" and a.status == "ok"
                and a.name != "fp32"]
    cfg = BenchConfig(artifact_dir=folder, backends=args.backends.split(","), batch_sizes=[1, 8], variants=variants,
                      accuracy_samples=args.samples, seed=0)
    setup = prepare_bench(cfg, print)
    pools: dict[str, dict[str, Any]] = {"bench": {"inputs": setup.pool.source, "rows": _grade(setup, print)}}
    rand = random_pool(setup.manifest.iospec, max(args.samples, 8), 0)
    with reference_runner(setup.manifest, setup.base, None) as ref:
        ref_out = run_pool(ref, rand, setup.chunk)
    random_setup = dataclasses.replace(setup, pool=rand, ref_out=ref_out)
    print(f"random pool: {rand.source}")
    pools["random"] = {"inputs": rand.source, "rows": _grade(random_setup, print)}
    gates = {a.name: a.metrics.gate.model_dump(mode="json") for a in manifest.artifacts.values()
             if a.metrics.gate is not None}
    payload = {"command": "python " + " ".join(sys.argv), "machine": machine(), "versions": _versions(),
               "model": MODEL, "convert_flags": FLAGS, "weights_note": note, "variants": variants,
               "reference": setup.ref_label, "pools": pools, "convert_gates": gates,
               "seconds": round(time.perf_counter() - t0, 1)}
    write("vit_accuracy_cpu", payload, _markdown(payload))


def _markdown(p: dict[str, Any]) -> str:
    lines = ["# vit_b_16 accuracy drops with the seeded head (issue 28)", "",
             f"Command: `{p['command']}`; {p['seconds']:.0f} s.", "",
             f"CPU: {p['machine']['cpu_model']} ({p['machine']['cpu_flags']['summary']}); "
             + ", ".join(f"{k} {v}" for k, v in p["versions"].items()) + ".", "",
             f"Model: {p['model']}, {p['weights_note']}; convert `{' '.join(p['convert_flags'])}` (run_deploy.py's "
             f"flags); variants {', '.join(p['variants'])}; reference {p['reference']}. Drops on tune's and "
             "run_deploy.py's basis (core.metrics.accuracy_drop, random-init weights: 100 x (1 - output cosine vs "
             "FP32)). benchmarks/results/deploy_cpu.* shows 0.000 for every variant: zeros against zeros before "
             "the head was re-initialised; eager is the reference (0).", ""]
    for name, pool in p["pools"].items():
        lines += [f"## Pool '{name}': {pool['inputs']}", "", "| backend | variant | drop pts | cosine | max abs err |",
                  "|---|---|---|---|---|"]
        for r in pool["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['backend']} | {r['variant']} | skipped: {r['skipped']} | | |")
            else:
                lines.append(f"| {r['backend']} | {r['variant']} | {r['drop_points']:.3f} | {r['cosine']:.6f} | "
                             f"{r['max_abs_err']:.4g} |")
        lines.append("")
    lines += ["## convert's gates (held-out photos, ONNX Runtime)", "", "| variant | drop pts | basis | passed |",
              "|---|---|---|---|"]
    for name, g in p["convert_gates"].items():
        drop = "-" if g["drop_points"] is None else f"{g['drop_points']:.3f}"
        lines.append(f"| {name} | {drop} | {g['basis']} | {g['passed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
