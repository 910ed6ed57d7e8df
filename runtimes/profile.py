"""Operator-level profiles: where the time of one model call goes.

Each runner says how it is profiled (``Runner.profiler``): ``ort`` with ONNX Runtime's own profiler
(``SessionOptions.enable_profiling``, set by ``runtimes.ort.session_options``), ``eager`` and
``torchscript`` with ``torch.profiler``. Both write a Chrome-trace JSON file that opens in Perfetto
(https://ui.perfetto.dev) or chrome://tracing, and both are summarised as the top operators by time
over the timed iterations (warm-up excluded). Models are loaded by the runners in ``runtimes/``,
from the artifact folder's manifest, exactly as ``bench`` loads them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import InputError
from core.flagtext import check_choice
from core.fsutil import atomic_path, check_not_an_input, check_output_file, ensure_writable_dir
from core.manifest import Manifest, artifact_files
from core.resources import check_feed_memory
from core.shapes import apply_input_shapes
from runtimes import RUNNERS
from runtimes.base import Device, Profiler, Runner, RunnerOptions, check_threads
from runtimes.harness import BenchConfig, Target, load_checked_manifest, select_targets
from runtimes.ort import OrtRunner


def profilable_backends() -> list[str]:
    """The backends ``profile`` can trace (``Runner.profiler`` set)."""
    return [name for name, cls in RUNNERS.items() if cls.profiler is not None]


class ProfileConfig(BaseModel):
    """A `profile` request."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: Path = Field(description="Folder with manifest.json (from `convert`)")
    backend: str = Field(default="ort", description="ort | eager | torchscript")
    variant: str | None = Field(default=None, description="Artifact name; default for ONNX backends: opt, else fp32")
    batch_size: int = Field(default=1, ge=1)
    input_shape: str | None = Field(default=None, description="Values of the inputs' dynamic dims, e.g. "
                                    "input_ids:1x128,attention_mask:1x128 (the batch comes from batch_size)")
    warmup: int = Field(default=5, ge=0, description="Untimed runs before profiling")
    iters: int = Field(default=20, ge=1, description="Profiled runs")
    device: Device = "cpu"
    threads: int | None = Field(default=None, ge=1)
    out: Path | None = Field(default=None, description="Trace file (default ARTIFACT_DIR/profile/<backend>_<variant>"
                                                       ".trace.json)")
    top: int = Field(default=15, ge=1, description="Operators listed in the summary")
    seed: int = 0

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, value: Any) -> Any:
        return check_choice(value, get_args(Device), "--device")

    @field_validator("threads")
    @classmethod
    def _threads_fit(cls, value: int | None) -> int | None:
        return check_threads(value)  # before anything is written: more threads than CPUs is refused


class OpStat(BaseModel):
    """Time spent in one operator type over all profiled iterations (self time: children excluded)."""

    model_config = ConfigDict(extra="forbid")

    op: str
    calls: int
    total_ms: float
    pct: float = Field(description="Share of the summed operator time, %")


class ProfileResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str
    variant: str
    precision: str
    device: str
    batch_size: int
    input_shapes: dict[str, list[int]] = Field(default_factory=dict, description="Every input's profiled shape")
    iters: int
    trace: Path
    op_time_ms: float = Field(description="Summed operator self time over all profiled iterations")
    ops: list[OpStat] = Field(description="Every operator type, most expensive first")
    notes: list[str] = Field(default_factory=list)

    def top(self, n: int) -> list[OpStat]:
        return self.ops[:n]


def _rank(totals: dict[str, tuple[int, float]]) -> tuple[float, list[OpStat]]:
    """(summed ms, OpStats most expensive first) from op -> (calls, total ms)."""
    whole = sum(ms for _, ms in totals.values())
    ops = [OpStat(op=op, calls=calls, total_ms=ms, pct=100.0 * ms / whole if whole > 0 else 0.0)
           for op, (calls, ms) in totals.items()]
    return whole, sorted(ops, key=lambda o: (-o.total_ms, o.op))


