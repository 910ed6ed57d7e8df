"""The latency/accuracy Pareto front on hand-made points, and the accuracy metric choice."""

from __future__ import annotations

from reports.models import BenchResults
from reports.pareto import accuracy_metric, pareto_front
from tests.reports_data import R18, add_variant, load


def test_pareto_front_hand_made() -> None:
    points = [
        (10.0, 0.90),  # 0: on the front (fastest)
        (12.0, 0.95),  # 1: on the front
        (12.0, 0.93),  # 2: dominated by 1 (same latency, less accurate)
        (15.0, 0.94),  # 3: dominated by 1 (slower and less accurate)
        (20.0, 0.99),  # 4: on the front (most accurate)
        (25.0, 0.99),  # 5: dominated by 4 (slower, equally accurate)
        (11.0, 0.85),  # 6: dominated by 0
    ]
    assert pareto_front(points) == [0, 1, 4]


def test_pareto_front_keeps_ties_and_handles_edges() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(5.0, 0.5)]) == [0]
    # identical points: neither dominates the other
    assert pareto_front([(3.0, 0.9), (3.0, 0.9), (4.0, 0.8)]) == [0, 1]
    # input order does not matter; the result is fastest first
    assert pareto_front([(20.0, 0.99), (10.0, 0.90)]) == [1, 0]


def test_accuracy_metric_prefers_labels_then_agreement() -> None:
    data = load(R18)
    recs = BenchResults.model_validate(data).records
    m = accuracy_metric(recs)
    assert m.key == "top1_agreement" and m.drop(recs[0]) == 0.0
    add_variant(data, ("ort", "opt"), "int8_static", "int8", 0.8, 0.9)
    recs = BenchResults.model_validate(data).records
    assert abs(accuracy_metric(recs).drop(recs[-1]) - 10.0) < 1e-9  # points  # type: ignore[operator]
    for r in data["records"]:
        r["accuracy"]["top1_acc"], r["accuracy"]["ref_top1_acc"] = 0.7, 0.75
    recs = BenchResults.model_validate(data).records
    m = accuracy_metric(recs)
    assert m.key == "top1_acc" and abs(m.drop(recs[0]) - 5.0) < 1e-9  # type: ignore[operator]
