"""Run a sweep: every convert cell, then every bench cell, in this process or as Ray tasks.

Two phases: the convert cells first (in parallel on Ray), then the bench cells, so a conversion never
runs beside a measurement. On Ray every bench cell is a task with ``num_cpus`` equal to the threads it
measures with (and ``num_gpus=1`` for CUDA cells): Ray never runs more of them at once than the node has
CPUs, so two measurements do not share cores (Ray's CPU accounting is logical; it does not pin). Artifacts
move through OUT, which every task reads and writes: on a multi-node cluster OUT must be on a file system
all nodes mount at the same path, and every node needs onnxkit installed.

A re-run finds each cell by its content key: a done cell is reused, a failed or skipped one runs again
(``skip_failed`` keeps failed ones as recorded).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.errors import BackendUnavailableError, InputError, first_line
from core.manifest import MANIFEST_NAME, utc_now
from sweep.cells import CellState, check_out, expand, read_state, write_state
from sweep.plan import PlanConfig
from sweep.results import SweepResults, combine, write_sweep
from sweep.tasks import affinity_cpus, run_bench_cell, run_convert_cell

Progress = Callable[[int, int, str], None]


class SweepConfig(BaseModel):
    """A sweep request."""

    model_config = ConfigDict(extra="forbid")

    plan: PlanConfig
    out: Path = Field(description="Folder for the cells (OUT/cells/KEY) and the combined results")
    ray: str | None = Field(default=None, description="None: this process, one cell after another; 'local': a "
                                                      "Ray started here; 'auto' or an address: a running cluster")
    skip_failed: bool = Field(default=False, description="Keep failed cells as recorded instead of retrying them")


@dataclass
class Job:
    """One cell to run: the function, its arguments and the resources it needs."""

    key: str
    kind: str
    label: str
    fn: Callable[..., CellState]
    args: tuple[Any, ...]
    num_cpus: int
    num_gpus: int = 0


@dataclass
class SweepOutcome:
    results: SweepResults
    paths: dict[str, Path]
    ran: list[str] = field(default_factory=list)


class LocalExecutor:
    """This process, one cell after another."""


    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, CellState]]:
        for job in jobs:
            yield job, job.fn(*job.args)

    def close(self) -> None:
        pass


def _failed(job: Job, error: str) -> CellState:
    now = utc_now()
    return CellState(key=job.key, kind=job.kind, status="failed", error=error,  # type: ignore[arg-type]
                     started_at=now, finished_at=now)


class RayExecutor:
    """Each cell a Ray task with explicit resources. ``local`` starts Ray here (every CPU this process may
    use) unless this process already joined one; ``auto`` or an address joins a running cluster."""

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise BackendUnavailableError("--ray needs Ray: pip install .[ray]") from None
        self.ray, self.owned = ray, False
        self.temp_dir: str | None = None  # the session folder of a Ray started here: removed by close()
        if not ray.is_initialized():
            try:
                if address == "local":
                    # its own folder, not Ray's shared $TMPDIR/ray, where every session would stay behind
                    self.temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths inside stay < 108 bytes
                    ray.init(num_cpus=affinity_cpus(), include_dashboard=False, log_to_driver=False,
                             _temp_dir=self.temp_dir)
                else:
                    ray.init(address=address, log_to_driver=False)
            except Exception as exc:
                self.close()
                raise BackendUnavailableError(f"could not start or join Ray ({address}): {first_line(exc)}") from None
            self.owned = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.max_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        self.max_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        # Workers import this code base: the driver's own copy first (a source checkout), then what is installed.
        root = str(Path(__file__).resolve().parents[1])
        self.env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}}

    def _infeasible(self, job: Job) -> str | None:
        """A task no node can ever run would wait forever: one line instead."""
        if job.num_gpus > self.max_gpus:
            return "BackendUnavailableError: needs a GPU; no node of the Ray cluster has one"
        if job.num_cpus > self.max_cpus:
            return (f"BackendUnavailableError: needs {job.num_cpus} CPUs (threads); the largest Ray node has "
                    f"{self.max_cpus:g}")
        return None

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, CellState]]:
        ray = self.ray
        pending: dict[Any, Job] = {}
        for job in jobs:
            if (why := self._infeasible(job)) is not None:
                yield job, _failed(job, why)
                continue
            task = ray.remote(job.fn).options(num_cpus=job.num_cpus, num_gpus=job.num_gpus, max_retries=0,
                                              name=f"{job.kind}:{job.label}", runtime_env=self.env)
            pending[task.remote(*job.args)] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                state = ray.get(done[0])
            except Exception as exc:  # the worker died (killed, out of memory): the cell is failed, not the sweep
                state = _failed(job, f"ray task failed: {first_line(exc, with_type=True)}")
            yield job, state

    def close(self) -> None:
        if self.owned or (self.ray.is_initialized() and self.temp_dir is not None):
            self.ray.shutdown()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def check_local_threads(cfg: SweepConfig) -> None:
    """A sweep run here (in this process or a Ray started here) with more threads per cell than this process may
    use is one clear line before anything runs or is written: every cell would run that many busy threads on the
    few CPUs there are (bench refuses such a count itself), or wait for a Ray node that cannot exist."""
    ray = sys.modules.get("ray")
    if cfg.ray not in (None, "local") or (cfg.ray == "local" and ray is not None and ray.is_initialized()):
        return  # a cluster's nodes (or a Ray this process joined) may have other CPUs: Ray says which cells no node can run
    if cfg.plan.threads > (cpus := affinity_cpus()):
        where = "this process" if cfg.ray is None else "the Ray started here (--ray local)"
        raise InputError(f"plan threads: {cfg.plan.threads} is more than the {cpus} CPU(s) {where} may use: give "
                         f"at most {cpus} (more threads than CPUs only compete for them)")


def _reusable(state: CellState | None, skip_failed: bool) -> bool:
    if state is None:
        return False
    if state.kind == "convert" and state.status == "done":
        return state.artifact_dir is not None and (Path(state.artifact_dir) / MANIFEST_NAME).is_file()
    return state.status == "done" or (skip_failed and state.status == "failed")


def _phase(executor: LocalExecutor | RayExecutor, jobs: list[Job], out: Path, states: dict[str, CellState],
           counter: list[int], total: int, progress: Progress | None) -> None:
    for job, state in executor.run(jobs):
        write_state(out, state)  # the task wrote it too, unless it never started or died
        states[job.key] = state
        counter[0] += 1
        if progress:
            progress(counter[0], total, f"{job.label}: {state.status}")


def run_sweep(cfg: SweepConfig, log: Callable[[str], None] = print,
              progress: Progress | None = None) -> SweepOutcome:
    """Run every cell of the plan not already done; write OUT/results.json and OUT/report.md."""
    check_local_threads(cfg)
    t0 = time.perf_counter()
    out = check_out(cfg.out).resolve()
    converts, benches = expand(cfg.plan)
    states: dict[str, CellState] = {}
    for key in [c.key for c in converts] + [b.key for b in benches]:
        if _reusable(st := read_state(out, key), cfg.skip_failed) and st is not None:
            states[key] = st
    reused = set(states)
    todo_c = [c for c in converts if c.key not in states]
    todo_b = [b for b in benches if b.key not in states]
    total = len(todo_c) + len(todo_b)
    log(f"{len(reused)} of {len(converts) + len(benches)} cells already done; running {total}")
    # Ray starts only when there is work: a re-run that finds every cell done costs no cluster start-up
    executor: LocalExecutor | RayExecutor = LocalExecutor() if cfg.ray is None or not total else RayExecutor(cfg.ray)
    counter = [0]
    try:
        jobs = [Job(c.key, "convert", f"convert {c.model.label} ({c.conversion_name})", run_convert_cell, (c, out),
                    num_cpus=c.threads) for c in todo_c]
        _phase(executor, jobs, out, states, counter, total, progress)
        jobs = [Job(b.key, "bench", f"{b.model} {b.backend}/{b.variant} {b.device} batch {b.batch_size}",
                    run_bench_cell, (b, out, states[b.convert_key]), num_cpus=b.threads,
                    num_gpus=1 if b.device == "cuda" else 0) for b in todo_b]
        # a bench cell whose convert cell did not finish is recorded as skipped here, without a task
        runnable = [j for j in jobs if states[j.args[0].convert_key].status == "done"]
        _phase(LocalExecutor(), [j for j in jobs if j not in runnable], out, states, counter, total, progress)
        _phase(executor, runnable, out, states, counter, total, progress)
    finally:
        executor.close()
    name = "local" if cfg.ray is None else f"ray {cfg.ray}"
    results = combine(cfg.plan.model_dump(mode="json"), name, time.perf_counter() - t0, converts, benches, states,
                      reused)
    paths = write_sweep(results, out)
    return SweepOutcome(results=results, paths=paths, ran=[k for k in states if k not in reused])

