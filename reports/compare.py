"""Several results files side by side (two machines, before/after a change) and the CI regression gate.

Rows are matched by (model, backend, variant, precision, device, batch_size). The first file is the
baseline; every other file gets, per row, its p50 latency and throughput divided by the baseline's.

The regression gate (``--fail-if-slower PCT``, :func:`gate_verdict`) fails a row when its p50 is more than PCT%
above the baseline's AND, when both files measured it in at least 3 interleaved rounds, a one-sided exact
rank-sum (Mann-Whitney) test of its round p50s against the baseline's round p50s times (1 + PCT/100) rejects
"at most PCT% slower" at GATE_ALPHA. Why not the p50 intervals: at the default 5 rounds the 95% bootstrap
interval of the median of 5 round p50s is their min-max, so "the new interval above the old one" asked only
that the slowdown be above 0 (a slowdown of exactly PCT% failed up to ~40% of the time with steady rounds), and
one disturbed round (a cold first round, a noisy neighbour) in the baseline hid any regression. The rank test
keeps its false-alarm rate at most GATE_ALPHA per row when the true slowdown is PCT% or less (distribution-free,
rounds independent), and tolerates a few pairs out of order: at 5 v 5 rounds a row fails when at most 4 of the
25 (new round, baseline round x (1 + PCT/100)) pairs have the new round the faster one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from core.errors import InputError, ValidationError
from core.metrics import LatencyStats
from reports.models import BenchRecord, BenchResults

#: The gate's one-sided false-alarm rate per row when the true slowdown is exactly the threshold.
GATE_ALPHA = 0.05
#: Fewer interleaved rounds than this in either file: the gate compares the p50 ratio only.
GATE_MIN_ROUNDS = 3

RowKey = tuple[str, str, str, str, str, int, str]
KEY_FIELDS = ("model", "backend", "variant", "precision", "device", "batch_size", "dims")


def dims_text(dims: dict[str, int]) -> str:
    return "".join(f" {d} {v}" for d, v in sorted(dims.items()))


def row_key(r: BenchRecord) -> RowKey:
    return (r.model, r.backend, r.variant, r.precision, r.device, r.batch_size, dims_text(r.dims))


def key_text(key: RowKey) -> str:
    model, backend, variant, precision, device, batch, dims = key
    return f"{model} {backend}:{variant} {precision} {device} batch {batch}{dims}"


def record_label(r: BenchRecord) -> str:
    """Short human name of a series: backend:variant (precision)."""
    return f"{r.backend}:{r.variant} ({r.precision})"


@dataclass
class Run:
    """One results file and the short label it gets in plots and tables."""

    label: str
    path: Path
    results: BenchResults


def run_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing path pieces (without .json) that tell the files apart."""
    resolved = [Path(p).resolve().with_suffix("") for p in paths]
    distinct = len(set(resolved))
    depth = 1
    labels = [p.name for p in resolved]
    while len(set(labels)) < distinct:
        depth += 1
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # the same file given twice
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} #{seen[lab]}")
    return out


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Load every results file (each bad one is a clear InputError, see ``BenchResults.load``)."""
    if not paths:
        raise InputError("no results file given")
    runs = [Run(label=lab, path=Path(p), results=BenchResults.load(Path(p)))
            for lab, p in zip(run_labels(paths), paths, strict=True)]
    for run in runs:
        if not run.results.records:
            raise InputError(f"{run.path} has no benchmark records")
    return runs


def parse_percent(text: str) -> float:
    """``5%`` or ``5`` -> 5.0 (percent); anything else is one clear InputError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*", text)
    if not m:
        raise InputError(f"malformed --fail-if-slower {text!r}: expected a percentage such as 5%")
    return float(m.group(1))


