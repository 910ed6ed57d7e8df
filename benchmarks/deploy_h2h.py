"""run_deploy's head-to-head: tune's picks, every bench configuration and a GEMM timed in the same rounds.

On this shared CPU the machine's own speed drifts by far within minutes (run of 2026-12-03: the FP32 GEMM peak
measured during bench 322 GFLOP/s, after tune 209; every configuration tune timed was 1.4-1.9x slower than bench
had timed it minutes earlier, while each call kept both cores busy: not load in this VM, but the host). So a figure
from tune set against one from bench compares two moments, not two configurations. Here, per model and batch size,
one interleaved measurement (runtimes.timing: one block of each per round, the order rotated) holds:

- tune's winner, its best FP32 and its best INT8 candidate, each with the settings tune chose;
- every bench configuration within the accuracy budget (its backend and variant at bench's defaults);
- the FP32 GEMM (core.flops.matmul_call) of the library with the highest peak before bench, n=1024.

Targets read from it: (a) no bench configuration is clearly faster than tune's pick (core.metrics.clearly_slower on
these same-round figures); (b) the FP32 pick's GFLOP/s over the GEMM's rate at its fastest call in these rounds (the
peak's definition in core.flops: its best call); (c) FP32 pick p50 / INT8 pick p50, both from these rounds.
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
    roles: list[str]  # "winner", "fp32 pick", "int8 pick", "bench"
    latency: LatencyStats | None = None


def _key(backend: str, variant: str, precision: str, options: RunnerOptions, defaults: RunnerOptions) -> str:
    diff = {k: v for k, v in options.model_dump().items() if k != "precision" and v != getattr(defaults, k)}
    return f"{backend}:{variant} ({precision}) [{', '.join(f'{k}={v}' for k, v in diff.items()) or 'defaults'}]"


def _entries(picks: dict[str, Candidate | None], records: list[BenchRecord],
             within: Callable[[BenchRecord], bool]) -> list[Entry]:
    from runtimes.base import RunnerOptions

    defaults = RunnerOptions()
    out: dict[str, Entry] = {}

    def add(backend: str, variant: str, precision: str, options: RunnerOptions, role: str) -> None:
        key = _key(backend, variant, precision, options, defaults)
        out.setdefault(key, Entry(key, backend, variant, precision, options, [])).roles.append(role)

    for role, c in picks.items():
        if c is not None:
            add(c.backend, c.variant, c.precision, RunnerOptions(precision=c.precision, **c.settings), role)
    for r in records:
        if within(r):  # bench's configuration: its defaults (BenchConfig: threads None, spinning on)
            add(r.backend, r.variant, r.precision, RunnerOptions(precision=r.precision), "bench")
    return list(out.values())


def head_to_head(folder: Path, variants: list[str], batch: int, picks: dict[str, Candidate | None],
                 records: list[BenchRecord], within: Callable[[BenchRecord], bool], gemm_library: str,
                 iters: int, rounds: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time tune's picks, every bench configuration within the budget and the GEMM side by side at ``batch``."""
    from core.flops import peak_fraction
    from core.metrics import LatencyStats
    from runtimes import RUNNERS
    from runtimes.harness import BenchConfig, prepare_bench
    from runtimes.timing import interleaved_within_memory

    entries = _entries(picks, records, within)
    backends = sorted({e.backend for e in entries})
    setup = prepare_bench(BenchConfig(artifact_dir=folder, backends=backends, batch_sizes=[batch], variants=variants,
                                      seed=0), log)
    targets = {(t.backend, t.artifact.name, t.precision): t for t in setup.targets}
    digests = {r.input_digest for r in records}
    if digests and setup.digests[0] not in digests:  # bench's own inputs, or the comparison means nothing
        raise RuntimeError(f"head-to-head feed {setup.digests[0]} differs from bench's {sorted(digests)}")
    opens: list[Callable[[], Any]] = [
        functools.partial(RUNNERS[e.backend], setup.manifest, setup.base, targets[(e.backend, e.variant,
                                                                                     e.precision)].artifact, e.options)
        for e in entries]
    opens.append(functools.partial(GemmRunner, gemm_library))
    log(f"head-to-head at batch {batch}: {len(entries)} configurations + the {gemm_library} GEMM x {iters} calls in "
        f"{rounds} interleaved rounds")
    t0 = time.perf_counter()
    timed = interleaved_within_memory(opens, setup.feeds[0], warmup=2, iters=iters, rounds=rounds)
    for e, tm in zip(entries, timed[:-1], strict=True):
        e.latency = LatencyStats.from_samples(tm.samples, tm.rounds)
    gemm = LatencyStats.from_samples(timed[-1].samples, timed[-1].rounds)
    gemm_gflops = 2 * GEMM_N**3 / 1e9 / (gemm.min / 1e3)
    rows = []
    for e in sorted(entries, key=lambda x: x.latency.p50 if x.latency else 0.0):
        assert e.latency is not None
        # the variant's own file's MACs; the GEMM of these rounds is FP32's: only FP32 configurations are read against it
        gflop, frac = peak_fraction(setup.macs[e.variant].per_point[0], e.latency.p50,
                                    gemm_gflops if e.precision == "fp32" else None)
        rows.append({"config": e.key, "backend": e.backend, "variant": e.variant, "precision": e.precision,
                     "roles": e.roles, "latency_ms": e.latency.model_dump(mode="json"), "gflop": gflop,
                     "peak_fraction": None if frac is None else round(frac, 4)})
    return {"batch": batch, "seconds": round(time.perf_counter() - t0, 1), "iters": iters, "rounds": rounds,
            "gemm": {"library": gemm_library, "n": GEMM_N, "latency_ms": gemm.model_dump(mode="json"),
                     "peak_gflops": round(gemm_gflops, 1),
                     "p50_gflops": round(2 * GEMM_N**3 / 1e9 / (gemm.p50 / 1e3), 1)},
            "rows": rows}
