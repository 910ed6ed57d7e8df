"""Output comparison and accuracy / latency statistics: the one leaf every layer measures with.

``bench``, the convert steps' accuracy gates, the sparsity checks and the load test all describe
outputs against a reference with :func:`accuracy_stats`, and latencies with :class:`LatencyStats`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

#: Two latencies closer than this ratio are not called different (run-to-run noise on a shared machine).
NOISE_RATIO = 1.05


class LatencyStats(BaseModel):
    """Per-call latency in milliseconds over the timed iterations (warm-up excluded)."""

    model_config = ConfigDict(extra="forbid")

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    std: float
    iters: int
    round_p50s: list[float] = Field(default_factory=list, description="The p50 of each interleaved round")
    p50_interval: tuple[float, float] | None = Field(
        default=None, description="95% bootstrap interval of the median of the per-round p50s: the spread two "
                                  "results are compared by (None: fewer than 3 rounds)")

    @classmethod
    def from_samples(cls, samples_ms: list[float], rounds: list[list[float]] | None = None) -> LatencyStats:
        """Percentiles over every sample; with ``rounds`` (the samples of each interleaved round), the
        per-round p50s and the 95% interval of their median."""
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no latency samples")
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        per_round = [float(np.median(r)) for r in rounds or [] if len(r)]
        return cls(p50=float(p50), p90=float(p90), p99=float(p99), mean=float(a.mean()), min=float(a.min()),
                   max=float(a.max()), std=float(a.std()), iters=int(a.size), round_p50s=per_round,
                   p50_interval=median_interval(per_round) if len(per_round) >= 3 else None)


def median_interval(values: Sequence[float], seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of the median of ``values`` (2000 resamples, seeded)."""
    a = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(a, size=(2000, len(a)), replace=True), axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))


def latency_differs(a: LatencyStats, b: LatencyStats) -> bool:
    """Whether two p50s differ beyond the noise: their intervals do not overlap when both were measured in
    rounds; else (results without intervals) their ratio is outside NOISE_RATIO."""
    if a.p50_interval is not None and b.p50_interval is not None:
        return a.p50_interval[0] > b.p50_interval[1] or b.p50_interval[0] > a.p50_interval[1]
    if a.p50 <= 0 or b.p50 <= 0:
        return a.p50 != b.p50
    return not 1 / NOISE_RATIO < a.p50 / b.p50 < NOISE_RATIO


def clearly_slower(a: LatencyStats, b: LatencyStats, ratio: float = 1.0) -> bool:
    """``a`` slower than ``b`` by more than ``ratio`` and beyond the noise: a's p50 over ``ratio`` x b's and,
    when both were measured in rounds, a's whole interval above b's (the regression gate's rule; without
    intervals the caller's ``ratio`` is the only margin)."""
    if a.p50 <= ratio * b.p50:
        return False
    if a.p50_interval is None or b.p50_interval is None:
        return True
    return a.p50_interval[0] > b.p50_interval[1]


class OutputStats(BaseModel):
    """How far one output is from its reference."""

    model_config = ConfigDict(extra="forbid")

    max_abs_err: float
    mean_abs_err: float
    cosine: float


class AccuracyStats(BaseModel):
    """Agreement of a backend's outputs with the FP32 reference, and accuracy against labels."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(description="What the outputs were compared with, e.g. 'eager:fp32'")
    samples: int
    max_abs_err: float
    mean_abs_err: float
    cosine: float
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    top1_acc: float | None = None
    top5_acc: float | None = None
    ref_top1_acc: float | None = None
    ref_top5_acc: float | None = None
    scored_output: str | None = Field(default=None, description="The class-score output top-k were taken from")
    per_output: dict[str, OutputStats] = Field(default_factory=dict, description="Each output, by name")


class ParityStats(BaseModel):
    """How far outputs are from a reference, worst over every output, and each output by name."""

    model_config = ConfigDict(extra="forbid")

    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    cosine: float = Field(description="Minimum cosine similarity over the outputs")
    per_output: dict[str, OutputStats] = Field(default_factory=dict, description="Each output, by name")


def _one_output(g: np.ndarray, r: np.ndarray) -> tuple[OutputStats, float]:
    """(stats, max relative error) of one output; a shape mismatch is infinitely far."""
    g64 = np.asarray(g, dtype=np.float64).reshape(-1)
    r64 = np.asarray(r, dtype=np.float64).reshape(-1)
    if np.shape(g) != np.shape(r):
        return OutputStats(max_abs_err=float("inf"), mean_abs_err=float("inf"), cosine=0.0), float("inf")
    diff = np.abs(g64 - r64)
    # np.sum (pairwise, in one thread), not np.dot / np.linalg.norm (BLAS): BLAS splits the sum over its threads,
    # so the same outputs would give a cosine that differs in the last digits with the process's thread count
    # (a sweep cell on a 1-CPU Ray worker vs in this process).
    denom = float(np.sqrt(np.sum(g64 * g64)) * np.sqrt(np.sum(r64 * r64)))
    cos = float(np.sum(g64 * r64) / denom) if denom > 0 else float(np.allclose(g64, r64))
    rel = float((diff / np.maximum(np.abs(r64), 1e-6)).max(initial=0.0))
    return OutputStats(max_abs_err=float(diff.max(initial=0.0)), mean_abs_err=float(diff.mean()) if diff.size
                       else 0.0, cosine=cos), rel


def compare_outputs(got: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                    names: Sequence[str] | None = None) -> ParityStats:
    """Max abs / max rel / mean abs error and the minimum cosine over all outputs; with ``names``, each
    output's own figures too."""
    per: dict[str, OutputStats] = {}
    worst = ParityStats(max_abs_err=0.0, max_rel_err=0.0, mean_abs_err=0.0, cosine=1.0)
    labels = list(names) if names is not None and len(names) == len(ref) else [f"output_{i}" for i in range(len(ref))]
    for name, g, r in zip(labels, got, ref, strict=True):
        one, rel = _one_output(g, r)
        per[name] = one
        worst = ParityStats(max_abs_err=max(worst.max_abs_err, one.max_abs_err), max_rel_err=max(worst.max_rel_err, rel),
                            mean_abs_err=max(worst.mean_abs_err, one.mean_abs_err),
                            cosine=min(worst.cosine, one.cosine))
    if names is not None:
        worst.per_output = per
    return worst


