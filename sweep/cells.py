"""Sweep cells, their content keys and their state files.

A cell's key is the sha256 of everything that decides its result: the model file's digest (or the
torchvision name and its weights' digest), the options, the library versions and the machine (CPU model,
and the GPU for CUDA cells). A re-run of the same plan on the same machine finds the same keys, and the
state file ``OUT/cells/KEY/state.json`` says whether the cell is done. State files are written atomically:
a killed run leaves either the old state or the new one, never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError
from core.fsutil import atomic_write_text, sha256_file
from core.manifest import library_versions
from reports.models import BenchRecord
from sweep.plan import Conversion, ModelEntry, PlanConfig

CellKind = Literal["convert", "bench"]
CellStatus = Literal["done", "failed", "skipped"]
KEY_CHARS = 20
STATE_NAME = "state.json"


class ConvertCell(BaseModel):
    """One model converted with one conversion option set."""

    model_config = ConfigDict(extra="forbid")

    key: str
    model: ModelEntry
    conversion_name: str
    conversion: Conversion
    threads: int


class BenchCell(BaseModel):
    """One (converted model, backend, variant, device, batch size) measured with the plan's settings."""

    model_config = ConfigDict(extra="forbid")

    key: str
    convert_key: str
    model: str = Field(description="The model's label in the plan")
    conversion: str
    backend: str
    variant: str
    device: Literal["cpu", "cuda"]
    batch_size: int
    threads: int
    bench: dict[str, Any] = Field(description="warmup, iters, rounds, accuracy_samples, data")


class CellState(BaseModel):
    """``OUT/cells/KEY/state.json``: what happened to one cell."""

    model_config = ConfigDict(extra="forbid")

    key: str
    kind: CellKind
    status: CellStatus
    error: str | None = Field(default=None, description="One line: why it failed or was skipped")
    notes: list[str] = Field(default_factory=list, description="E.g. a variant that failed its accuracy gate")
    node: str = Field(default="", description="Hostname (and Ray node id) where it ran")
    cpu_model: str = ""
    gpu: str | None = Field(default=None, description="GPU name for CUDA cells")
    started_at: str = ""
    finished_at: str = ""
    wall_s: float = 0.0
    artifact_dir: str | None = Field(default=None, description="Convert cells: the artifact folder")
    records: list[BenchRecord] = Field(default_factory=list, description="Bench cells: the rows bench wrote")


def cpu_model() -> str:
    from calibration.cpu import cpu_features

    return cpu_features().model or platform.processor() or platform.machine()


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def _file_digest(path: Path) -> str:
    if path.is_file():
        return "sha256:" + sha256_file(path)
    if path.is_dir():  # hf: folders: every file by relative path and hash
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return "tree:" + _digest({str(p.relative_to(path)): sha256_file(p) for p in files})
    return f"missing:{path}"  # the convert cell fails with convert's own message; the key is still defined


def model_digest(entry: ModelEntry) -> dict[str, str]:
    """What identifies the model's content: a file's (or folder's) hash, or a torchvision name (and its
    weights: a local file by hash, a weights name as given)."""
    from core.hf import is_hf
    from core.models import factory_parts

    spec = entry.model.strip()
    if is_hf(spec):
        src = _file_digest(Path(spec.removeprefix("hf:")))
    elif (parts := factory_parts(spec)) is not None:
        src = f"{_file_digest(Path(parts[0]))}:{parts[1]}"
    elif spec.lower().endswith((".onnx", ".pt", ".pth", ".ts", ".jit")):
        src = _file_digest(Path(spec))
    else:
        src = f"torchvision:{spec}"
    weights = None
    if entry.weights:
        weights = _file_digest(Path(entry.weights)) if Path(entry.weights).exists() else entry.weights
    return {"source": src, "weights": weights or "", "input_shape": entry.input_shape or ""}


def _data_digest(data: str | None) -> str | None:
    from calibration.builtin import builtin_names

    if data is None or data in builtin_names():
        return data  # a built-in set comes with the library version
    return _file_digest(Path(data))


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = library_versions()
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["onnxkit"] = metadata.version("onnxkit")
    return out


def expand(plan: PlanConfig) -> tuple[list[ConvertCell], list[BenchCell]]:
    """Every cell of ``plan``, keyed by content. ONNX backends bench each of the plan's variants; PyTorch
    backends (eager, torchscript, compile) run the model's weights, so they get one cell (variant torch)."""
    from runtimes import RUNNERS

    versions, machine = _versions(), cpu_model()
    converts: list[ConvertCell] = []
    benches: list[BenchCell] = []
    settings = {"warmup": plan.warmup, "iters": plan.iters, "rounds": plan.rounds,
                "accuracy_samples": plan.accuracy_samples,
                "data": _data_digest(plan.data)}
    for entry in plan.models:
        for cname, conv in plan.conversions.items():
            ckey = _digest({"kind": "convert", "model": model_digest(entry), "options": conv.model_dump(mode="json"),
                            "threads": plan.threads, "versions": versions, "machine": machine})
            converts.append(ConvertCell(key=ckey, model=entry, conversion_name=cname, conversion=conv,
                                        threads=plan.threads))
            for backend in plan.backends:
                variants = ["torch"] if RUNNERS[backend].needs_weights else plan.variants
                for variant in variants:
                    for device in plan.devices:
                        for batch in plan.batch_sizes:
                            what = {"kind": "bench", "convert": ckey, "backend": backend, "variant": variant,
                                    "device": device, "batch": batch, "threads": plan.threads, "bench": settings,
                                    "versions": versions, "machine": machine}
                            benches.append(BenchCell(key=_digest(what), convert_key=ckey, model=entry.label,
                                                     conversion=cname, backend=backend, variant=variant,
                                                     device=device, batch_size=batch, threads=plan.threads,
                                                     bench=settings | {"data": plan.data}))
    return converts, benches


def state_path(out: Path, key: str) -> Path:
    return Path(out) / "cells" / key / STATE_NAME


def artifact_dir(out: Path, key: str) -> Path:
    """Where a convert cell's artifacts live: under OUT, which every task must see (a shared file system on a
    multi-node Ray cluster)."""
    return Path(out) / "cells" / key / "artifacts"


def read_state(out: Path, key: str) -> CellState | None:
    """The cell's recorded state, or None when it never finished (or its file is unreadable: run it again)."""
    path = state_path(out, key)
    if not path.is_file():
        return None
    try:
        return CellState.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_state(out: Path, state: CellState) -> None:
    atomic_write_text(state_path(out, state.key), state.model_dump_json(indent=2) + "\n")


def check_out(out: Path) -> Path:
    """OUT must be a folder (created when missing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; expected a folder for the sweep's cells and results")
    return out
