"""Output comparison and accuracy / latency statistics: the one leaf every layer measures with.

``bench``, the convert steps' accuracy gates, the sparsity checks and the load test all describe
outputs against a reference with :func:`accuracy_stats`, and latencies with :class:`LatencyStats`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import AccuracyGateError

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


#: A reference output whose samples differ by no more than this fraction of its largest value is constant
#: (a few float32 roundings: the same values computed in another row of a batch).
CONSTANT_RTOL = 1e-6


class OutputStats(BaseModel):
    """How far one output is from its reference."""

    model_config = ConfigDict(extra="forbid")

    max_abs_err: float
    mean_abs_err: float
    cosine: float = Field(description="Cosine similarity with the reference; 0.0 when the reference is constant "
                                      "(see not_measurable): never a perfect match")
    centered_cosine: float | None = Field(
        default=None, description="Cosine of the part that depends on the input: both outputs minus the reference's "
                                  "mean over the inputs (see centered_cosine); None with one input or an output "
                                  "without the inputs' axis; 0.0 when the reference is constant")
    not_measurable: str | None = Field(
        default=None, description="Why no comparison can measure this output, when its reference is constant: "
                                  "'all 0.0' or 'identical for every input' (None: measurable)")


class AccuracyStats(BaseModel):
    """Agreement of a backend's outputs with the FP32 reference, and accuracy against labels."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(description="What the outputs were compared with, e.g. 'eager:fp32'")
    samples: int
    max_abs_err: float
    mean_abs_err: float
    cosine: float
    centered_cosine: float | None = Field(
        default=None, description="The worst centered cosine over the measurable outputs (see "
                                  "core.metrics.centered_cosine); None where no output has one (one input)")
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    top1_acc: float | None = None
    top5_acc: float | None = None
    ref_top1_acc: float | None = None
    ref_top5_acc: float | None = None
    ref_top1_classes: int | None = Field(
        default=None, description="How many distinct classes the reference's top-1 takes over the inputs: with one, "
                                  "top-1 agreement measures nothing (see core.metrics.vacuous_agreement)")
    scored_output: str | None = Field(default=None, description="The class-score output top-k were taken from")
    per_output: dict[str, OutputStats] = Field(default_factory=dict, description="Each output, by name")
    not_measurable: dict[str, str] = Field(
        default_factory=dict, description="Outputs whose reference is constant over the inputs or all zeros, and "
                                          "how (no comparison measures them: see core.metrics.not_measurable_line); "
                                          "cosine is the worst over the other outputs")


class ParityStats(BaseModel):
    """How far outputs are from a reference, worst over every output, and each output by name."""

    model_config = ConfigDict(extra="forbid")

    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    cosine: float = Field(description="Minimum cosine similarity over the measurable outputs (0.0 when none is)")
    centered_cosine: float | None = Field(
        default=None, description="Minimum centered cosine over the measurable outputs that have one (see "
                                  "core.metrics.centered_cosine)")
    per_output: dict[str, OutputStats] = Field(default_factory=dict, description="Each output, by name")
    not_measurable: dict[str, str] = Field(
        default_factory=dict, description="Outputs whose reference is constant over the inputs or all zeros, and how")


def constant_reference(r: np.ndarray, samples: int | None) -> str | None:
    """How a reference output is constant, or None when it varies: 'all 0.0' (any number of samples), or
    'identical for every input' when its ``samples`` rows (axis 0, two or more) are the same within
    CONSTANT_RTOL of its largest value. Comparing with such a reference measures nothing: zeros match zeros
    with cosine 1.0, and a variant that ignored its input would match a constant output perfectly."""
    r64 = np.asarray(r, dtype=np.float64)
    if r64.size == 0:
        return None
    if not np.any(r64):
        return "all 0.0"
    varies = samples is None or samples < 2 or r64.ndim < 1 or r64.shape[0] != samples or \
        float(np.abs(r64 - r64[:1]).max()) > CONSTANT_RTOL * float(np.abs(r64).max())
    if not varies:
        return "identical for every input"
    return None


