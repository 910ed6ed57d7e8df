"""The two kinds of cell, run where the executor puts them (this process or a Ray worker).

Each calls the library functions the CLI calls (``run_convert``, ``run_bench``), so a sweep row is the
record ``bench`` writes. A cell never raises: a failure becomes its state, with a one-line error, and the
state file is written (atomically) before the cell returns, so a re-run knows what is done.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

from core.errors import AccuracyGateError, first_line
from core.manifest import utc_now
from sweep.cells import BenchCell, CellState, ConvertCell, artifact_dir, cpu_model, write_state


def _node() -> str:
    """Hostname, plus the Ray node id when running in a Ray worker."""
    host = platform.node()
    try:
        import ray

        if ray.is_initialized():
            return f"{host} (ray node {ray.get_runtime_context().get_node_id()[:12]})"
    except Exception:
        pass
    return host


def _gpu(device: str) -> str | None:
    if device != "cuda":
        return None
    try:
        import torch

        return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    except Exception:
        return None


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op threads for the cell (restored after): the same in this process and on Ray, where a
    worker would otherwise take OMP_NUM_THREADS from the task's num_cpus."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finish(out: Path, state: CellState, t0: float) -> CellState:
    state.finished_at = utc_now()
    state.wall_s = time.perf_counter() - t0
    write_state(out, state)
    return state


def run_convert_cell(cell: ConvertCell, out: Path) -> CellState:
    """Convert one model with one option set into OUT/cells/KEY/artifacts. A variant outside its accuracy
    gate is a verdict, not a failure: the cell is done (the variant is marked failed in the manifest)."""
    from convert.pipeline import run_convert

    t0 = time.perf_counter()
    folder = artifact_dir(out, cell.key)
    state = CellState(key=cell.key, kind="convert", status="done", node=_node(), cpu_model=cpu_model(),
                      started_at=utc_now(), artifact_dir=str(folder))
    try:
        cfg = cell.conversion.to_config(cell.model, folder)
        with _torch_threads(cell.threads):
            run_convert(cfg, log=lambda _m: None)
    except AccuracyGateError as exc:
        state.notes.append(first_line(exc))
    except Exception as exc:  # recorded, never raised: the other cells go on
        state.status, state.error = "failed", first_line(exc, with_type=True)
    return _finish(out, state, t0)


def run_bench_cell(cell: BenchCell, out: Path, convert: CellState) -> CellState:
    """Bench one (backend, variant, device, batch size) on the convert cell's artifacts; skipped (with the
    reason) when that convert cell did not finish."""
    from runtimes.harness import BenchConfig, run_bench

    t0 = time.perf_counter()
    state = CellState(key=cell.key, kind="bench", status="done", node=_node(), cpu_model=cpu_model(),
                      gpu=_gpu(cell.device), started_at=utc_now())
    if convert.status != "done" or convert.artifact_dir is None:
        state.status = "skipped"
        state.error = f"convert {cell.model} ({cell.conversion}) {convert.status}: {convert.error or 'no artifacts'}"
        return _finish(out, state, t0)
    try:
        data = cell.bench.get("data")
        cfg = BenchConfig(artifact_dir=Path(convert.artifact_dir), backends=[cell.backend],
                          batch_sizes=[cell.batch_size], warmup=cell.bench["warmup"], iters=cell.bench["iters"],
                          rounds=cell.bench["rounds"], accuracy_samples=cell.bench["accuracy_samples"],
                          device=cell.device, threads=cell.threads, variants=[cell.variant],
                          data=_data_path(data))
        with _torch_threads(cell.threads):
            results = run_bench(cfg, log=lambda _m: None)
        state.records = results.records
        state.notes.extend(results.warnings)
    except Exception as exc:
        state.status, state.error = "failed", first_line(exc, with_type=True)
    return _finish(out, state, t0)


def _data_path(data: str | None) -> Path | None:
    """The accuracy checks' image folder: a built-in set's folder on this node, or the path as given."""
    from calibration.builtin import builtin_names, builtin_path

    if data is None:
        return None
    return builtin_path(data) if data in builtin_names() else Path(data)


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
