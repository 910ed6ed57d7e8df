"""Pydantic result models. ``results.json`` is the source of truth; every other format derives from it."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from core.errors import InputError
from core.manifest import library_versions, utc_now
from core.metrics import AccuracyStats, LatencyStats
from reports.generation import GenerationResults

#: 2: records carry the dims' values and every input's shape (version 1 files are read, without them)
RESULTS_SCHEMA_VERSION = 2



class BenchRecord(BaseModel):
    """One (backend, variant, batch size) measurement."""

    model_config = ConfigDict(extra="forbid")

    model: str
    backend: str
    variant: str = Field(description="Manifest artifact name (e.g. 'opt', 'int8_static_minmax')")
    precision: str
    device: str
    batch_size: int
    latency_ms: LatencyStats
    throughput: float = Field(description="Samples per second = batch_size / mean latency")
    ram_mb: float | None = Field(default=None, description="Peak process RSS while this target loaded and ran the "
                                                           "accuracy pool (targets loaded before it stay loaded) (MB)")
    ram_delta_mb: float | None = Field(default=None, description="That peak minus the RSS before its load: this "
                                                                 "target's own memory (MB)")
    vram_mb: float | None = Field(default=None, description="Peak GPU memory (MB)")
    cpu_util: float | None = Field(default=None, description="Process CPU use over the timed blocks, % of the CPUs "
                                                             "the process may use (its affinity)")
    gpu_util: float | None = Field(default=None, description="Mean GPU utilisation over the timed loop (%)")
    model_size_mb: float | None = None
    gflop: float | None = Field(default=None, description="Arithmetic of one call: 2 x the multiply-accumulates of "
                                                          "its Conv/MatMul/Gemm ops (core.flops), in GFLOP")
    peak_fraction: float | None = Field(default=None, description="gflop / p50 as a fraction of this machine's "
                                                                  "measured matrix-multiply peak of the row's own "
                                                                  "precision (CPU; peak_basis says which). Results "
                                                                  "without peak_basis divided every row by FP32's")
    peak_precision: str | None = Field(default=None, description="The precision whose peak peak_fraction is divided "
                                                                 "by (the row's own), None when there is none")
    peak_basis: str | None = Field(default=None, description="The peak peak_fraction is divided by, e.g. 'int8 GEMM "
                                                             "(onnxruntime MatMulInteger u8s8) 205 GOP/s', or why the "
                                                             "row has none ('no fp16 peak measured on this CPU')")
    load_s: float | None = None
    input_digest: str = Field(description="sha256 prefix of the exact inputs: equal across backends")
    accuracy: AccuracyStats | None = None
    accuracy_drop: float | None = Field(default=None, description="Points lost against the FP32 reference, graded "
                                                                  "as convert's gates and tune grade it")
    accuracy_basis: str | None = Field(default=None, description="What accuracy_drop measures (e.g. top-1 "
                                                                 "agreement with FP32 on held-out data)")
    dims: dict[str, int] = Field(default_factory=dict, description="Values of the symbolic dims other than "
                                                                   "the batch when they were swept (--dims)")
    input_shapes: dict[str, list[int]] = Field(default_factory=dict, description="Every input's shape as run")
    notes: list[str] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)


def machine_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }
    try:
        from calibration.cpu import cpu_features  # optional: added with INT8 support

        cpu = cpu_features()
        # The CPU by name and ISA ("AMD EPYC 7B13", "AVX2, FMA; no AVX-512, no VNNI"): what a reader needs to
        # judge the timings; the hostname and platform.processor() ('x86_64' or '') say neither.
        info["cpu_model"] = cpu.model or info["processor"]
        info["cpu_isa"] = cpu.isa
        info["cpu_flags"] = cpu.model_dump()
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


class BenchResults(BaseModel):
    """``results.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = RESULTS_SCHEMA_VERSION
    kind: str = Field(default="bench", description="bench | loadtest")
    created_at: str = Field(default_factory=utc_now)
    model: str
    artifact_dir: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    machine: dict[str, Any] = Field(default_factory=machine_info)
    versions: dict[str, str] = Field(default_factory=library_versions)
    records: list[BenchRecord] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    accuracy_inputs: str | None = Field(default=None, description="What accuracy was graded on: 'held-out' (the "
                                                                  "artifact's own), 'data' (--data) or 'random'")
    generation: GenerationResults | None = Field(default=None, description="A KV-cache decoder's generation "
                                                                          "benchmark (runtimes.generation)")

    @classmethod
    def load(cls, path: Path) -> BenchResults:
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path} is a folder; expected a results JSON file written by bench or loadtest, e.g. "
                             f"{path / 'results.json'}")
        if not path.is_file():
            raise InputError(f"results file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not a readable results JSON file: {exc}") from None
        if isinstance(data, dict) and data.get("schema_version") == 1:
            data = {**data, "schema_version": RESULTS_SCHEMA_VERSION}  # version 2 only adds fields with defaults
        if not isinstance(data, dict) or data.get("schema_version") != RESULTS_SCHEMA_VERSION:
            got = data.get("schema_version") if isinstance(data, dict) else None
            raise InputError(f"{path} has results schema_version {got!r}; this toolkit reads 1 and "
                             f"{RESULTS_SCHEMA_VERSION}")
        try:
            results = cls.model_validate(data)
        except PydanticValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise InputError(f"{path} does not match the results schema: {loc}: {first['msg']}") from None
        if problems := record_problems(results.records):
            raise InputError(f"{path} holds impossible measurements: {'; '.join(problems[:3])}"
                             + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
                             + "; a batch is >= 1, latencies and throughput are finite and >= 0, p50 and mean > 0")
        return results


def record_problems(records: list[BenchRecord]) -> list[str]:
    """What no measurement can be (a file edited by hand, or corrupted): a batch below 1; a latency or
    throughput that is negative, NaN or infinite; a p50 or mean latency of 0 (nothing to compare against)."""
    problems: list[str] = []
    for i, r in enumerate(records):
        where = f"records[{i}] ({r.backend}/{r.variant}, batch {r.batch_size})"
        if r.batch_size < 1:
            problems.append(f"{where}: batch_size {r.batch_size} < 1")
        lat = r.latency_ms
        values = {f"latency_ms.{k}": getattr(lat, k) for k in ("p50", "p90", "p99", "mean", "min", "max", "std")}
        values["throughput"] = r.throughput
        bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v) or v < 0]
        bad += [f"latency_ms.{k} 0" for k in ("p50", "mean") if getattr(lat, k) == 0]
        if bad:
            problems.append(f"{where}: {', '.join(bad)}")
    return problems