def ort_op_times(events: list[dict[str, Any]], last_runs: int) -> dict[str, tuple[int, float]]:
    """Kernel time per ONNX op type inside the last ``last_runs`` ``model_run`` spans of an ORT trace."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[-last_runs:]
    windows = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in runs]
    totals: dict[str, tuple[int, float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if windows and not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        op = e.get("args", {}).get("op_name") or e["name"]
        calls, ms = totals.get(op, (0, 0.0))
        totals[op] = (calls + 1, ms + e.get("dur", 0) / 1e3)
    return totals


def _profile_ort(runner: Runner, prepared: Any, cfg: ProfileConfig, trace: Path) -> dict[str, tuple[int, float]]:
    """ONNX Runtime's profiler (on since the session was made: ``ort_profile_prefix``); the warm-up runs
    are in its trace too, and ``ort_op_times`` leaves them out."""
    if not isinstance(runner, OrtRunner):
        raise TypeError(f"{runner.name} has no ONNX Runtime session to profile")
    for _ in range(cfg.warmup):
        runner.run_once(prepared)
    for _ in range(cfg.iters):
        runner.run_once(prepared)
    written = runner.end_profiling()
    events = json.loads(written.read_text(encoding="utf-8"))
    with atomic_path(trace) as tmp:
        shutil.move(written, tmp)
    return ort_op_times(events, cfg.iters)


def _profile_torch(runner: Runner, prepared: Any, cfg: ProfileConfig, trace: Path) -> dict[str, tuple[int, float]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(cfg.warmup):
        runner.run_once(prepared)
    activities = [ProfilerActivity.CPU]
    on_gpu = cfg.device == "cuda"
    if on_gpu:
        activities.append(ProfilerActivity.CUDA)
    else:  # kineto logs "gpuGetDeviceCount failed" on machines without a GPU; it means nothing here
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=activities) as prof:
        for _ in range(cfg.iters):
            runner.run_once(prepared)
        if on_gpu:
            torch.cuda.synchronize()
    with atomic_path(trace) as tmp:
        prof.export_chrome_trace(str(tmp))
    totals: dict[str, tuple[int, float]] = {}
    for avg in prof.key_averages():
        us = (getattr(avg, "self_device_time_total", 0.0) or 0.0) if on_gpu else avg.self_cpu_time_total
        if us > 0:
            totals[avg.key] = (int(avg.count), us / 1e3)
    return totals


#: ``Runner.profiler`` -> how its operator times are collected.
PROFILERS: dict[Profiler, Callable[[Runner, Any, ProfileConfig, Path], dict[str, tuple[int, float]]]] = {
    "onnxruntime": _profile_ort, "torch": _profile_torch}


def _profiler_of(backend: str) -> Profiler:
    """How ``backend`` is profiled; a backend without a profiler is one clear InputError."""
    runner_cls = RUNNERS.get(backend)
    if runner_cls is None or runner_cls.profiler is None:
        raise InputError(f"cannot profile backend {backend!r}; choose one of {', '.join(profilable_backends())}")
    return runner_cls.profiler


def _pick_target(manifest: Manifest, cfg: ProfileConfig) -> Target:
    bench_cfg = BenchConfig(artifact_dir=cfg.artifact_dir, backends=[cfg.backend], batch_sizes=[cfg.batch_size],
                            device=cfg.device, threads=cfg.threads)
    targets = select_targets(manifest, bench_cfg)
    if cfg.variant is not None:
        found = [t for t in targets if t.artifact.name == cfg.variant]
        if not found:
            raise InputError(f"{cfg.backend} cannot run variant {cfg.variant!r}; it can run: "
                             f"{', '.join(t.artifact.name for t in targets)}")
        return found[0]
    # The optimized graph is what a user deploys with ONNX Runtime; profile it unless told otherwise.
    return next((t for t in targets if t.artifact.name == manifest.best_fp32()), targets[0])


def run_profile(cfg: ProfileConfig, log: Callable[[str], None] = print) -> ProfileResult:
    """Load the chosen runner from the manifest, run warm-up + profiled iterations, write the trace."""
    manifest = load_checked_manifest(BenchConfig(artifact_dir=cfg.artifact_dir, batch_sizes=[cfg.batch_size]))
    profiler = _profiler_of(cfg.backend)
    target = _pick_target(manifest, cfg)
    runner_cls = RUNNERS[cfg.backend]
    trace = cfg.out or Path(cfg.artifact_dir) / "profile" / f"{cfg.backend}_{target.artifact.name}.trace.json"
    check_output_file(trace, "--out", "trace.json")
    check_not_an_input(trace, "--out", artifact_files(cfg.artifact_dir))
    spec, _ = apply_input_shapes(manifest.iospec, cfg.input_shape)
    if unbound := spec.unbound_dims():
        raise InputError(f"the model's dim(s) {', '.join(unbound)} have no value: give them with --input-shape")
    check_feed_memory(spec, cfg.batch_size, f"--batch-size {cfg.batch_size}")
    ensure_writable_dir(trace.parent)  # only once the request is known to be good: a refused one creates nothing
    feed = spec.random_feed(cfg.batch_size, seed=cfg.seed)
    shapes = {n: list(a.shape) for n, a in feed.items()}
    log(f"profiling {cfg.backend}:{target.artifact.name} ({target.precision}, {cfg.device}) at "
        + ", ".join(f"{n} {'x'.join(map(str, v))}" for n, v in shapes.items())
        + f": {cfg.warmup} warm-up + {cfg.iters} profiled runs")
    with tempfile.TemporaryDirectory(prefix=".profile-", dir=trace.parent) as scratch:
        opts = RunnerOptions(device=cfg.device, threads=cfg.threads, precision=target.precision,
                             ort_profile_prefix=os.path.join(scratch, "ort")
                             if profiler == "onnxruntime" else None)
        with runner_cls(manifest, Path(cfg.artifact_dir), target.artifact, opts) as runner:
            prepared = runner.prepare(feed)
            totals = PROFILERS[profiler](runner, prepared, cfg, trace)
    whole, ops = _rank(totals)
    top3 = {o.op for o in ops[:3]}
    notes = [note for op, note in runner_cls.profile_notes.items() if op in top3]
    return ProfileResult(backend=cfg.backend, variant=target.artifact.name, precision=target.precision,
                         device=cfg.device, batch_size=cfg.batch_size, input_shapes=shapes, iters=cfg.iters,
                         trace=trace,
                         op_time_ms=whole, ops=ops, notes=notes)


def top_ops_table(result: ProfileResult, n: int) -> Any:
    from rich.table import Table

    table = Table(title=f"top operators: {result.backend}:{result.variant} ({result.precision}, {result.device}), "
                        f"batch {result.batch_size}, {result.iters} runs")
    for col in ("operator", "calls", "total ms", "ms per run", "% of op time"):
        table.add_column(col, justify="left" if col == "operator" else "right")
    for o in result.top(n):
        table.add_row(o.op, str(o.calls), f"{o.total_ms:.3f}", f"{o.total_ms / result.iters:.3f}", f"{o.pct:.1f}")
    return table
