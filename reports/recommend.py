"""Which variant to deploy: the fastest one within an accuracy budget, per model and device, with the
evidence behind the choice stated in plain sentences derived from the measurements and the machine.

Latency is judged at the smallest batch size measured (p50); throughput at any batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.manifest import INTEGER_PRECISIONS, PRECISION_LABELS
from core.metrics import LatencyStats, latency_differs
from reports.compare import record_label
from reports.models import BenchRecord, BenchResults
from reports.pareto import AccuracyMetric, accuracy_metric

#: p99/p50 above this makes the measurement "noisy".
NOISY_TAIL = 2.0


class Recommendation(BaseModel):
    """The pick for one (model, device) of one results file."""

    model_config = ConfigDict(extra="forbid")

    model: str
    device: str
    batch_size: int = Field(description="Batch size the latency pick was made at (the smallest measured)")
    budget: float = Field(description="Largest accuracy drop allowed against the FP32 reference, in points")
    metric: str = Field(description="Accuracy number used, e.g. 'top-1 agreement with FP32'")
    choice: str | None = Field(description="backend:variant (precision), or None when nothing fits the budget")
    p50_ms: float | None = None
    throughput_choice: str | None = Field(default=None, description="Highest samples/s within the budget")
    evidence: list[str] = Field(default_factory=list)
    excluded: list[str] = Field(default_factory=list, description="Variants over the budget, and why")


def precision_name(r: BenchRecord) -> str:
    """'static INT8', 'dynamic INT8', 'FP16', ... from the precision and the variant's name."""
    p = r.precision.lower()
    label = PRECISION_LABELS.get(p, p.upper())
    if p in INTEGER_PRECISIONS:
        v = r.variant.lower()
        for word in ("static", "dynamic", "qat"):
            if word in v:
                return f"{'QAT' if word == 'qat' else word} {label}"
    return label


def _flag(flags: dict[str, Any], word: str) -> bool:
    return any(word in k.lower() and v is True for k, v in flags.items())


def cpu_int8_reason(machine: dict[str, Any], slower: bool) -> str:
    """Why INT8 is (not) faster on this CPU, from ``machine.cpu_flags`` (absent in older files)."""
    flags = machine.get("cpu_flags")
    if not isinstance(flags, dict):
        return " (CPU features not recorded in this results file)"
    have = next((name for word, name in (("amx", "AMX"), ("vnni", "VNNI"), ("dotprod", "the ARM dot-product "
                                                                                  "extension")) if _flag(flags, word)),
                None)
    if slower:
        return f" despite {have}" if have else ": no VNNI, so INT8 matrix products get no hardware speed-up"
    return f" (the CPU has {have})" if have else " even without VNNI"


def _speed(a: LatencyStats, b: LatencyStats) -> str:
    """'1.30x faster' / '1.30x slower' / 'within noise' for latencies a vs b (core.metrics.latency_differs)."""
    if b.p50 <= 0 or a.p50 <= 0:
        return "not comparable"
    ratio = b.p50 / a.p50
    if not latency_differs(a, b):
        return f"within noise ({abs(ratio - 1) * 100:.0f}%) of"
    return f"{ratio:.2f}x faster than" if ratio > 1 else f"{1 / ratio:.2f}x slower than"


def _precision_statements(recs: Sequence[BenchRecord], device: str, machine: dict[str, Any]) -> list[str]:
    """Each non-FP32 record against the fastest FP32 record of the same backend at the same batch."""
    out: list[str] = []
    for r in recs:
        if r.precision == "fp32":
            continue
        fp32 = [x for x in recs if x.precision == "fp32" and x.backend == r.backend]
        if not fp32:
            continue
        base = min(fp32, key=lambda x: x.latency_ms.p50)
        a, b = r.latency_ms.p50, base.latency_ms.p50
        ratio = a / b if b > 0 else 1.0
        where = "on this CPU" if device == "cpu" else f"on this {device.upper()} device"
        if not latency_differs(r.latency_ms, base.latency_ms):
            text = f"{r.backend}: {precision_name(r)} ({r.variant}) is as fast as FP32 ({base.variant}) {where}"
        else:
            verb = "slower" if ratio > 1 else "faster"
            factor = ratio if ratio > 1 else 1 / ratio
            text = (f"{r.backend}: {precision_name(r)} ({r.variant}) is {factor:.2f}x {verb} than FP32 "
                    f"({base.variant}) {where}")
        if r.precision in INTEGER_PRECISIONS and device == "cpu":
            text += cpu_int8_reason(machine, slower=not (a < b and latency_differs(r.latency_ms, base.latency_ms)))
        out.append(f"{text}: p50 {a:.3f} ms vs {b:.3f} ms at batch {r.batch_size}.")
    return out


def _machine_line(results: BenchResults, device: str) -> str:
    m = results.machine
    threads = results.config.get("threads")
    thread_text = f"{threads} intra-op thread(s)" if threads else "the libraries' default thread count"
    from calibration.cpu import describe_cpu

    where = f"GPU {m['gpu']}" if device == "cuda" and m.get("gpu") else describe_cpu(m)
    host = f" (host {m['hostname']})" if m.get("hostname") else ""
    return (f"Measured on {where}{host} with {thread_text}, "
            f"{results.config.get('iters', '?')} timed iterations after {results.config.get('warmup', '?')} "
            f"warm-up runs.")