@dataclass
class CompareRow:
    key: RowKey
    records: list[BenchRecord | None]  # one slot per run; None = not measured in that run

    @property
    def base(self) -> BenchRecord | None:
        return self.records[0]

    def latency_ratio(self, i: int) -> float | None:
        """Run i's p50 latency / the baseline's (>1 = slower than the baseline)."""
        r, b = self.records[i], self.base
        return None if r is None or b is None or b.latency_ms.p50 <= 0 else r.latency_ms.p50 / b.latency_ms.p50

    def throughput_ratio(self, i: int) -> float | None:
        r, b = self.records[i], self.base
        return None if r is None or b is None or b.throughput <= 0 else r.throughput / b.throughput

    def same_inputs(self) -> bool:
        digests = {r.input_digest for r in self.records if r is not None}
        return len(digests) <= 1


@cache
def _rank_sum_null(n: int, m: int) -> tuple[int, ...]:
    """How many of the C(n+m, n) equally likely orderings of n + m distinct values give each U = 0 .. n*m, U being
    the number of (x, y) pairs, x from the n and y from the m, with x < y (the exact Mann-Whitney null): the
    coefficients of the Gaussian binomial [n+m choose n]_q = prod_{i=1..n} (1 - q^(m+i)) / (1 - q^i)."""
    top = n * m + n  # the highest degree a partial product reaches
    c = [1] + [0] * top
    for i in range(1, n + 1):
        for k in range(top, m + i - 1, -1):  # times (1 - q^(m+i))
            c[k] -= c[k - m - i]
        for k in range(i, top + 1):  # divided by (1 - q^i): exact, so the running sum ends in zeros
            c[k] += c[k - i]
    return tuple(c[: n * m + 1])


