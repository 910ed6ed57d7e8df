"""Sweep benchmark: 4 torchvision models x 3 variants x 2 batch sizes through `python cli.py sweep`, run in
one process and on a local Ray (as many CPUs as this process may use: 2 here), each into a fresh folder;
then each re-run on its finished folder.

Checks: both runs give the same rows (same cells, same statuses) and the same accuracy figures (every
field of every row's accuracy record, compared exactly: the same artifacts, inputs and thread counts);
the wall time of each run; a re-run that finds every cell done takes under 5% of its first run.

    python benchmarks/run_sweep.py

Writes benchmarks/results/sweep_cpu.{json,md}. Latency is not what this compares (on Ray two 1-thread cells
run at once and share the memory system); the ratio is reported for information.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine, write

MODELS = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x1_0"]
PLAN: dict[str, Any] = {
    "models": MODELS,
    "conversions": {"quant": {"int8": True, "int8_dynamic": True, "calib": "imagenet_subset", "calib_size": 16,
                              "eval_size": 32}},
    "variants": ["opt", "int8_dynamic", "int8_static_minmax"],
    "backends": ["ort"], "batch_sizes": [1, 4], "devices": ["cpu"], "threads": 1,
    "warmup": 2, "iters": 15, "rounds": 3, "accuracy_samples": 16, "data": "imagenet_subset",
}
TARGET_RERUN = 0.05
WORK = ROOT / "artifacts" / "bench_sweep"


def sweep(plan: Path, out: Path, ray: bool) -> dict[str, Any]:
    """One `cli.py sweep` run: its wall time (process start to exit), exit code and results.json."""
    cmd = [sys.executable, "cli.py", "sweep", str(plan), "--out", str(out), *(["--ray", "local"] if ray else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    res = json.loads((out / "results.json").read_text())
    return {"command": " ".join(["python", *cmd[1:]]), "rc": proc.returncode, "wall_s": round(wall, 2),
            "library_wall_s": round(res["wall_s"], 2), "summary": res["summary"],
            "cell_wall_s_sum": round(sum(r["wall_s"] for r in res["rows"] + res["converts"] if not r["reused"]), 1),
            "results": res, "load_after": os.getloadavg()}


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["model"], r["conversion"], r["backend"], r["variant"], r["device"], r["batch_size"])


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Same rows and statuses, same accuracy figures; the p50 ratio b/a for information."""
    ra = {_key(r): r for r in a["rows"]}
    rb = {_key(r): r for r in b["rows"]}
    same_rows = set(ra) == set(rb) and all(ra[k]["status"] == rb[k]["status"] for k in ra)
    acc_diff = [" ".join(map(str, k)) for k in ra if k in rb and
                (ra[k]["record"] or {}).get("accuracy") != (rb[k]["record"] or {}).get("accuracy")]
    ratios = [rb[k]["record"]["latency_ms"]["p50"] / ra[k]["record"]["latency_ms"]["p50"]
              for k in ra if k in rb and ra[k]["record"] and rb[k]["record"]]
    return {"rows": len(ra), "same_rows_and_statuses": same_rows, "accuracy_identical": not acc_diff,
            "accuracy_differs": acc_diff,
            "p50_ratio_ray_over_local": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                         "max": round(max(ratios), 3)} if ratios else None}


def markdown(payload: dict[str, Any]) -> str:
    runs, cmp_ = payload["runs"], payload["comparison"]
    lines = ["# Sweep: 4 models x 3 variants x 2 batch sizes, in one process and on a local Ray", "",
             f"- machine: {payload['machine']['cpu_model']}, {payload['machine']['cpu_count']} cores; load average "
             f"before {payload['load_before']}", f"- plan: {json.dumps(PLAN)}",
             f"- rows: {cmp_['rows']}; same rows and statuses: {cmp_['same_rows_and_statuses']}; accuracy figures "
             f"identical: {cmp_['accuracy_identical']}", "",
             "| run | command | exit | wall s | cells run | sum of cell wall s | load after |", "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | `{r['command']}` | {r['rc']} | {r['wall_s']} | {r['summary']['ran']} | "
                     f"{r['cell_wall_s_sum']} | {', '.join(f'{x:.2f}' for x in r['load_after'])} |")
    lines += ["", "| mode | re-run / first run | target | verdict |", "|---|---|---|---|"]
    for mode, v in payload["rerun"].items():
        lines.append(f"| {mode} | {v['fraction']:.1%} | < {TARGET_RERUN:.0%} | {'met' if v['met'] else 'MISSED'} |")
    ratio = cmp_["p50_ratio_ray_over_local"]
    if ratio:
        lines += ["", f"p50 latency on Ray / in one process (information only: on Ray two 1-thread cells run at "
                      f"once): median {ratio['median']}, range {ratio['min']}-{ratio['max']}."]
    lines += ["", "Each wall time is one run (a first run takes minutes, so it is not repeated); the machine is "
                  "shared, so the load average is recorded before and after each run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    plan = WORK / "plan.yaml"
    plan.write_text(json.dumps(PLAN, indent=2))  # YAML is a superset of JSON
    load_before = os.getloadavg()
    runs = {}
    for name, ray in (("local", False), ("ray", True)):
        runs[name] = sweep(plan, WORK / name, ray)
        print(f"{name}: {runs[name]['wall_s']} s, {runs[name]['summary']}", flush=True)
    for name, ray in (("local", False), ("ray", True)):
        runs[f"{name} re-run"] = sweep(plan, WORK / name, ray)
        print(f"{name} re-run: {runs[f'{name} re-run']['wall_s']} s", flush=True)
    rerun = {m: {"fraction": runs[f"{m} re-run"]["wall_s"] / runs[m]["wall_s"]} for m in ("local", "ray")}
    for v in rerun.values():
        v["met"] = v["fraction"] < TARGET_RERUN
    payload = {"benchmark": "sweep_cpu", "command": "python benchmarks/run_sweep.py", "machine": machine(),
               "load_before": [round(x, 2) for x in load_before], "plan": PLAN,
               "comparison": compare(runs["local"]["results"], runs["ray"]["results"]), "rerun": rerun,
               "runs": {k: {kk: vv for kk, vv in v.items() if kk != "results"} for k, v in runs.items()},
               "rows": {k: [{"cell": r["cell"], "model": r["model"], "variant": r["variant"],
                             "batch_size": r["batch_size"], "status": r["status"], "node": r["node"],
                             "wall_s": round(r["wall_s"], 2),
                             "p50_ms": r["record"]["latency_ms"]["p50"] if r["record"] else None,
                             "p50_interval": r["record"]["latency_ms"]["p50_interval"] if r["record"] else None,
                             "top1_agreement": (r["record"]["accuracy"] or {}).get("top1_agreement")
                             if r["record"] else None}
                            for r in v["results"]["rows"]] for k, v in runs.items() if "re-run" not in k}}
    j, m = write("sweep_cpu", payload, markdown(payload))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
