"""The hostile-user campaign of issue 33, rerun: every CLI case the issue lists (and the ones its fixes added) as a
real ``python cli.py ...`` subprocess, each outcome classified; the server section from run_serving_fuzz.py.

    python benchmarks/run_hostile_cli.py [--timeout-s 60] [--threads-timeout-s 30] [--serving read|run]
                                         [--only SUBSTRING] [--keep]

1. A work folder (``mkdtemp`` under /tmp, short: Ray's socket paths must stay < 108 bytes) with the tests' tiny CNN
   converted by ``cli.py convert`` (its pristine copy kept aside) and the inputs the cases need: a results file,
   .npz files of 0 samples / NaN / a wrong key, factories that call ``sys.exit(0)``, a file and a folder whose
   manifest.json is binary, sweep plans.
2. Every case runs with ``TMPDIR`` set to a folder of the work folder (so whatever a case leaves in its temp folder,
   Ray's session folder included, is its own), in a new process group killed at the timeout.
3. Each outcome gets zero or more of these classes (a case with none is clean):
   ``internal error`` (a traceback, an "internal error" line, or a death by signal), ``damaged`` (the sha256 of a
   file of the work folder, the artifact folder and every input among them, changed or the file is gone),
   ``hang`` (the timeout; the ``--threads 1000`` cases get a shorter one), ``leftover`` (a new file or folder in the
   work folder or in the case's TMPDIR that the case may not create; Ray's one ``.ses`` id file per TMPDIR
   excepted), ``silent acceptance`` (exit 0 where a refusal is expected), ``more than one line`` (a refusal whose
   output is not exactly one ``error:`` line: typer's boxed usage errors, a second error line),
   ``wrong exit`` (a refusal with another exit code than the error class the case expects) and ``unclear`` (the
   error line lacks what it must name: the flag, the path).
4. The server section: ``--serving read`` (default) folds in benchmarks/results/serving_fuzz.json as its last run
   wrote it (run_serving_fuzz.py owns that file); ``--serving run`` runs that script first (rewriting it).

Writes benchmarks/results/hostile_cli_cpu.{json,md} (per case: command, exit code, first stderr line, verdict; the
totals per class; the server verdict). Exit 1 when a case is not clean or the server section fails its targets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, machine, write

TINY = ROOT / "tests" / "fixtures" / "tiny_cnn.py"
FIXTURE_RESULTS = ROOT / "tests" / "fixtures" / "results" / "r18_cpu.json"
QUICK = ["--backends", "ort", "--batch-sizes", "1", "--iters", "2", "--warmup", "0", "--rounds", "1"]
CLASSES = ("internal error", "damaged", "hang", "leftover", "silent acceptance", "more than one line", "wrong exit",
           "unclear")
#: what a Ray started with TMPDIR=X keeps in X by design: one session-id file, reused by the next Ray there
RAY_ID_FILE = ".ses"
#: os.sendfile (shutil.copyfile's fast path) raising ENOSPC, as when the disk fills up while packaging
FULL_DISK = ("import errno, os, runpy, sys\n"
             "def full(*_a):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
             "os.sendfile = full\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")


@dataclass
class Case:
    """One hostile input. ``args`` may name ``{art}`` (the tiny artifact folder), ``{w}`` (the work folder) and
    ``{tiny}`` (the tiny CNN's factory); ``code`` None expects exit 0 (the case must succeed)."""

    name: str
    section: str
    args: list[str]
    needles: tuple[str, ...] = ()
    code: int | None = 2
    timeout_s: float | None = None
    creates: tuple[str, ...] = ()  # paths under the work folder the case may create (a successful --out)
    full_disk: bool = False


def cases() -> list[Case]:
    art, tiny = "{art}", "{tiny}"
    conv = ["convert", tiny]
    threads = "1000"
    return [
        # damaging: an output that is an input
        Case("report --html RESULTS that is its own input", "damaging",
             ["report", "{w}/run/results.json", "--html", "{w}/run/results.json"], ("--html", "is also an input")),
        Case("report --html through ../", "damaging",
             ["report", "{w}/run/results.json", "--html", "{w}/run/../run/results.json"], ("is also an input",)),
        Case("report of a results file named .html (default HTML path is itself)", "damaging",
             ["report", "{w}/run/r.html"], ("is also an input",)),
        Case("bench --out ART/manifest.json", "damaging", ["bench", art, *QUICK, "--out", "{art}/manifest.json"],
             ("--out", "is also an input")),
        Case("tune --out ART/manifest.json", "damaging", ["tune", art, "--out", "{art}/manifest.json"],
             ("--out", "is also an input")),
        Case("profile --out ART/model.opt.onnx", "damaging", ["profile", art, "--out", "{art}/model.opt.onnx"],
             ("--out", "is also an input")),
        # hang: more threads than CPUs
        Case("bench --threads 1000", "hang", ["bench", art, *QUICK, "--threads", threads, "--out", "{w}/b/r.json"],
             (f"--threads {threads}", "CPU"), timeout_s=-1),
        Case("profile --threads 1000", "hang", ["profile", art, "--threads", threads, "--iters", "1", "--warmup", "0",
                                                "--out", "{w}/p/t.json"], (f"--threads {threads}",), timeout_s=-1),
        Case("serve --threads 1000", "hang", ["serve", art, "--port", "0", "--threads", threads],
             (f"--threads {threads}",), timeout_s=-1),
        Case("sweep (this process) with plan threads 1000", "hang",
             ["sweep", "{w}/threads.yaml", "--out", "{w}/sw1"], ("plan threads: 1000", "CPU"), timeout_s=-1),
        Case("sweep --ray local with plan threads 1000", "hang",
             ["sweep", "{w}/threads.yaml", "--ray", "local", "--out", "{w}/sw2"], ("plan threads: 1000", "CPU"),
             timeout_s=-1),
        # "internal error" before
        Case("convert --sample-inputs with 0 samples", "internal error",
             [*conv, "--sample-inputs", "{w}/zero.npz", "--out", art], ("no sample",)),
        Case("convert --seed 99999999999999999999999", "internal error",
             [*conv, "--seed", "99999999999999999999999", "--out", art], ("--seed",)),
        *[Case(f"{c} on a file", "internal error", [c, "{w}/file.txt"], ("is a file, not an artifact folder",))
          for c in ("bench", "profile", "tune")],
        *[Case(f"{c} on a folder with a binary manifest.json", "internal error", [c, "{w}/bin"],
               ("is not readable JSON",)) for c in ("bench", "profile", "tune")],
        Case("convert --out DIR/.. (must succeed: the folder it names, no staging copy inside)", "internal error",
             [*conv, "--no-optimize", "--out", "{w}/d/sub/.."], code=None, creates=("d",)),
        # accepted silently before
        Case("a factory that calls sys.exit(0)", "silent", ["convert", "{w}/exits.py:build", "--out", art],
             ("sys.exit(0)",)),
        Case("a factory module that calls sys.exit(0) on import", "silent",
             ["convert", "{w}/script.py:build", "--out", art], ("sys.exit(0)",)),
        Case("--sample-inputs with NaN", "silent", [*conv, "--sample-inputs", "{w}/nan.npz", "--out", art], ("NaN",)),
        Case("--sample-inputs with a key that names no input", "silent",
             [*conv, "--sample-inputs", "{w}/key.npz", "--out", art], ("no input named 'image'",)),
        Case("--input-shape ''", "silent", [*conv, "--input-shape", "", "--out", art], ("--input-shape",)),
        Case("--trt-from X without --trt", "silent", [*conv, "--trt-from", "sparse24", "--out", art],
             ("--trt-from", "add --trt")),
        Case("bench --batch-sizes 1,,2", "silent", ["bench", art, "--backends", "ort", "--batch-sizes", "1,,2"],
             ("--batch-sizes", "empty item")),
        Case("convert --calib-method minmax,,entropy", "silent",
             [*conv, "--int8", "--calib", "synthetic", "--calib-method", "minmax,,entropy", "--out", art], ("--calib-method", "empty item")),
        Case("package kserve --runtime-version 'bad tag!'", "silent",
             ["package", art, "--format", "kserve", "--storage-uri", "s3://bucket/m", "--runtime-version", "bad tag!",
              "--out", "{w}/ks"], ("--runtime-version", "image tag")),
        # leftovers
        Case("profile with a bad --input-shape (no --out folder)", "leftover",
             ["profile", art, "--input-shape", "1x3", "--out", "{w}/prof/t.json"], ("--input-shape",)),
        Case("a failing sweep --ray local (no Ray session folder)", "leftover",
             ["sweep", "{w}/missing.yaml", "--ray", "local", "--out", "{w}/sw3"], ("1 cell(s) failed",), code=1,
             creates=("sw3",)),
        # messages made exact
        Case("bench --iters 0 (typer range)", "message", ["bench", art, "--iters", "0"], ("--iters", "--help")),
        Case("bench --threads -1 (typer range)", "message", ["bench", art, "--threads", "-1"], ("--threads", "--help")),
        Case("profile --iters 0 (typer range)", "message", ["profile", art, "--iters", "0"], ("--iters",)),
        Case("convert --calib-size 0 (typer range)", "message", ["convert", "x", "--calib-size", "0"],
             ("--calib-size",)),
        Case("bench --no-such-flag", "message", ["bench", art, "--no-such-flag"], ("--no-such-flag",)),
        Case("no-such-command", "message", ["no-such-command"], ("no-such-command",)),
        Case("package on a file", "message", ["package", "{w}/file.txt", "--out", "{w}/repo"], ("is a file",)),
        Case("serve on a file", "message", ["serve", "{w}/file.txt", "--port", "0"], ("is a file",)),
        Case("package on a full disk names the destination", "message", ["package", art, "--out", "{w}/repo"],
             ("no space left on device", "{w}/.repo.", "model.onnx"), full_disk=True),
        *[Case(f"wrong-rank --input-shape {s}", "message", [*conv, "--input-shape", s, "--out", art],
               ("rank", "1x3x32x32")) for s in ("1x3x32", "1x3x32x32x2")],
    ]


# -- the work folder ------------------------------------------------------------------------------------------------
def prepare(work: Path, timeout_s: float) -> tuple[Path, Path]:
    """The tiny artifact (converted by the CLI) and every input the cases read, under ``work``; returns the
    artifact folder and its pristine copy (outside ``work``: restored after a case that changed the folder)."""
    art = work / "art"
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "convert", f"{TINY}:build", "--out", str(art)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout_s * 5, check=False)
    if done.returncode != 0:
        raise SystemExit(f"converting the tiny CNN failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    pristine = work.parent / f"{work.name}.pristine"
    shutil.copytree(art, pristine)
    (work / "run").mkdir()
    shutil.copy(FIXTURE_RESULTS, work / "run" / "results.json")
    shutil.copy(FIXTURE_RESULTS, work / "run" / "r.html")
    (work / "file.txt").write_text("not a folder\n")
    (work / "bin").mkdir()
    (work / "bin" / "manifest.json").write_bytes(b"\xff\xfe\x00 not JSON")
    np.savez(work / "zero.npz", input=np.zeros((0, 3, 32, 32), np.float32))
    np.savez(work / "nan.npz", input=np.full((1, 3, 32, 32), np.nan, np.float32))
    np.savez(work / "key.npz", image=np.ones((1, 3, 32, 32), np.float32))
    (work / "exits.py").write_text("import sys\n\n\ndef build():\n    sys.exit(0)\n")
    (work / "script.py").write_text("import sys\nsys.exit(0)\n\n\ndef build():\n    pass\n")
    (work / "d" / "sub").mkdir(parents=True)
    (work / "d" / "sub" / "keep.txt").write_text("earlier\n")
    plan = {"models": [{"model": str(work / "missing.onnx"), "name": "missing"}], "backends": ["ort"],
            "batch_sizes": [1], "threads": 1}
    (work / "missing.yaml").write_text(json.dumps(plan))  # YAML is a superset of JSON
    (work / "threads.yaml").write_text(json.dumps({**plan, "models": [f"{TINY}:build"], "threads": 1000}))
    (work / "tmp").mkdir()
    return art, pristine


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's sha256, a folder as "dir"."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink() or not p.is_file():
            out[rel] = "dir" if p.is_dir() else "other"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def restore(root: Path, before: dict[str, str], art: Path, pristine: Path) -> None:
    """Back to ``before`` for the next case: what a case created is removed, the artifact folder copied back from
    its pristine copy when the case changed it."""
    now = snapshot(root)
    for rel in sorted(set(now) - set(before), key=len):
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    if any(now.get(k) != v for k, v in before.items() if k.startswith("art/") or k == "art"):
        shutil.rmtree(art, ignore_errors=True)
        shutil.copytree(pristine, art)


# -- one case -------------------------------------------------------------------------------------------------------
def fill(text: str, subst: dict[str, str]) -> str:
    for key, value in subst.items():
        text = text.replace("{" + key + "}", value)
    return text


def run_case(case: Case, work: Path, art: Path, timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    subst = {"art": str(art), "w": str(work), "tiny": f"{TINY}:build"}
    args = [fill(a, subst) for a in case.args]
    cmd = [sys.executable, "cli.py", *args]
    if case.full_disk:
        cmd = [sys.executable, "-c", FULL_DISK, "cli.py", *args]
    shown = "python cli.py " + shlex.join(args) + ("  (os.sendfile raising ENOSPC)" if case.full_disk else "")
    before = snapshot(work)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    hung = False
    try:
        out_b, err_b = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(proc.pid, signal.SIGKILL)
        out_b, err_b = proc.communicate()
    wall = time.perf_counter() - t0
    with_children_gone(proc.pid)
    out, err = out_b.decode(errors="replace"), err_b.decode(errors="replace")
    text = out + "\n" + err
    after = snapshot(work)
    rc = proc.returncode
    verdict: list[str] = []
    if "Traceback" in text or "internal error" in text or (rc < 0 and not hung):
        verdict.append("internal error")
    changed = sorted(k for k, v in before.items() if after.get(k) != v and not any(
        k == c or k.startswith(c + "/") for c in case.creates))
    if changed:
        verdict.append("damaged")
    if hung:
        verdict.append("hang")
    new = sorted(k for k in set(after) - set(before) if k != f"tmp/{RAY_ID_FILE}" and not any(
        (k == c or k.startswith(c + "/")) and not Path(k).name.startswith(".") for c in case.creates))
    top_new = sorted({k.split("/")[0] if not k.startswith("tmp/") else "/".join(k.split("/")[:2]) for k in new})
    if new:
        verdict.append("leftover")
    error_lines = [ln for ln in text.splitlines() if ln.startswith(("error:", "internal error:"))]
    if case.code is None:  # must succeed
        if rc != 0 and not hung:
            verdict.append("wrong exit")
        if "d" in case.creates and not ((work / "d" / "manifest.json").is_file()
                                        and (work / "d" / "sub" / "keep.txt").is_file()):
            verdict.append("damaged")  # --out DIR/..: the folder it names holds the artifact and what it held
    elif not hung:
        if rc == 0:
            verdict.append("silent acceptance")
        else:
            if len(error_lines) != 1 or "╭" in text or "Usage:" in text:
                verdict.append("more than one line")
            if rc != case.code and "internal error" not in verdict:
                verdict.append("wrong exit")
            needles = [fill(n, subst) for n in case.needles]
            if error_lines and any(n not in error_lines[0] for n in needles):
                verdict.append("unclear")
    stderr_lines = [ln for ln in err.splitlines() if ln.strip()]
    return {"case": case.name, "section": case.section, "command": shown, "exit_code": None if hung else rc,
            "expected_exit": case.code if case.code is not None else 0, "wall_s": round(wall, 1),
            "first_stderr_line": stderr_lines[0][:300] if stderr_lines else "",
            "error_line": error_lines[0][:400] if error_lines else "", "error_lines": len(error_lines),
            "changed": changed[:10], "left": top_new[:10], "verdict": verdict or ["clean"]}


def with_children_gone(pgid: int) -> None:
    """Kill whatever the case's process group left running (a Ray raylet, a server): a hang is counted, not kept."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# -- the server section ---------------------------------------------------------------------------------------------
def serving(mode: str) -> dict[str, Any]:
    path = RESULTS / "serving_fuzz.json"
    if mode == "run":
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_serving_fuzz.py")], cwd=ROOT, check=False)
    if not path.is_file():
        return {"source": str(path), "missing": True, "ok": False}
    r = json.loads(path.read_text())
    held, grpc_, after = r.get("stalled") or {}, r.get("grpc") or {}, r.get("good_after") or {}
    during = held.get("good_requests_meanwhile") or {}
    checks = {
        "crashes": r.get("crashes"), "5xx to client errors": r.get("five_xx_for_client_errors"),
        "problems": r.get("problem_count"), "wrong answers after": after.get("wrong"),
        "errors after": after.get("errors"), "stalled connections left open": held.get("left_open"),
        "errors of good requests while stalled": during.get("errors"),
        "gRPC not INVALID_ARGUMENT": grpc_.get("not_invalid_argument")}
    ratio = r.get("rss_ratio")
    ok = all(v == 0 for v in checks.values()) and ratio is not None and ratio <= 1.2
    return {"source": str(path.relative_to(ROOT)), "command": r.get("command"), "date": r.get("date"),
            "mode": mode, "requests": r.get("count"), "stalled": held.get("connections"),
            "grpc_requests": grpc_.get("requests"), "grpc_codes": grpc_.get("codes"), "checks": checks,
            "rss_mb_start": r.get("rss_mb_start"), "rss_mb_before": r.get("rss_mb_before"),
            "rss_mb_after": r.get("rss_mb_after"), "rss_ratio": ratio, "rss_ratio_to_start": r.get("rss_ratio_to_start"),
            "ok": ok}


# -- the report -----------------------------------------------------------------------------------------------------
def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(r: dict[str, Any]) -> str:
    t, s = r["totals"], r["serving"]
    lines = [
        "# Hostile CLI campaign (issue 33), rerun: every listed case as a real `cli.py` subprocess", "",
        f"Command: `{r['command']}`  ", f"Date: {r['date']}  ",
        f"Machine: {r['machine']['cpu_model']}, {r['machine']['cpu_count']} cores; timeout {r['timeout_s']:g} s per "
        f"case, {r['threads_timeout_s']:g} s for the `--threads 1000` cases; {r['wall_s']:.0f} s in all", "",
        f"**{r['cases']} cases: {t['clean']} clean.** " + ", ".join(f"{k}: **{t[k]}**" for k in CLASSES), "",
        "Classes: internal error (a traceback, an `internal error` line, a death by signal), damaged (a file of the "
        "work folder, the artifact folder and the inputs, changed or gone), hang (the timeout), leftover (a new path "
        "in the work folder or the case's TMPDIR, Ray's session folder included), silent acceptance (exit 0 where a "
        "refusal is expected), more than one line (not exactly one `error:` line, typer's box included), wrong exit "
        "(another exit code than the expected error class), unclear (the line lacks the flag or path it must name).",
        "", "| case | command | exit (expected) | first stderr line | verdict |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        first = row["error_line"] or row["first_stderr_line"]
        extra = (f" changed: {row['changed']}" if row["changed"] else "") + (f" left: {row['left']}" if row["left"] else "")
        lines.append(f"| {cell(row['case'])} | `{cell(row['command'])}` | {row['exit_code']} ({row['expected_exit']}) "
                     f"| {cell(first)} | {', '.join(row['verdict'])}{cell(extra)} |")
    lines += ["", "## Server (benchmarks/run_serving_fuzz.py)", ""]
    if s.get("missing"):
        lines.append(f"No results file at {s['source']}.")
    else:
        lines += [
            f"From `{s['source']}` ({'run by this script' if s['mode'] == 'run' else 'its latest run, read'}): "
            f"`{s['command']}` at {s['date']}.", "",
            f"- {s['requests']} malformed HTTP requests, {s['stalled']} stalled connections, {s['grpc_requests']} "
            f"malformed gRPC messages (codes {s['grpc_codes']})",
            "- " + ", ".join(f"{k}: **{v}**" for k, v in s["checks"].items()),
            f"- server RSS {s['rss_mb_start']} MB at start, {s['rss_mb_before']} MB warmed up, {s['rss_mb_after']} MB "
            f"after: ratio **{s['rss_ratio']}** to the warmed-up RSS ({s['rss_ratio_to_start']} to the start; target "
            "<= 1.2)",
            f"- verdict: **{'clean' if s['ok'] else 'NOT clean'}**"]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout-s", type=float, default=60.0, help="Per case")
    ap.add_argument("--threads-timeout-s", type=float, default=30.0, help="The --threads 1000 cases (a hang there)")
    ap.add_argument("--serving", choices=["read", "run"], default="read",
                    help="read benchmarks/results/serving_fuzz.json, or run run_serving_fuzz.py first")
    ap.add_argument("--only", default=None, help="Run only the cases whose name holds this (not written)")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    rows: list[dict[str, Any]] = []
    try:
        art, pristine = prepare(work, args.timeout_s)
        env = {**os.environ, "TMPDIR": str(work / "tmp"), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        selected = [c for c in cases() if args.only is None or args.only in c.name]
        for i, case in enumerate(selected, 1):
            before = snapshot(work)
            timeout = args.threads_timeout_s if case.timeout_s == -1 else case.timeout_s or args.timeout_s
            row = run_case(case, work, art, timeout, env)
            rows.append(row)
            print(f"[{i}/{len(selected)}] {row['case']}: exit {row['exit_code']}, {', '.join(row['verdict'])} "
                  f"({row['wall_s']} s) {row['error_line'][:150]}", flush=True)
            restore(work, before, art, pristine)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(work.parent / f"{work.name}.pristine", ignore_errors=True)
    totals: dict[str, int] = {k: 0 for k in CLASSES}
    totals.update(Counter(v for row in rows for v in row["verdict"] if v != "clean"))
    totals["clean"] = sum(row["verdict"] == ["clean"] for row in rows)
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "machine": machine(), "timeout_s": args.timeout_s,
        "threads_timeout_s": args.threads_timeout_s, "wall_s": round(time.perf_counter() - t0, 1),
        "cases": len(rows), "totals": totals, "serving": serving(args.serving), "rows": rows}
    if args.only is None:
        j, m = write("hostile_cli_cpu", result, markdown(result))
        print(f"wrote {j} and {m}")
    print(", ".join(f"{k}: {v}" for k, v in totals.items()), "| server:", "clean" if result["serving"]["ok"]
          else "NOT clean")
    sys.exit(0 if totals["clean"] == len(rows) and result["serving"]["ok"] else 1)


if __name__ == "__main__":
    main()