def not_measurable_line(stats: AccuracyStats | ParityStats, samples: int, inputs: str = "inputs",
                        what: str = "accuracy", reference: str = "the FP32 reference") -> str | None:
    """One line naming the outputs that cannot be measured, e.g. "output logits of the FP32 reference is
    constant (all 0.0) on the 20 held-out inputs: accuracy not measurable"; None when every output is
    measurable."""
    if not stats.not_measurable:
        return None
    outs = "; ".join(f"output {n} of {reference} is constant ({why})" for n, why in stats.not_measurable.items())
    return f"{outs} on the {samples} {inputs}: {what} not measurable"


def _rows(r: np.ndarray, samples: int | None) -> int | None:
    """The number of inputs on ``r``'s leading axis, when there are two or more and ``r`` has that axis."""
    if samples is None or samples < 2 or np.ndim(r) < 1 or np.shape(r)[0] != samples:
        return None
    return samples


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    # np.sum (pairwise, in one thread), not np.dot / np.linalg.norm (BLAS): BLAS splits the sum over its threads,
    # so the same outputs would give a cosine that differs in the last digits with the process's thread count
    # (a sweep cell on a 1-CPU Ray worker vs in this process).
    denom = float(np.sqrt(np.sum(a * a)) * np.sqrt(np.sum(b * b)))
    return float(np.sum(a * b) / denom) if denom > 0 else 0.0


def centered_cosine(g: np.ndarray, r: np.ndarray, samples: int | None) -> float | None:
    """Cosine of what depends on the input: ``g`` and the reference ``r`` (``samples`` inputs on axis 0), each
    minus the reference's mean over the inputs, element by element; None with fewer than two inputs, an output
    without that axis, or shapes that differ. Elements not finite in every input of both are left out.

    The plain cosine is dominated by what every input shares: 95% of a random-init resnet50's logit energy is the
    same for every photo, so a variant that ignored its input (output: the reference's mean) scored cosine 0.977 and
    one that kept half of the input's effect 0.994, within a 1-point budget; a random-init shufflenet_v2's share
    that depends on the input is 1e-9 of its energy, and an INT8 file that had lost it entirely scored 0.99999.
    Centred, the first scores 0.0, and the third 0.005."""
    rows = _rows(r, samples)
    if rows is None or np.shape(g) != np.shape(r):
        return None
    g2 = np.asarray(g, dtype=np.float64).reshape(rows, -1)
    r2 = np.asarray(r, dtype=np.float64).reshape(rows, -1)
    cols = np.isfinite(g2).all(axis=0) & np.isfinite(r2).all(axis=0)
    g2, r2 = g2[:, cols], r2[:, cols]
    mean = r2.mean(axis=0, keepdims=True)
    return _cos(g2 - mean, r2 - mean)


def _one_output(g: np.ndarray, r: np.ndarray, samples: int | None = None) -> tuple[OutputStats, float]:
    """(stats, max relative error) of one output; a shape mismatch is infinitely far; a constant reference
    (see :func:`constant_reference`) has cosine 0.0, never a perfect match. NaN or inf at the same place in both
    (an input outside a function's domain, in the source as in its conversion) is a match: the errors and the cosine
    are read over the finite elements; NaN or inf on one side only is infinitely far."""
    g64 = np.asarray(g, dtype=np.float64).reshape(-1)
    r64 = np.asarray(r, dtype=np.float64).reshape(-1)
    finite_r = np.isfinite(r64)
    constant = constant_reference(np.asarray(r) if finite_r.all() else np.where(np.isfinite(r), r, 0.0), samples)
    if np.shape(g) != np.shape(r):
        return OutputStats(max_abs_err=float("inf"), mean_abs_err=float("inf"), cosine=0.0,
                           centered_cosine=None if _rows(r, samples) is None else 0.0,
                           not_measurable=constant), float("inf")
    both = np.isfinite(g64) & finite_r
    with np.errstate(invalid="ignore"):
        same = (np.isnan(g64) & np.isnan(r64)) | (~both & (g64 == r64))  # the same NaN / inf in both
    mismatched = bool((~both & ~same).any())
    if not both.all():
        if not finite_r.any():
            constant = "no finite value"
        g64, r64 = g64[both], r64[both]
    diff = np.abs(g64 - r64)
    cos = 0.0 if constant is not None else _cos(g64, r64)
    rel = float("inf") if mismatched else float((diff / np.maximum(np.abs(r64), 1e-6)).max(initial=0.0))
    max_abs = float("inf") if mismatched else float(diff.max(initial=0.0))
    mean_abs = float("inf") if mismatched else float(diff.mean()) if diff.size else 0.0
    centered = centered_cosine(g, r, samples)
    return OutputStats(max_abs_err=max_abs, mean_abs_err=mean_abs, cosine=cos,
                       centered_cosine=0.0 if constant is not None and centered is not None else centered,
                       not_measurable=constant), rel