def rank_sum_test(new: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """(U, p): U = the (new, base) pairs with new < base (ties count half); p = the exact one-sided probability
    of a U this small when new and base come from one distribution (small p: new is larger)."""
    u = sum((x < y) + 0.5 * (x == y) for x in new for y in base)
    null = _rank_sum_null(len(new), len(base))
    return u, sum(null[: math.floor(u) + 1]) / math.comb(len(new) + len(base), len(new))


@dataclass
class GateVerdict:
    """One row of a run against the baseline, judged by the regression gate's rule (module docstring)."""

    ratio: float  # p50 / the baseline's p50
    slower: bool  # the gate fails this row
    pairs_out_of_order: float | None = None  # U: pairs with the new round faster than the scaled baseline round
    pairs: int | None = None  # rounds x baseline rounds; None: fewer than GATE_MIN_ROUNDS in a file (ratio only)
    p_value: float | None = None

    @property
    def ratio_only(self) -> bool:
        return self.pairs is None


def gate_verdict(new: LatencyStats, base: LatencyStats, threshold_pct: float) -> GateVerdict:
    """Whether ``new`` is more than ``threshold_pct`` % slower than ``base`` and beyond the noise of their rounds:
    p50 ratio over 1 + PCT/100 and, with at least GATE_MIN_ROUNDS round p50s in both, the one-sided exact rank-sum
    test of the new round p50s against the baseline's times (1 + PCT/100) at GATE_ALPHA; with fewer rounds, the
    ratio alone."""
    scale = 1.0 + threshold_pct / 100.0
    ratio = new.p50 / base.p50 if base.p50 > 0 else math.inf
    if len(new.round_p50s) < GATE_MIN_ROUNDS or len(base.round_p50s) < GATE_MIN_ROUNDS:
        return GateVerdict(ratio=ratio, slower=ratio > scale)
    u, p = rank_sum_test(new.round_p50s, [b * scale for b in base.round_p50s])
    return GateVerdict(ratio=ratio, slower=ratio > scale and p <= GATE_ALPHA, pairs_out_of_order=u,
                       pairs=len(new.round_p50s) * len(base.round_p50s), p_value=p)


@dataclass
class Regression:
    key: RowKey
    run: str
    base_ms: float
    new_ms: float
    verdict: GateVerdict | None = None

    @property
    def slower_pct(self) -> float:
        return (self.new_ms / self.base_ms - 1.0) * 100.0

    def describe(self, baseline: str) -> str:
        v = self.verdict
        why = "" if v is None else (" (p50 ratio only: fewer than 3 rounds)" if v.pairs is None else
                                    f" (rounds: {v.pairs_out_of_order:g} of {v.pairs} pairs out of order, "
                                    f"one-sided rank-sum p={v.p_value:.3f})")
        return (f"{key_text(self.key)}: p50 {self.base_ms:.3f} ms ({baseline}) -> {self.new_ms:.3f} ms "
                f"({self.run}), {self.slower_pct:+.1f}%{why}")


@dataclass
class Comparison:
    runs: list[Run]
    rows: list[CompareRow] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.runs]

    def verdicts(self, threshold_pct: float) -> list[Regression]:
        """The gate's verdict on every (row, run) measured in both the run and the baseline (:func:`gate_verdict`),
        as a Regression record whether it failed or not."""
        out: list[Regression] = []
        for row in self.rows:
            base = row.base
            if base is None:
                continue
            for run, rec in zip(self.runs[1:], row.records[1:], strict=True):
                if rec is not None:
                    out.append(Regression(key=row.key, run=run.label, base_ms=base.latency_ms.p50,
                                          new_ms=rec.latency_ms.p50,
                                          verdict=gate_verdict(rec.latency_ms, base.latency_ms, threshold_pct)))
        return out

    def regressions(self, threshold_pct: float) -> list[Regression]:
        """Every (row, run) whose p50 latency is more than ``threshold_pct`` % above the baseline's and beyond
        the noise of their rounds (:func:`gate_verdict`)."""
        return [r for r in self.verdicts(threshold_pct) if r.verdict is not None and r.verdict.slower]

    def gate_notes(self, threshold_pct: float) -> list[str]:
        """One line when some compared rows had fewer than GATE_MIN_ROUNDS rounds in a file: for them the gate
        compares the p50 ratio only, with no allowance for noise."""
        few = [r for r in self.verdicts(threshold_pct) if r.verdict is not None and r.verdict.ratio_only]
        if not few:
            return []
        return [f"{len(few)} compared row(s) were measured in fewer than {GATE_MIN_ROUNDS} interleaved rounds in a "
                f"file (bench --rounds): for them --fail-if-slower uses the p50 ratio only (fails above "
                f"{1 + threshold_pct / 100:.4g}x), with no test of the noise"]

    def unmatched(self) -> list[str]:
        """Rows missing from some run, one line each (they cannot be compared)."""
        lines = []
        for row in self.rows:
            missing = [self.runs[i].label for i, r in enumerate(row.records) if r is None]
            if missing:
                lines.append(f"{key_text(row.key)}: not in {', '.join(missing)}")
        return lines


def compare_runs(runs: Sequence[Run]) -> Comparison:
    """Match rows across runs by their key; keys keep the order of first appearance."""
    table: dict[RowKey, list[BenchRecord | None]] = {}
    for i, run in enumerate(runs):
        for rec in run.results.records:
            slots = table.setdefault(row_key(rec), [None] * len(runs))
            slots[i] = rec  # a duplicate key within one file: the last measurement wins
    return Comparison(runs=list(runs), rows=[CompareRow(key=k, records=v) for k, v in table.items()])


def check_regressions(comparison: Comparison | None, threshold_pct: float,
                      log: Callable[[str], None] | None = None) -> None:
    """Raise one ValidationError listing every regressed row (for CI: non-zero exit); ``log`` gets the gate's
    notes first (rows judged on the p50 ratio only), once."""
    if comparison is None or len(comparison.runs) < 2:
        raise InputError("--fail-if-slower needs at least two results files: the baseline first, then the new run")
    if log is not None:
        for note in comparison.gate_notes(threshold_pct):
            log(note)
    regs = comparison.regressions(threshold_pct)
    if regs:
        base = comparison.runs[0].label
        raise ValidationError(f"{len(regs)} row(s) more than {threshold_pct:g}% slower than the baseline {base}",
                              [r.describe(base) for r in regs])
