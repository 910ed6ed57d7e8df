"""Helpers shared by the benchmark scripts: machine description, converting once, writing results."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    from reports.models import machine_info

    return {"cpu_model": cpu_model(), **machine_info()}


def ensure_converted(model: str, out: Path, extra: list[str] | None = None) -> Path:
    """Convert ``model`` with the CLI unless ``out`` already holds a manifest. A variant that fails its accuracy gate
    (exit 5) is a verdict, not a failure: the folder is written with that variant marked failed (bench leaves it out),
    as vit_b_16's INT8 variants are once its head measures something."""
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, str(ROOT / "cli.py"), "convert", model, "--out", str(out), *(extra or [])]
        done = subprocess.run(cmd, check=False, cwd=ROOT)
        if done.returncode not in (0, 5):
            raise subprocess.CalledProcessError(done.returncode, cmd)
    return out


def convert_row(source: str, out: Path, flags: list[str], fresh: bool, timeout: float = 3600) -> dict[str, Any]:
    """``cli.py convert SOURCE --out OUT FLAGS`` unless ``out`` holds a manifest from an earlier run (and not ``fresh``):
    what a coverage row records of it (exit code, seconds, command; ``reused`` instead when not run) and ``error``, the
    last ``error:`` line, when it wrote no manifest or exited with other than 0 or 5 (a gate failure is a verdict)."""
    import shutil
    import time

    if not fresh and (out / "manifest.json").is_file():
        return {"seconds": 0.0, "reused": str(out)}
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "cli.py"), "convert", source, "--out", str(out), *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=timeout)
    row: dict[str, Any] = {"exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                           "command": " ".join(cmd[1:])}
    if proc.returncode not in (0, 5) or not (out / "manifest.json").is_file():
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
        row["error"] = errors[-1] if errors else (proc.stdout + proc.stderr).strip().splitlines()[-1:]
    return row


def convert_run_args(doc: str | None, models: Sequence[str], work: str, name: str,
                     extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The command line of a script that converts each of ``models`` once into ``--work`` (see :func:`convert_row`):
    ``--only`` (checked against ``models``, one clear line and exit 1 for another; ``args.only`` becomes the list),
    ``--work`` (default artifacts/WORK), ``--name`` (the results file), ``--fresh``; ``extra`` adds the script's own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(models), help="comma-separated models of MODELS")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / work))
    ap.add_argument("--name", default=name)
    ap.add_argument("--fresh", action="store_true", help="convert again where --work holds a folder from before")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    args.only = args.only.split(",")
    if unknown := [m for m in args.only if m not in models]:
        sys.exit(f"unknown --only {','.join(unknown)}; choose from {','.join(models)}")
    return args


def header_lines(title: str, payload: dict[str, Any]) -> list[str]:
    """A results file's opening: its title, the command, and the CPU with the run's seconds and library versions
    (``payload``'s command, machine, seconds and versions)."""
    from calibration.cpu import describe_cpu

    return [f"# {title}", "", f"Command: `{payload['command']}`", "",
            f"CPU: {describe_cpu(payload['machine'])}; {payload['seconds']:.0f} s; versions: "
            + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()), ""]


def write(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    j.write_text(json.dumps(payload, indent=2) + "\n")
    m.write_text(markdown)
    return j, m


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a server process, killing it when it does not exit within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