def compare_outputs(got: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                    names: Sequence[str] | None = None, samples: int | None = None) -> ParityStats:
    """Max abs / max rel / mean abs error and the minimum cosine over the measurable outputs; the outputs whose
    reference is constant over the ``samples`` inputs (default: the first output's leading dim) or all zeros,
    by name; with ``names``, each output's own figures too."""
    per: dict[str, OutputStats] = {}
    worst = ParityStats(max_abs_err=0.0, max_rel_err=0.0, mean_abs_err=0.0, cosine=1.0)
    labels = list(names) if names is not None and len(names) == len(ref) else [f"output_{i}" for i in range(len(ref))]
    if samples is None and ref and np.ndim(ref[0]) >= 1:
        samples = int(np.shape(ref[0])[0])
    for name, g, r in zip(labels, got, ref, strict=True):
        one, rel = _one_output(g, r, samples)
        per[name] = one
        worst = ParityStats(max_abs_err=max(worst.max_abs_err, one.max_abs_err), max_rel_err=max(worst.max_rel_err, rel),
                            mean_abs_err=max(worst.mean_abs_err, one.mean_abs_err),
                            cosine=worst.cosine if one.not_measurable else min(worst.cosine, one.cosine),
                            not_measurable=worst.not_measurable)
        if one.not_measurable:
            worst.not_measurable[name] = one.not_measurable
    measured = [o.centered_cosine for o in per.values() if o.centered_cosine is not None and not o.not_measurable]
    worst.centered_cosine = min(measured, default=None)
    if ref and len(worst.not_measurable) == len(ref):
        worst.cosine = 0.0  # nothing was measured: never a perfect match
        if any(o.centered_cosine is not None for o in per.values()):
            worst.centered_cosine = 0.0
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
                   reference: str, output_names: Sequence[str] | None = None,
                   random_inputs: bool = False) -> AccuracyStats:
    """Errors vs the reference over every output (worst, and each by name); top-k agreement and, with labels,
    top-k accuracy from the first output that is class scores (see :func:`is_class_scores`).

    On ``random_inputs`` (synthetic data) the top-k agreement is left out: the argmax of noise measures nothing
    (a static INT8 resnet18 at 82% top-1 agreement on held-out photos agreed on 0% of random-normal inputs)."""
    names = list(output_names) if output_names is not None and len(output_names) == len(ref) \
        else [f"output_{i}" for i in range(len(ref))]
    cmp = compare_outputs(outputs, ref, names, samples=len(ref[0]))
    stats = AccuracyStats(reference=reference, samples=len(ref[0]), max_abs_err=cmp.max_abs_err,
                          mean_abs_err=cmp.mean_abs_err, cosine=cmp.cosine, centered_cosine=cmp.centered_cosine,
                          per_output=cmp.per_output,
                          not_measurable=cmp.not_measurable)
    scored = next((i for i, (r, n) in enumerate(zip(ref, names, strict=True)) if is_class_scores(r.shape, n)), None)
    if scored is None or np.shape(outputs[scored]) != np.shape(ref[scored]):
        return stats
    got, want = np.asarray(outputs[scored]), np.asarray(ref[scored])
    stats.scored_output = names[scored]
    k = min(5, want.shape[1])
    ref_top1 = want.argmax(1)
    stats.ref_top1_classes = int(np.unique(ref_top1).size)
    if random_inputs and labels is None:
        return stats
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


