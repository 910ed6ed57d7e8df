"""The latency/accuracy Pareto front, and the one accuracy number a set of records is judged by.

A point is on the front when no other point is at least as fast AND at least as accurate while being
strictly better in one of the two. Pure functions: no I/O, no plotting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reports.models import BenchRecord


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(latency, accuracy)`` points, fastest first.

    Lower latency is better, higher accuracy is better. Identical points are all kept (neither
    dominates the other), so a tie never hides a variant.
    """

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


@dataclass(frozen=True)
class AccuracyMetric:
    """Which accuracy number to read from every record of a set, and what counts as no loss."""

    key: str  # "drop" | "top1_acc" | "top1_agreement" | "cosine"
    label: str
    basis: str = ""  # "drop": what the drop measures, as convert's gates and tune say it

    def value(self, r: BenchRecord) -> float | None:
        if r.accuracy is None:
            return None
        if self.key == "drop":
            return None if r.accuracy_drop is None else 1.0 - r.accuracy_drop / 100.0
        v = getattr(r.accuracy, self.key)
        return None if v is None else float(v)

    def reference(self, r: BenchRecord) -> float | None:
        """The FP32 reference's score: its own top-1 accuracy with labels, else 1 (perfect agreement)."""
        if r.accuracy is None:
            return None
        if self.key == "top1_acc":
            return r.accuracy.ref_top1_acc
        return 1.0

    def drop(self, r: BenchRecord) -> float | None:
        """Accuracy lost against the reference, in points (100 x the fraction; positive = worse), the unit of
        every accuracy budget in the toolkit; None when not measured."""
        if self.key == "drop":
            return None if r.accuracy is None else r.accuracy_drop
        v, ref = self.value(r), self.reference(r)
        return None if v is None or ref is None else 100.0 * (ref - v)


def accuracy_metric(records: Sequence[BenchRecord]) -> AccuracyMetric:
    """The drop bench graded every record with (``runtimes.harness.graded_drop``: the basis of convert's gates and
    tune) when the records carry it (a record whose reference was not measurable has none); for results files written before it, top-1 accuracy when every measured
    record has labels, else top-1 agreement with the FP32 reference, else cosine similarity."""
    measured = [r for r in records if r.accuracy is not None]
    if measured and all(r.accuracy_basis is not None for r in measured):  # a drop, or why there is none
        bases = sorted({r.accuracy_basis or "" for r in measured if r.accuracy_drop is not None}) or ["no drop measured"]
        basis = bases[0] if len(bases) == 1 else "; ".join(b for b in bases if b)
        short = basis.split(":")[0].split(" on random")[0] if len(bases) == 1 else "mixed bases"
        return AccuracyMetric("drop", f"1 - drop/100 vs FP32 ({short})", basis)
    accs = [r.accuracy for r in measured if r.accuracy is not None]
    if accs and all(a.top1_acc is not None for a in accs):
        return AccuracyMetric("top1_acc", "top-1 accuracy")
    if accs and all(a.top1_agreement is not None for a in accs):
        return AccuracyMetric("top1_agreement", "top-1 agreement with FP32")
    return AccuracyMetric("cosine", "cosine similarity to FP32")
