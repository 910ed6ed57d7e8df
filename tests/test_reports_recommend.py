"""The recommendation: fastest within the accuracy budget, with evidence derived from data and machine."""

from __future__ import annotations

from typing import Any

from reports.models import BenchResults
from reports.recommend import recommend
from tests.reports_data import R18, add_variant, load


def _with_int8(flags: dict[str, Any] | None, int8_factor: float, agreement: float) -> BenchResults:
    data = load(R18)
    for r in data["records"]:  # make ort:opt clearly the fastest FP32 variant
        if (r["backend"], r["variant"]) != ("ort", "opt"):
            for k in ("p50", "p90", "p99", "mean", "min", "max"):
                r["latency_ms"][k] = r["latency_ms"][k] * 3 + 50
    add_variant(data, ("ort", "opt"), "int8_static_minmax", "int8", int8_factor, agreement)
    if flags is None:
        data["machine"].pop("cpu_flags", None)
    else:
        data["machine"]["cpu_flags"] = flags
    return BenchResults.model_validate(data)


NO_VNNI = {"arch": "x86_64", "avx2": True, "avx512": False, "vnni": False, "amx": False}


def test_real_run_recommends_fastest_fp32() -> None:
    res = BenchResults.load(R18)
    (rec,) = recommend(res, 1.0)
    at1 = [r for r in res.records if r.batch_size == 1]
    fastest = min(at1, key=lambda r: r.latency_ms.p50)
    assert rec.choice == f"{fastest.backend}:{fastest.variant} ({fastest.precision})"
    assert rec.batch_size == 1 and rec.excluded == []
    assert any("fastest within the budget" in e for e in rec.evidence)
    assert any(e.startswith("Measured on") for e in rec.evidence)


def test_slow_int8_without_vnni_is_explained() -> None:
    (rec,) = recommend(_with_int8(NO_VNNI, 1.3, 1.0), 1.0)
    assert rec.choice == "ort:opt (fp32)"
    line = next(e for e in rec.evidence if "static INT8" in e)
    assert "1.30x slower than FP32 (opt) on this CPU: no VNNI" in line


def test_fast_int8_within_budget_wins_and_vnni_is_named() -> None:
    (rec,) = recommend(_with_int8(NO_VNNI | {"vnni": True}, 0.5, 0.995), 1.0)
    assert rec.choice == "ort:int8_static_minmax (int8)"
    line = next(e for e in rec.evidence if "static INT8" in e)
    assert "2.00x faster than FP32" in line and "(the CPU has VNNI)" in line


def test_budget_excludes_inaccurate_int8() -> None:
    (rec,) = recommend(_with_int8(NO_VNNI, 0.5, 0.9), 1.0)
    assert rec.choice == "ort:opt (fp32)"
    assert any(x.startswith("ort:int8_static_minmax (int8)") and "over the budget of 1 points" in x
               for x in rec.excluded)
    (rec,) = recommend(_with_int8(NO_VNNI, 0.5, 0.9), 20.0)
    assert rec.choice == "ort:int8_static_minmax (int8)" and rec.excluded == []


def test_missing_cpu_flags_is_tolerated() -> None:
    (rec,) = recommend(_with_int8(None, 1.3, 1.0), 1.0)
    assert any("CPU features not recorded" in e for e in rec.evidence)


def test_nothing_within_budget() -> None:
    data = load(R18)
    for r in data["records"]:
        r["accuracy"]["top1_agreement"] = 0.5
    (rec,) = recommend(BenchResults.model_validate(data), 1.0)
    assert rec.choice is None and len(rec.excluded) == 4
    assert "No variant stays within" in rec.evidence[0]