def unmeasured_drop(stats: AccuracyStats, random_init: bool = False, inputs: str = "inputs") -> str | None:
    """Why :func:`accuracy_drop` cannot measure ``stats``, in one line, or None when it can: top-1 rests on the
    class-score output, the output cosine on every output that varies; a constant or all-zero reference output
    is "not measurable", never a perfect match (a random-init ViT's zero-initialised head outputs 0 for every
    input: zeros against zeros)."""
    if not stats.not_measurable:
        return None
    top1_basis = (stats.top1_acc is not None and stats.ref_top1_acc is not None) or \
        (not random_init and stats.top1_agreement is not None and vacuous_agreement(stats) is None)
    if top1_basis and stats.scored_output not in stats.not_measurable:
        return None
    if not top1_basis and len(stats.not_measurable) < len(stats.per_output):
        return None  # the cosine of the outputs that vary
    unmeasured = {n: w for n, w in stats.not_measurable.items() if not top1_basis or n == stats.scored_output}
    return not_measurable_line(stats.model_copy(update={"not_measurable": unmeasured}), stats.samples, inputs)


def vacuous_agreement(stats: AccuracyStats) -> str | None:
    """Why top-1 agreement with the reference would measure nothing, in a few words, or None: the reference's top-1
    is the same class for every one of two or more inputs (a random-init Hugging Face ViT says class 1 for each
    held-out photo: a variant that ignored its input would agree 100%)."""
    if stats.top1_agreement is None or stats.samples < 2 or stats.ref_top1_classes != 1:
        return None
    return f"the FP32 reference's top-1 is one class for all {stats.samples} inputs, so top-1 agreement measures nothing"


def cosine_drop(stats: AccuracyStats | ParityStats) -> tuple[float, str]:
    """(100 x (1 - cosine), what that cosine is): the centered cosine (:func:`centered_cosine`: the part of the
    outputs that depends on the input) where the outputs have one, else the plain output cosine (one input)."""
    if stats.centered_cosine is not None:
        return 100.0 * (1.0 - stats.centered_cosine), "100 x (1 - centered output cosine vs FP32)"
    return 100.0 * (1.0 - stats.cosine), "100 x (1 - output cosine vs FP32)"


def accuracy_drop(stats: AccuracyStats, random_init: bool = False) -> tuple[float, str]:
    """(drop in points, basis): top-1 accuracy loss with labels, else top-1 disagreement with FP32; for an
    output that is not class scores (an embedding), or for random-init weights, 100 x (1 - cosine with FP32) on
    the outputs minus the FP32 reference's mean over the inputs (:func:`cosine_drop`). A reference the drop would
    rest on that is constant or all zeros raises AccuracyGateError with one line (:func:`unmeasured_drop`):
    nothing can be measured against it.

    Random-init weights give near-uniform class scores whose argmax flips on rounding noise (a random resnet50's
    INT8 variant: cosine 0.9997 with FP32, yet 2 of 11 top-1 classes differ): class agreement measures nothing
    there, so the output itself is compared, centred: its plain cosine rests on what every input shares (that
    variant's centered cosine is 0.993). So is a reference whose top-1 is one class for every input
    (:func:`vacuous_agreement`), and class scores on random inputs (no top-1 agreement: see :func:`accuracy_stats`)."""
    if (why := unmeasured_drop(stats, random_init)) is not None:
        raise AccuracyGateError(why)
    if stats.top1_acc is not None and stats.ref_top1_acc is not None:
        return 100.0 * (stats.ref_top1_acc - stats.top1_acc), "top-1 accuracy (labels)"
    if random_init:
        drop, basis = cosine_drop(stats)
        return drop, f"{basis}: random-init weights, whose near-uniform class scores make top-1 agreement meaningless"
    if (vacuous := vacuous_agreement(stats)) is not None:
        drop, basis = cosine_drop(stats)
        return drop, f"{basis}: {vacuous}"
    if stats.top1_agreement is not None:
        return 100.0 * (1.0 - stats.top1_agreement), "top-1 agreement with FP32 (no labels)"
    drop, basis = cosine_drop(stats)
    return drop, f"{basis}: " + ("not a classifier output" if stats.scored_output is None
                                 else "random inputs, whose top-1 class measures nothing")
