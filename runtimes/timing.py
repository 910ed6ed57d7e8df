"""Interleaved timing: every candidate measured in the same rounds, in an order rotated from round to round.

Measured one after another, the candidate that runs first meets a different machine (caches, clocks, other
processes on a shared CPU) from the one that runs last, and the order decides the winner. Here each round
gives every candidate one block of timed calls, the order rotated by one each round, so a slow stretch of
the machine falls on all of them alike; the spread of the per-round p50s is the result's noise
(``LatencyStats.p50_interval``).

Each block starts with untimed calls that bring its target back to steady state (``Settle``): at least
``block_warmup`` calls, and, when several targets alternate, calls for at least ``Settle.min_ms`` and until the
last call is within ``Settle.tolerance`` of the target's steady latency (the median of its timed calls so far;
before any, of the second half of its warm-up calls), never longer than ``Settle.max_ms``. Switching runtimes
leaves the next one cold for longer than one call: after its last call ONNX Runtime's spinning intra-op
thread keeps burning a core for about 60 ms and PyTorch's OpenMP threads for about 10 ms (process CPU time
during an idle sleep, 2 threads, AMD EPYC; OpenVINO's threads stop at once), taking cores from the next
runtime's first calls, whose own threads and caches start cold too. One untimed call per block left resnet50
INT8 on OpenVINO (3.7 ms a call) 25-30% slower interleaved with ONNX Runtime than OpenVINO's
``benchmark_app`` measured it (issue 28; ``benchmarks/run_fidelity.py`` measures the agreement). The
tolerance test catches what outlasts ``min_ms``: a call that shares its cores with a spinning thread is far
more than 5% slower. A runner whose calls take ``LONG_CALL_MS`` or more gets no time-based warm-up (the effects
above last milliseconds, under a few % of such a call) and, in ``interleaved_within_memory``, no untimed
call at all. The untimed calls of each block are recorded (``Timed.warmup_calls``). Nothing else runs in
this process while a block is timed (no sampler thread): CPU time is read between blocks.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.metrics import LatencyStats
from runtimes.base import Runner, RunnerOptions, usable_cpus

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from core.manifest import Artifact, Manifest


@dataclass
class Timed:
    """One candidate's samples: per round, the latencies (ms) of its timed calls; its CPU and wall time over
    the timed calls; per block, the untimed calls that brought it back to steady state and how long they took."""

    rounds: list[list[float]] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    gpu_util: list[float] = field(default_factory=list)
    warmup_calls: list[int] = field(default_factory=list)
    warmup_ms: list[float] = field(default_factory=list)

    def add(self, other: Timed) -> None:
        """Append ``other``'s rounds and times (the same candidate timed in a later round)."""
        self.rounds += other.rounds
        self.cpu_s += other.cpu_s
        self.wall_s += other.wall_s
        self.gpu_util += other.gpu_util
        self.warmup_calls += other.warmup_calls
        self.warmup_ms += other.warmup_ms

    @property
    def samples(self) -> list[float]:
        return [x for r in self.rounds for x in r]

    @property
    def cpu_util(self) -> float | None:
        """Process CPU time over the timed blocks, % of the CPUs the process may use."""
        return 100.0 * self.cpu_s / self.wall_s / usable_cpus() if self.wall_s > 0 else None

    def block_warmup(self) -> dict[str, float | int]:
        """What the block warm-ups did: untimed calls per block (median, max) and their total time."""
        if not self.warmup_calls:
            return {}
        return {"block_warmup_calls_median": float(statistics.median(self.warmup_calls)),
                "block_warmup_calls_max": max(self.warmup_calls),
                "block_warmup_ms_total": round(sum(self.warmup_ms), 1)}


