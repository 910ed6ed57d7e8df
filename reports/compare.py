"""Several results files side by side (two machines, before/after a change) and the CI regression gate.

Rows are matched by (model, backend, variant, precision, device, batch_size). The first file is the
baseline; every other file gets, per row, its p50 latency and throughput divided by the baseline's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InputError, ValidationError
from core.metrics import clearly_slower
from reports.models import BenchRecord, BenchResults

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


@dataclass
class Regression:
    key: RowKey
    run: str
    base_ms: float
    new_ms: float

    @property
    def slower_pct(self) -> float:
        return (self.new_ms / self.base_ms - 1.0) * 100.0

    def describe(self, baseline: str) -> str:
        return (f"{key_text(self.key)}: p50 {self.base_ms:.3f} ms ({baseline}) -> {self.new_ms:.3f} ms "
                f"({self.run}), {self.slower_pct:+.1f}%")


@dataclass
class Comparison:
    runs: list[Run]
    rows: list[CompareRow] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.runs]

    def regressions(self, threshold_pct: float) -> list[Regression]:
        """Every (row, run) whose p50 latency is more than ``threshold_pct`` % above the baseline's and beyond
        the noise (their round intervals do not overlap: ``core.metrics.clearly_slower``)."""
        out: list[Regression] = []
        for row in self.rows:
            base = row.base
            if base is None:
                continue
            for run, rec in zip(self.runs[1:], row.records[1:], strict=True):
                if rec is not None and clearly_slower(rec.latency_ms, base.latency_ms, 1.0 + threshold_pct / 100.0):
                    out.append(Regression(key=row.key, run=run.label, base_ms=base.latency_ms.p50,
                                          new_ms=rec.latency_ms.p50))
        return out

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


def check_regressions(comparison: Comparison | None, threshold_pct: float) -> None:
    """Raise one ValidationError listing every regressed row (for CI: non-zero exit)."""
    if comparison is None or len(comparison.runs) < 2:
        raise InputError("--fail-if-slower needs at least two results files: the baseline first, then the new run")
    regs = comparison.regressions(threshold_pct)
    if regs:
        base = comparison.runs[0].label
        raise ValidationError(f"{len(regs)} row(s) more than {threshold_pct:g}% slower than the baseline {base}",
                              [r.describe(base) for r in regs])
