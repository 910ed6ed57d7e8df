"""Results files for the report tests: the checked-in real runs, and hand-made variations of them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

RESULTS = ROOT / "tests" / "fixtures" / "results"
#: Real `bench` runs of resnet18 at 64x64 on CPU (eager, torchscript, ort fp32/opt; batch 1 and 4):
#: default threads, and --threads 1.
R18 = RESULTS / "r18_cpu.json"
R18_1T = RESULTS / "r18_cpu_1thread.json"


def load(path: Path = R18) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save(data: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def scale_latency(rec: dict[str, Any], factor: float) -> None:
    """Every latency statistic times ``factor``; throughput follows."""
    for k in ("p50", "p90", "p99", "mean", "min", "max", "std"):
        rec["latency_ms"][k] *= factor
    rec["throughput"] /= factor


def add_variant(data: dict[str, Any], like: tuple[str, str], variant: str, precision: str, latency_factor: float,
                agreement: float) -> None:
    """Copies of the records of (backend, variant) ``like`` as a new variant with other speed and accuracy."""
    for rec in [r for r in data["records"] if (r["backend"], r["variant"]) == like]:
        new = copy.deepcopy(rec)
        new["variant"], new["precision"] = variant, precision
        scale_latency(new, latency_factor)
        new["accuracy"]["top1_agreement"] = agreement
        data["records"].append(new)