def split_iters(iters: int, rounds: int) -> list[int]:
    """``iters`` timed calls over ``rounds`` rounds, as evenly as possible (no empty round)."""
    rounds = max(1, min(rounds, iters))
    return [iters // rounds + (1 if i < iters % rounds else 0) for i in range(rounds)]


@dataclass(frozen=True)
class Settle:
    """The untimed calls that bring a target back to steady state at the start of a block, after the block
    warm-up's fixed count (see the module docstring)."""

    min_ms: float = 50.0  #: untimed calls for at least this long (the previous runtime's threads stop spinning)
    tolerance: float = 0.05  #: and until the last one is within this fraction above the target's steady latency
    max_ms: float = 500.0  #: but never longer than this


#: the block warm-up of ``interleaved`` by default
SETTLE = Settle()


def _median(x: Sequence[float]) -> float:
    return float(statistics.median(x))


def warm_block(runner: Runner, prepared: Any, calls: int, settle: Settle | None,
               steady_ms: float | None) -> tuple[int, float]:
    """Untimed calls at the start of a block: at least ``calls``; with ``settle``, also for ``settle.min_ms`` and
    until the last call is within ``settle.tolerance`` of ``steady_ms`` (when known), at most ``settle.max_ms``
    (none of that for a runner whose steady call takes ``LONG_CALL_MS`` or more). (calls made, ms they took)."""
    if settle is not None and steady_ms is not None and steady_ms >= LONG_CALL_MS:
        settle = None
    t0 = time.perf_counter()
    n, last, spent = 0, None, 0.0
    while True:
        spent = (time.perf_counter() - t0) * 1e3
        if n >= calls:
            if settle is None or spent >= settle.max_ms:
                break
            settled = steady_ms is None or (last is not None and last <= steady_ms * (1 + settle.tolerance))
            if spent >= settle.min_ms and settled:
                break
        last = runner.time_iterations(prepared, 0, 1)[0]
        n += 1
    return n, spent


def interleaved(runners: Sequence[Runner], prepared: Sequence[Any], *, warmup: int, iters: int, rounds: int,
                block_warmup: int | Sequence[int] = 1, settle: Settle | None = SETTLE,
                steady_ms: Sequence[float | None] | None = None,
                gpu_util: Callable[[], Callable[[], float | None]] | None = None) -> list[Timed]:
    """Time every runner on its prepared feed in ``rounds`` interleaved rounds (see the module docstring).

    ``warmup`` untimed calls each first (the median of their second half is the runner's steady latency, unless
    ``steady_ms`` gives it); then per round one block per runner: its block warm-up (``warm_block``: at least
    ``block_warmup`` untimed calls, one count for all or one per runner, then ``settle``'s; None: the count
    only) and its share of ``iters`` timed calls. ``gpu_util``: starts a GPU
    utilisation window and returns the function that reads it (NVML), or None on CPU.
    """
    steady: list[float | None] = list(steady_ms) if steady_ms is not None else [None] * len(runners)
    for i, (r, p) in enumerate(zip(runners, prepared, strict=True)):
        if warmup:
            lat = r.time_iterations(p, 0, warmup)
            steady[i] = steady[i] if steady[i] is not None else _median(lat[len(lat) // 2:])
    block_warm = [block_warmup] * len(runners) if isinstance(block_warmup, int) else list(block_warmup)
    out = [Timed() for _ in runners]
    n = len(runners)
    for k, count in enumerate(split_iters(iters, rounds)):
        for j in range(n):
            i = (k + j) % n
            calls, spent = warm_block(runners[i], prepared[i], block_warm[i], settle, steady[i])
            window = gpu_util() if gpu_util else None
            c0, t0 = time.process_time(), time.perf_counter()  # process CPU time: every thread, ns resolution
            samples = runners[i].time_iterations(prepared[i], 0, count)
            c1, t1 = time.process_time(), time.perf_counter()
            out[i].rounds.append(samples)
            out[i].cpu_s += c1 - c0
            out[i].wall_s += t1 - t0
            out[i].warmup_calls.append(calls)
            out[i].warmup_ms.append(spent)
            steady[i] = _median(out[i].samples)
            if window is not None and (u := window()) is not None:
                out[i].gpu_util.append(u)
    return out


def time_units(units: Sequence[Callable[[], object]], *, warmup: int, iters: int, rounds: int,
               block_warmup: int = 1) -> list[Timed]:
    """Time each unit -- a callable that runs a sequence of calls as one measured unit, e.g. a session's prefill
    and N decode steps (``runtimes.session.generate``) -- as ``interleaved`` times one-shot calls: ``warmup``
    untimed units each, then ``rounds`` rounds, the order rotated each round, each block ``block_warmup`` untimed
    units and its share of ``iters`` timed ones (``time.perf_counter_ns`` around the whole unit; its calls return
    host arrays, so the work is done when it returns). ``LatencyStats.from_samples(t.samples, t.rounds)`` gives
    the unit's percentiles and p50 interval, as for one-shot timing."""
    clock = time.perf_counter_ns
    for unit in units:
        for _ in range(warmup):
            unit()
    out = [Timed() for _ in units]
    n = len(units)
    for k, count in enumerate(split_iters(iters, rounds)):
        for j in range(n):
            i = (k + j) % n
            w0 = time.perf_counter()
            for _ in range(block_warmup):
                units[i]()
            out[i].warmup_ms.append((time.perf_counter() - w0) * 1e3)
            c0, t0 = time.process_time(), time.perf_counter()
            samples: list[float] = []
            for _ in range(count):
                s0 = clock()
                units[i]()
                samples.append((clock() - s0) / 1e6)
            out[i].rounds.append(samples)
            out[i].cpu_s += time.process_time() - c0
            out[i].wall_s += time.perf_counter() - t0
            out[i].warmup_calls.append(block_warmup)
    return out


#: memory kept free while runners are opened for one interleaved group, at least (see interleaved_within_memory)
MIN_FREE_BYTES = 2 << 30
#: a runner whose warmed-up call takes this long gets no time-based block warm-up (``Settle``), and in
#: ``interleaved_within_memory`` no untimed call at the start of its blocks: what those calls absorb (the previous
#: runner's spinning threads, caches it left cold) lasts milliseconds, a few % of such a call at most, while an
#: untimed call doubles the cost of one-call blocks (tune's first stage on vit_b_16: 1-5 s a call)
LONG_CALL_MS = 250.0


def interleaved_within_memory(opens: Sequence[Callable[[], Runner]], feed: dict[str, np.ndarray], *, warmup: int,
                              iters: int, rounds: int) -> list[Timed]:
    """``interleaved`` over the runners that ``opens`` open, all held at once when the machine's memory allows.

    Each runner holds its own weights and buffers: 70 tune candidates of vit_b_16 at batch 8 held at once took the
    24 GB of this machine (the OOM killer ended tune). Runners are opened and warmed one by one while the memory
    left stays above ``MIN_FREE_BYTES`` and three times the most one runner has taken; the first group that does
    not fit ends a chunk. If everything fits, this is ``interleaved``. Otherwise each round opens every chunk in
    turn (chunk order rotated from round to round), times one block of each of its runners and closes it again,
    so every candidate still gets one block per round, and the load of the machine falls on all alike. A runner
    opened again gets one untimed call (its buffers grow back) before its block's own warm-up. A runner whose
    last warm-up call took ``LONG_CALL_MS`` or more gets no block warm-up call.
    """
    from core.resources import available_memory

    counts = split_iters(iters, rounds)
    out = [Timed() for _ in opens]
    call_ms: dict[int, float] = {}  # the last warm-up call of each runner

    def block_warm(idx: list[int]) -> list[int]:
        return [0 if call_ms.get(i, 0.0) >= LONG_CALL_MS else 1 for i in idx]

    def steady(idx: list[int]) -> list[float | None]:  # the median of the timed calls so far, else the warm-up call
        return [_median(out[i].samples) if out[i].samples else call_ms.get(i) for i in idx]

    chunks: list[list[int]] = []
    start, most = 0, 0
    while start < len(opens):  # round 0, finding the chunks
        with contextlib.ExitStack() as stack:
            idx: list[int] = []
            runners: list[Runner] = []
            prepared: list[Any] = []
            for i in range(start, len(opens)):
                before = available_memory()
                runners.append(stack.enter_context(opens[i]()))
                prepared.append(runners[-1].prepare(feed))
                if warmup:
                    call_ms[i] = runners[-1].time_iterations(prepared[-1], warmup - 1, 1)[0]
                idx.append(i)
                left = available_memory()
                most = max(most, before - left)
                if left < max(MIN_FREE_BYTES, 3 * most):
                    break
            if not chunks and len(idx) == len(opens):
                return interleaved(runners, prepared, warmup=0, iters=iters, rounds=rounds, block_warmup=block_warm(idx),
                                   steady_ms=steady(idx))
            timed = interleaved(runners, prepared, warmup=0, iters=counts[0], rounds=1, block_warmup=block_warm(idx),
                                steady_ms=steady(idx))
            for i, t in zip(idx, timed, strict=True):
                out[i].add(t)
        chunks.append(idx)
        start = idx[-1] + 1
    for k, count in enumerate(counts[1:], start=1):
        for j in range(len(chunks)):
            idx = chunks[(k + j) % len(chunks)]
            with contextlib.ExitStack() as stack:
                runners = [stack.enter_context(opens[i]()) for i in idx]
                prepared = [r.prepare(feed) for r in runners]
                timed = interleaved(runners, prepared, warmup=min(warmup, 1), iters=count, rounds=1,
                                    block_warmup=block_warm(idx), steady_ms=steady(idx))
            for i, t in zip(idx, timed, strict=True):
                out[i].add(t)
    return out


def interleaved_latency(manifest: Manifest, base: Path, arts: list[Artifact], feed: dict[str, np.ndarray], *,
                        warmup: int, iters: int, threads: int | None = None) -> list[LatencyStats]:
    """ONNX Runtime CPU latency of several artifacts on the same feed, one call of each in turn, so that
    load from other processes on a shared CPU falls on all of them alike rather than on whichever ran first.

    Intra-op spinning is off for these sessions: with it on, the session that just ran keeps its threads
    spinning for a moment and the next session's call, one call later, loses the cores to them.
    """
    from runtimes.ort import OrtRunner

    opts = RunnerOptions(device="cpu", threads=threads, ort_spinning=False)

    with contextlib.ExitStack() as stack:
        runners = [stack.enter_context(OrtRunner(manifest, base, a, opts))
                   for a in arts]
        prepared = [r.prepare(feed) for r in runners]
        for r, p in zip(runners, prepared, strict=True):
            r.time_iterations(p, warmup, 0)
        samples: list[list[float]] = [[] for _ in runners]
        for _ in range(iters):
            for r, p, out in zip(runners, prepared, samples, strict=True):
                out.extend(r.time_iterations(p, 0, 1))
    # each call is its own round: the interval is the bootstrap interval of the median over the calls
    return [LatencyStats.from_samples(x, rounds=[[v] for v in x]) for x in samples]