#: Output names that say "not class scores" (a [batch, N] embedding or hidden state is no classifier).
_NOT_SCORES = ("embed", "hidden", "feature", "pool", "proj", "vector", "state", "encod")


def is_class_scores(shape: tuple[int, ...], name: str | None = None) -> bool:
    """A [batch, classes] output whose name does not say it is an embedding/feature/hidden state."""
    lowered = (name or "").lower()
    return len(shape) == 2 and shape[1] > 1 and not any(w in lowered for w in _NOT_SCORES)


def accuracy_stats(outputs: Sequence[np.ndarray], ref: Sequence[np.ndarray], labels: np.ndarray | None,
                   reference: str, output_names: Sequence[str] | None = None) -> AccuracyStats:
    """Errors vs the reference over every output (worst, and each by name); top-k agreement and, with labels,
    top-k accuracy from the first output that is class scores (see :func:`is_class_scores`)."""
    names = list(output_names) if output_names is not None and len(output_names) == len(ref) \
        else [f"output_{i}" for i in range(len(ref))]
    cmp = compare_outputs(outputs, ref, names)
    stats = AccuracyStats(reference=reference, samples=len(ref[0]), max_abs_err=cmp.max_abs_err,
                          mean_abs_err=cmp.mean_abs_err, cosine=cmp.cosine, per_output=cmp.per_output)
    scored = next((i for i, (r, n) in enumerate(zip(ref, names, strict=True)) if is_class_scores(r.shape, n)), None)
    if scored is None or np.shape(outputs[scored]) != np.shape(ref[scored]):
        return stats
    got, want = np.asarray(outputs[scored]), np.asarray(ref[scored])
    stats.scored_output = names[scored]
    k = min(5, want.shape[1])
    ref_top1 = want.argmax(1)
    got_top1 = got.argmax(1)
    got_topk = np.argsort(-got, axis=1)[:, :k]
    stats.top1_agreement = float((got_top1 == ref_top1).mean())
    stats.top5_agreement = float(np.mean([ref_top1[i] in got_topk[i] for i in range(len(want))]))
    if labels is not None:
        ref_topk = np.argsort(-want, axis=1)[:, :k]
        stats.top1_acc = float((got_top1 == labels).mean())
        stats.top5_acc = float(np.mean([labels[i] in got_topk[i] for i in range(len(labels))]))
        stats.ref_top1_acc = float((ref_top1 == labels).mean())
        stats.ref_top5_acc = float(np.mean([labels[i] in ref_topk[i] for i in range(len(labels))]))
    return stats


def accuracy_drop(stats: AccuracyStats, random_init: bool = False) -> tuple[float, str]:
    """(drop in points, basis): top-1 accuracy loss with labels, else top-1 disagreement with FP32; for an
    output that is not class scores (an embedding), or for random-init weights, 100 x (1 - cosine with FP32).

    Random-init weights give near-uniform class scores whose argmax flips on rounding noise (a random resnet50's
    INT8 variant: cosine 0.9997 with FP32, yet 2 of 11 top-1 classes differ): class agreement measures nothing
    there, so the output itself is compared."""
    if stats.top1_acc is not None and stats.ref_top1_acc is not None:
        return 100.0 * (stats.ref_top1_acc - stats.top1_acc), "top-1 accuracy (labels)"
    if random_init:
        return 100.0 * (1.0 - stats.cosine), ("100 x (1 - output cosine vs FP32): random-init weights, whose "
                                              "near-uniform class scores make top-1 agreement meaningless")
    if stats.top1_agreement is not None:
        return 100.0 * (1.0 - stats.top1_agreement), "top-1 agreement with FP32 (no labels)"
    return 100.0 * (1.0 - stats.cosine), "100 x (1 - output cosine vs FP32): not a classifier output"
