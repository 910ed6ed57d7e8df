"""run_deploy's head-to-head: tune's picks, every bench configuration and a GEMM timed in the same rounds.

On this shared CPU the machine's own speed drifts by far within minutes (run of 2026-12-03: the FP32 GEMM peak
measured during bench 322 GFLOP/s, after tune 209; every configuration tune timed was 1.4-1.9x slower than bench
had timed it minutes earlier, while each call kept both cores busy: not load in this VM, but the host). So a figure
from tune set against one from bench compares two moments, not two configurations. Here, per model and batch size,
one interleaved measurement (runtimes.timing: one block of each per round, the order rotated) holds:

- tune's winner, its best FP32, INT8, bf16 and fp16 candidate (those it timed), each with the settings tune chose;
- every bench configuration within the accuracy budget (its backend and variant at bench's defaults);
- OpenVINO's own ``benchmark_app -hint latency -api sync`` on the FP32 file with its defaults (nothing pinned: it
  computes in bf16 where the CPU has the units), the batch's shape fixed with ``-shape`` as its users give it
  (``BenchmarkAppRunner``: one benchmark_app process per round, ``-niter`` the round's calls; the round's figure is
  the median benchmark_app prints, so the row's p50 is the median of its rounds' medians and its interval theirs);
- the FP32 GEMM (core.flops.matmul_call) of the library with the highest peak before bench, n=1024.

Each row carries its accuracy drop (tune's for a pick, bench's for a bench row; none for benchmark_app, which
checks nothing). run_deploy's targets are read from these same-round figures only.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from core.metrics import LatencyStats
    from reports.models import BenchRecord
    from runtimes.base import RunnerOptions
    from runtimes.tune import Candidate

#: the GEMM timed with the models: n x n FP32
GEMM_N = 1024


class BenchmarkAppRunner:
    """OpenVINO's ``benchmark_app`` as a runner of ``runtimes.timing``: one call is one benchmark_app process
    (``benchmarks.run_fidelity.benchmark_app``: ``-hint latency -api sync``, ``-niter`` the calls asked for, an
    empty ``-load_config``: OpenVINO's defaults), its own untimed first inference included. The value returned for
    the call is the process's wall time (ms): always far above ``runtimes.timing.LONG_CALL_MS``, so the interleaving
    adds no untimed calls (each would be a process) and the block is that one run. What benchmark_app printed goes to
    ``runs`` (shared by every opening), keyed by that wall time, from which head_to_head reads the rounds' medians."""

    def __init__(self, path: Path, shape: str, runs: list[dict[str, Any]]) -> None:
        self.path, self.shape, self.runs = path, shape, runs

    def __enter__(self) -> BenchmarkAppRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def prepare(self, feed: dict[str, np.ndarray]) -> None:
        return None

    def time_iterations(self, prepared: Any, warmup: int, iters: int) -> list[float]:
        from benchmarks.run_fidelity import benchmark_app

        t0 = time.perf_counter_ns()
        try:
            run = benchmark_app(self.path, "", 0, 0.0, {}, shape=self.shape, niter=max(1, iters))
        except SystemExit as exc:  # its one-line failure; a run that worked before does not fail here in practice
            raise RuntimeError(str(exc)) from None
        wall = (time.perf_counter_ns() - t0) / 1e6
        self.runs.append(run | {"wall_ms": wall})
        return [wall]


def _tool_precision(settings: dict[str, str]) -> str:
    """benchmark_app's reported INFERENCE_PRECISION_HINT ("<Type: 'bfloat16'>") as a precision name."""
    hint = settings.get("INFERENCE_PRECISION_HINT", "")
    return next((p for k, p in (("bfloat16", "bf16"), ("float16", "fp16"), ("f16", "fp16"), ("bf16", "bf16"),
                                ("float32", "fp32"), ("f32", "fp32")) if k in hint), hint or "unknown")


def benchmark_app_row(runs: list[dict[str, Any]], rounds: list[list[float]], variant: str) -> dict[str, Any]:
    """The benchmark_app row of the head-to-head: per round, the median of the run timed in it (found by the wall
    time the runner returned); its precision as benchmark_app reported it."""
    from core.metrics import LatencyStats

    by_wall = {r["wall_ms"]: r for r in runs}
    timed = [by_wall[w] for r in rounds for w in r]
    medians = [r["median_ms"] for r in timed]
    lat = LatencyStats.from_samples(medians, [[m] for m in medians])
    precision = _tool_precision(timed[-1]["settings"])
    return {"config": f"benchmark_app -hint latency on {variant} (OpenVINO's defaults: computes in {precision})",
            "backend": "benchmark_app", "variant": variant, "precision": precision,
            "roles": ["benchmark_app default"], "latency_ms": lat.model_dump(mode="json"), "gflop": None,
            "peak_fraction": None, "accuracy_drop_points": None,
            "benchmark_app": {"command": timed[-1]["command"], "settings": timed[-1]["settings"],
                              "calls_per_round": [r["calls"] for r in timed]}}


class GemmRunner:
    """An n x n FP32 product timed as a runner is (runtimes.timing needs ``prepare`` and ``time_iterations``)."""

    def __init__(self, library: str, threads: int | None = None) -> None:
        self.library, self.threads = library, threads
        self.call: Callable[[], object] | None = None

    def __enter__(self) -> GemmRunner:
        from core.flops import matmul_call

        self.call = matmul_call(self.library, GEMM_N, self.threads)
        if self.call is None:
            raise RuntimeError(f"{self.library} is not installed")
        return self

    def __exit__(self, *exc: object) -> None:
        self.call = None

    def prepare(self, feed: dict[str, np.ndarray]) -> None:
        return None

    def time_iterations(self, prepared: Any, warmup: int, iters: int) -> list[float]:
        assert self.call is not None
        for _ in range(warmup):
            self.call()
        out = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            self.call()
            out.append((time.perf_counter_ns() - t0) / 1e6)
        return out


@dataclass
class Entry:
    """One configuration in the head-to-head."""

    key: str  # backend:variant (precision) [settings]
    backend: str
    variant: str
    precision: str
    options: RunnerOptions
    roles: list[str]  # "winner", "fp32 pick", "int8 pick", "bf16 pick", "fp16 pick", "bench"
    drop: float | None  # accuracy drop, points (tune's for a pick, bench's for a bench row)
    latency: LatencyStats | None = None


def _key(backend: str, variant: str, precision: str, options: RunnerOptions, defaults: RunnerOptions) -> str:
    diff = {k: v for k, v in options.model_dump().items() if k != "precision" and v != getattr(defaults, k)}
    return f"{backend}:{variant} ({precision}) [{', '.join(f'{k}={v}' for k, v in diff.items()) or 'defaults'}]"


def _entries(picks: dict[str, Candidate | None], records: list[BenchRecord], drop: Callable[[BenchRecord], float],
             budget: float) -> list[Entry]:
    from runtimes.base import RunnerOptions

    defaults = RunnerOptions()
    out: dict[str, Entry] = {}

    def add(backend: str, variant: str, precision: str, options: RunnerOptions, role: str, d: float | None) -> None:
        key = _key(backend, variant, precision, options, defaults)
        out.setdefault(key, Entry(key, backend, variant, precision, options, [], d)).roles.append(role)

    for role, c in picks.items():
        if c is not None:
            add(c.backend, c.variant, c.precision, RunnerOptions(precision=c.precision, **c.settings), role,
                c.accuracy_drop_points)
    for r in records:
        if drop(r) <= budget + 1e-9:  # bench's configuration: its defaults (BenchConfig: threads None, spinning on)
            add(r.backend, r.variant, r.precision, RunnerOptions(precision=r.precision), "bench", drop(r))
    return list(out.values())


def head_to_head(folder: Path, variants: list[str], batch: int, picks: dict[str, Candidate | None],
                 records: list[BenchRecord], drop: Callable[[BenchRecord], float], budget: float, gemm_library: str,
                 iters: int, rounds: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time tune's picks, every bench configuration within ``budget`` (points; ``drop``: a bench row's drop),
    benchmark_app with OpenVINO's defaults on the FP32 file and the GEMM side by side at ``batch``."""
    from core.flops import peak_fraction
    from core.metrics import LatencyStats
    from runtimes import RUNNERS
    from runtimes.harness import BenchConfig, prepare_bench
    from runtimes.timing import interleaved_within_memory

    entries = _entries(picks, records, drop, budget)
    backends = sorted({e.backend for e in entries})
    precisions = ["fp32", *(p for p in ("bf16", "fp16") if any(e.precision == p for e in entries))]
    setup = prepare_bench(BenchConfig(artifact_dir=folder, backends=backends, batch_sizes=[batch], variants=variants,
                                      seed=0, precisions=precisions), log)
    targets = {(t.backend, t.artifact.name, t.precision): t for t in setup.targets}
    digests = {r.input_digest for r in records}
    if digests and setup.digests[0] not in digests:  # bench's own inputs, or the comparison means nothing
        raise RuntimeError(f"head-to-head feed {setup.digests[0]} differs from bench's {sorted(digests)}")
    opens: list[Callable[[], Any]] = [
        functools.partial(RUNNERS[e.backend], setup.manifest, setup.base, targets[(e.backend, e.variant,
                                                                                     e.precision)].artifact, e.options)
        for e in entries]
    fp32 = setup.manifest.best_fp32()
    tool_file = folder / setup.manifest.artifacts[fp32].file.path
    shape = ",".join(f"{k}[{','.join(map(str, v.shape))}]" for k, v in setup.feeds[0].items())
    tool: dict[str, Any] = {"file": str(tool_file), "shape": shape}
    runs: list[dict[str, Any]] = []
    try:  # one short run first: a file or shape benchmark_app refuses is a line, not a failed head-to-head
        BenchmarkAppRunner(tool_file, shape, runs).time_iterations(None, 0, 1)
        opens.append(functools.partial(BenchmarkAppRunner, tool_file, shape, runs))
    except RuntimeError as exc:
        tool["error"] = str(exc)
        log(f"benchmark_app not timed: {exc}")
    opens.append(functools.partial(GemmRunner, gemm_library))
    log(f"head-to-head at batch {batch}: {len(entries)} configurations{'' if 'error' in tool else ' + benchmark_app'} "
        f"+ the {gemm_library} GEMM x {iters} calls in {rounds} interleaved rounds")
    t0 = time.perf_counter()
    timed = interleaved_within_memory(opens, setup.feeds[0], warmup=2, iters=iters, rounds=rounds)
    for e, tm in zip(entries, timed, strict=False):
        e.latency = LatencyStats.from_samples(tm.samples, tm.rounds)
    gemm = LatencyStats.from_samples(timed[-1].samples, timed[-1].rounds)
    gemm_gflops = 2 * GEMM_N**3 / 1e9 / (gemm.min / 1e3)
    rows: list[dict[str, Any]] = []
    for e in sorted(entries, key=lambda x: x.latency.p50 if x.latency else 0.0):
        assert e.latency is not None
        # the variant's own file's MACs (a complete stand-in's where its own count is not; none where only a lower
        # bound is known: its fraction would read as a miss); the GEMM of these rounds is FP32's: only FP32
        # configurations are read against it
        macs = setup.macs[e.variant]
        gflop, frac = peak_fraction(None if macs.lower_bound else macs.per_point[0], e.latency.p50,
                                    gemm_gflops if e.precision == "fp32" else None)
        rows.append({"config": e.key, "backend": e.backend, "variant": e.variant, "precision": e.precision,
                     "roles": e.roles, "latency_ms": e.latency.model_dump(mode="json"), "gflop": gflop,
                     "peak_fraction": None if frac is None else round(frac, 4), "accuracy_drop_points": e.drop})
    if "error" not in tool:
        rows.append(benchmark_app_row(runs, timed[-2].rounds, fp32))
        rows.sort(key=lambda r: r["latency_ms"]["p50"])
    return {"batch": batch, "seconds": round(time.perf_counter() - t0, 1), "iters": iters, "rounds": rounds,
            "benchmark_app": tool,
            "gemm": {"library": gemm_library, "n": GEMM_N, "latency_ms": gemm.model_dump(mode="json"),
                     "peak_gflops": round(gemm_gflops, 1),
                     "p50_gflops": round(2 * GEMM_N**3 / 1e9 / (gemm.p50 / 1e3), 1)},
            "rows": rows}
