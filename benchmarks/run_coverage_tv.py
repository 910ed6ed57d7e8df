"""Model coverage, every torchvision builder: `convert NAME` and `bench` (eager, ort) for each name of
``torchvision.models.list_models()`` beyond classification (detection, segmentation, video, optical flow,
quantizable), each in its own processes through the real CLI (random init, nothing downloaded).

    python benchmarks/run_coverage_tv.py [--models a,b] [--families detection,video] [--all] [--recheck] [--fresh]

By default it checks every builder that benchmarks/run_coverage.py does not (the classifiers, recorded in
coverage_cpu.md); ``--all`` adds the classifiers. Each family's sample input: the model's default
(core.tvzoo) except where a smaller one is allowed (SMALL_SHAPES: segmentation at 256x256, the 3D-conv and
Swin video models at 8 x 112 x 112; MViT and S3D need their 16 x 224 x 224 clip). Bench: BENCH_ARGS, batch 1,
a few iterations, 4 accuracy samples. Recorded per model: pass/fail with the failing step and its one-line error, the
wall time, peak memory, the CPU, the machine's load average when the model started (other work on a shared
machine slows it), and whether ONNX Runtime agrees with eager (run_coverage's rule). Rewritten after every
model; a re-run skips the models recorded (``--recheck`` checks the named ones again, ``--fresh`` forgets all).
Writes benchmarks/results/coverage_tv_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, machine, write
from benchmarks.run_coverage import PARITY_COSINE, _agreement, _num_params, _run

#: --input-shape per family where a smaller input than the model's default is allowed (None: the default)
SMALL_SHAPES = {"segmentation": "1x3x256x256", "video": "1x3x8x112x112"}
#: video models whose clip is fixed by the architecture (positional embeddings, a temporal pooling window)
FIXED_CLIP = ("mvit_", "s3d")
NAME = "coverage_tv_cpu"
#: A short bench: these models take seconds a run on 2 shared cores (Keypoint R-CNN ~10 s), and the point is
#: whether each backend runs and agrees, not its latency
BENCH_ARGS = ["--backends", "eager,ort", "--batch-sizes", "1", "--warmup", "1", "--iters", "2", "--rounds", "1",
              "--accuracy-samples", "4"]


def convert_args(model: str, family: str) -> list[str]:
    shape = None if model.startswith(FIXED_CLIP) else SMALL_SHAPES.get(family)
    return ["--input-shape", shape] if shape else []


def _check(model: str, family: str, out: Path, timeout: float) -> dict[str, Any]:
    extra = convert_args(model, family)
    ok, msg, peak = _run(["convert", model, *extra, "--out", str(out)], timeout)
    row: dict[str, Any] = {"input_shape": extra[1] if extra else "default", "peak_rss_mib": {"convert": round(peak)}}
    if not ok:
        return {"status": "fail", "step": "convert", "error": msg, **row}
    manifest = json.loads((out / "manifest.json").read_text())
    row["inputs"] = {t["name"]: t["shape"] for t in manifest["iospec"]["inputs"]}
    row["outputs"] = [t["name"] for t in manifest["iospec"]["outputs"]]
    ok, msg, peak = _run(["bench", str(out), *BENCH_ARGS], timeout)
    row["peak_rss_mib"]["bench"] = round(peak)
    if not ok:
        return {"status": "fail", "step": "bench", "error": msg, **row}
    recs = json.loads((out / "bench" / "results.json").read_text())["records"]
    ort = [r for r in recs if r["backend"] == "ort"]
    eager = [r for r in recs if r["backend"] == "eager"]
    p50 = {f"{r['backend']}:{r['variant']}": r.get("latency_ms", {}).get("p50") for r in [*eager, *ort]}
    return {"status": "pass", **row, "ort_variants": [r["variant"] for r in ort], "p50_ms": p50, **_agreement(ort)}


def check_model(model: str, family: str, work: Path, timeout: float) -> dict[str, Any]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        row = _check(model, family, work / model, timeout)
    finally:
        shutil.rmtree(work / model, ignore_errors=True)
    return {"model": model, "family": family, **row, "seconds": round(time.perf_counter() - t0, 1),
            "load_avg_1min_at_start": round(load, 2), "cpu": machine()["cpu_flags"]["summary"],
            "run": time.strftime("%Y-%m-%d")}


def _markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    passed = [r for r in rows if r["status"] == "pass"]
    agree = [r for r in passed if r.get("ort_agrees_with_eager")]
    versions = payload["machine"].get("versions") or {}
    lines = ["# Model coverage: every torchvision builder beyond classification, through convert + bench (eager, ort)",
             "", f"Command: `{payload['command']}` (the last run; rows of models it did not check are kept from "
             "earlier runs of this script, each model checked alone in its own processes)", "",
             f"CPU: {payload['machine']['cpu_flags']['summary']} ({payload['machine'].get('cpu_model', '')}); "
             f"versions: {', '.join(f'{k} {v}' for k, v in versions.items()) or 'see the .json'}. Random init "
             "(core.tvzoo: detectors with their score and box layers rescaled, seeded, and a fixed count of "
             "detections). Bench: `bench " + " ".join(BENCH_ARGS) + "` (rows recorded before it was shortened: 3 "
             "rounds of 3 iterations, 8 accuracy samples). The classifiers are in coverage_cpu.md.", "",
             "The machine is shared: `load` is the 1-minute load average when the model started (2 cores); times "
             "taken under load are slower than the model alone.", "",
             f"Checked {len(rows)} of {payload['total']} builders: {len(passed)} pass, {len(rows) - len(passed)} "
             f"fail; ONNX Runtime agrees with eager (every output's cosine >= {PARITY_COSINE} on every sample, or "
             f"top-1) in {len(agree)} of the {len(passed)} that pass. Not checked: "
             f"{', '.join(payload.get('unchecked') or []) or 'none'}.", "",
             "| model | family | input | status | step | ORT = eager | min cosine | s | load | peak RSS MiB convert / "
             "bench | error / note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cos = r.get("min_ort_cosine")
        mem = r.get("peak_rss_mib", {})
        verdict = r.get("ort_agrees_with_eager")
        shown = "-" if r["status"] != "pass" else "not measurable" if verdict is None else "yes" if verdict else "no"
        lines.append(f"| {r['model']} | {r['family']} | {r.get('input_shape', '')} | {r['status']} | "
                     f"{r.get('step', '')} | {shown} | {'' if cos is None else f'{cos:.5f}'} | {r['seconds']} | "
                     f"{r.get('load_avg_1min_at_start', '')} | "
                     f"{' / '.join(str(mem[k]) for k in ('convert', 'bench') if k in mem) or '-'} | "
                     f"{r.get('error') or (r.get('agreement_basis', '') if verdict is None else '')} |")
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "torchvision", "onnx", "onnxruntime")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=None, help="Comma-separated (default: every builder of the families)")
    ap.add_argument("--families", default=None, help="Comma-separated families (core.tvzoo.family)")
    ap.add_argument("--all", action="store_true", help="Also the classifiers (run_coverage.py covers them)")
    ap.add_argument("--timeout", type=float, default=1800, help="Seconds per step")
    ap.add_argument("--fresh", action="store_true", help="Forget earlier rows")
    ap.add_argument("--recheck", action="store_true", help="Check the --models named again, even where recorded")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "coverage_tv"))
    args = ap.parse_args()
    from core import tvzoo

    families = {n: tvzoo.family(n) for n in tvzoo.builders()}
    wanted = set(args.families.split(",")) if args.families else None
    everything = sorted((n for n, f in families.items() if args.all or f != "classification"), key=_num_params)
    models = args.models.split(",") if args.models else \
        [m for m in everything if wanted is None or families[m] in wanted]
    unknown = [m for m in models if m not in families]
    if unknown:
        raise SystemExit(f"not torchvision builders: {unknown}")
    old = RESULTS / f"{NAME}.json"
    before = {} if args.fresh or not old.is_file() else json.loads(old.read_text())
    done = {r["model"]: r for r in before.get("rows", [])}
    if args.recheck:
        done = {m: r for m, r in done.items() if m not in models}
    info = machine()
    info["versions"] = _versions()
    payload: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": info, "total": len(everything),
                               "rows": [r for m, r in done.items() if m not in models]}
    order = {m: i for i, m in enumerate(everything)}

    def save() -> None:
        checked = {r["model"] for r in payload["rows"]}
        payload["unchecked"] = [m for m in everything if m not in checked]
        payload["rows"].sort(key=lambda r: order.get(r["model"], len(order)))
        write(NAME, payload, _markdown(payload))

    for model in models:
        row = done.get(model) or check_model(model, families[model], Path(args.work), args.timeout)
        payload["rows"].append(row)
        save()
        print(f"{model}: {row['status']} {row.get('step', '')} {row.get('error', '')} ({row['seconds']} s)", flush=True)
    save()


if __name__ == "__main__":
    main()