def _graded_on(results: BenchResults, metric: AccuracyMetric) -> str:
    """What the accuracy behind the pick was graded on, and how: the same basis as convert's gates and tune."""
    inputs = results.config.get("inputs", "inputs not recorded")
    text = f"Accuracy was graded on {inputs}"
    if metric.basis:
        text += f"; the drop is {metric.basis}"
    if results.accuracy_inputs == "random":
        text += " (random inputs: pass --data, or convert with --calib/--eval-data, for a verdict on real inputs)"
    return text + "."


def _recommend_group(results: BenchResults, recs: list[BenchRecord], budget: float) -> Recommendation:
    metric: AccuracyMetric = accuracy_metric(recs)
    batch = min(r.batch_size for r in recs)
    at_batch = sorted((r for r in recs if r.batch_size == batch), key=lambda r: r.latency_ms.p50)
    model, device = recs[0].model, recs[0].device

    def fits(r: BenchRecord) -> bool:
        d = metric.drop(r)
        return d is not None and d <= budget + 1e-12

    excluded: list[str] = []
    for r in at_batch:
        d = metric.drop(r)
        if d is None:
            why = f" ({r.accuracy_basis})" if r.accuracy is not None and r.accuracy_basis else ""
            excluded.append(f"{record_label(r)}: no accuracy measured{why}, so it cannot be checked against the budget")
        elif d > budget + 1e-12:
            excluded.append(f"{record_label(r)}: {metric.label} {metric.value(r):.3f} is {d:.2f} points below the "
                            f"reference, over the budget of {budget:g} points")
    eligible = [r for r in at_batch if fits(r)]
    rec = Recommendation(model=model, device=device, batch_size=batch, budget=budget, metric=metric.label,
                         choice=None, excluded=excluded)
    ev = rec.evidence
    if not eligible:
        ev.append(f"No variant stays within an accuracy drop of {budget:g} points ({metric.label}); "
                  "raise --accuracy-budget or improve the quantized variants.")
        ev.append(_machine_line(results, device))
        return rec
    best = eligible[0]
    rec.choice, rec.p50_ms = record_label(best), best.latency_ms.p50
    ev.append(f"{record_label(best)} is the fastest within the budget at batch {batch}: p50 "
              f"{best.latency_ms.p50:.3f} ms, {best.throughput:.1f} samples/s.")
    nxt = eligible[1] if len(eligible) > 1 else None
    if nxt is not None:
        ev.append(f"It is {_speed(best.latency_ms, nxt.latency_ms)} the next one, {record_label(nxt)} "
                  f"(p50 {nxt.latency_ms.p50:.3f} ms)"
                  + (": re-run with more --iters and --rounds before choosing between them." if
                     not latency_differs(best.latency_ms, nxt.latency_ms) else "."))
    baseline = next((r for r in at_batch if r.backend == "eager" and r.precision == "fp32"), None)
    if baseline is not None and baseline is not best and baseline is not nxt:
        ev.append(f"It is {_speed(best.latency_ms, baseline.latency_ms)} PyTorch eager FP32 "
                  f"(p50 {baseline.latency_ms.p50:.3f} ms).")
    d = metric.drop(best)
    ev.append(f"Accuracy: {metric.label} {metric.value(best):.3f} against {metric.reference(best):.3f} for the "
              f"reference (drop {max(d or 0.0, 0.0):.2f} points, budget {budget:g}, "
              f"{best.accuracy.samples if best.accuracy else '?'} samples).")
    ev.append(_graded_on(results, metric))
    ev.extend(_precision_statements(at_batch, device, results.machine))
    tail = best.latency_ms.p99 / best.latency_ms.p50 if best.latency_ms.p50 > 0 else 1.0
    if tail > NOISY_TAIL:
        ev.append(f"The measurement is noisy: p99 is {tail:.1f}x p50 for {record_label(best)} (other load on the "
                  "machine?); re-run with more --iters or pinned --threads.")
    all_fit = [r for r in recs if fits(r)]
    top = max(all_fit, key=lambda r: r.throughput)
    rec.throughput_choice = f"{record_label(top)} at batch {top.batch_size}"
    if top.batch_size != batch or top.backend != best.backend or top.variant != best.variant:
        ev.append(f"For throughput, {record_label(top)} at batch {top.batch_size} gives {top.throughput:.1f} "
                  f"samples/s ({top.throughput / best.throughput:.2f}x the pick at batch {batch}).")
    ev.append(_machine_line(results, device))
    return rec


def recommend(results: BenchResults, budget: float = 1.0) -> list[Recommendation]:
    """One recommendation per (model, device) in ``results``."""
    groups: dict[tuple[str, str], list[BenchRecord]] = {}
    for r in results.records:
        groups.setdefault((r.model, r.device), []).append(r)
    return [_recommend_group(results, recs, budget) for recs in groups.values()]
