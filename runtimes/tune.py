"""`tune`: which backend x variant x settings x batch size is fastest on this machine, within an accuracy budget.

Every candidate runs the artifact's variants through the same runners, inputs and accuracy check as
`bench`. Settings are search dimensions, each backend's as its runner declares them (``Runner.search_space``): ONNX
Runtime's intra-op threads, thread spinning, graph optimization level (all, or extended: without the CPU layout
transformations) and execution mode (sequential or parallel), OpenVINO's performance hint. Precision is searched too:
the FP32 file and the PyTorch weights in fp32 and in each reduced precision this CPU computes natively
(``calibration.cpu.native_precisions``; each runner computes it as it declares: ``Runner.compute_precisions``), each a
candidate with its own accuracy check; a precision the CPU or the backend cannot compute is a skipped candidate with
its one line (``Runner.precision_problem``). Candidates outside the accuracy budget are dropped before any timing (settings do not
change accuracy, so it is measured once per backend and variant). The rest are timed in interleaved rounds
with the order rotated (``runtimes.timing``), in stages of growing length; after each stage the candidates
that are clearly slower than the best (their whole p50 interval above the best's: ``core.metrics``' rule)
are pruned, until one stage is left or the time budget runs out. The first stage is a screen (``screen``
calls, one per round): its interval is the range of a candidate's calls, so it prunes only a candidate whose
fastest call is slower than the best's slowest (one thread of two, FP32 against INT8), which on a large model
is most of the search's cost (vit_b_16 at batch 8: 70 candidates, 1-5 s a call). The screen and the first of
``stages`` always run. The best candidate of each precision at each batch size (``best_per_precision``: what to
deploy where INT8 is not allowed) or at each batch size may have been pruned early, its figures resting on the
screen's three calls; if so, a final stage re-times those, the winner and every candidate still within the
winner's noise side by side (``stages[0]`` calls), so the figures they are quoted with come from the same, longer
measurement, and the winner is picked again from it (a tie is not settled by which candidate led the stage
before). Every candidate, its figures (from the last stage it was timed in), interval and the stage it was
pruned at go to ``tune.json``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import BackendUnavailableError, InputError
from core.flagtext import check_choice, ints_field, names_field
from core.manifest import Manifest, utc_now
from core.metrics import AccuracyStats, LatencyStats, clearly_slower
from reports.models import machine_info
from runtimes import RUNNERS, check_backends
from runtimes.base import RunnerOptions
from runtimes.harness import (
    BenchConfig,
    Target,
    graded_drop,
    pool_accuracy,
    prepare_bench,
)
from runtimes.session import is_generation_artifact
from runtimes.timing import interleaved_within_memory

Objective = Literal["latency", "throughput"]


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact_dir: Path
    backends: list[str] = Field(default=["ort", "openvino"], description="Backends to search (unavailable: skipped)")
    batch_sizes: list[int] = Field(default=[1, 8])
    variants: list[str] | None = Field(default=None, description="Artifact names to search (default: every ok one)")
    objective: Objective = Field(default="latency", description="latency: lowest p50 at the smallest batch; "
                                                                "throughput: most samples/s at any batch")
    accuracy_budget: float = Field(default=1.0, ge=0, description="Largest accuracy drop against FP32, in points")
    max_minutes: float = Field(default=10.0, gt=0, description="Stop adding stages after this long")
    screen: int = Field(default=3, ge=0, description="Timed calls per candidate in the screening stage before "
                                                     "`stages`, one per round (0: none; else at least 3)")
    stages: list[int] = Field(default=[10, 30, 60], description="Timed calls per candidate in each stage")
    rounds: int = Field(default=5, ge=3, description="Interleaved rounds per stage")
    accuracy_samples: int = Field(default=32, ge=1)
    data: Path | None = Field(default=None, description="Accuracy data instead of the artifact's held-out data "
                                                         "(as bench's --data)")
    seed: int = 0

    # -- the flags' text and values, checked here (one line naming the flag): the API and the CLI share them ------
    _names = field_validator("backends", "variants", mode="before")(names_field)
    _batches = field_validator("batch_sizes", mode="before")(ints_field)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective(cls, value: Any) -> Any:
        return check_choice(value, get_args(Objective), "--objective")

    @field_validator("screen")
    @classmethod
    def _screen(cls, value: int) -> int:
        if 0 < value < 3:
            raise InputError(f"screen of {value} call(s): at least 3 (its interval needs three rounds), or 0 for none")
        return value


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str
    variant: str
    precision: str
    settings: dict[str, Any]
    batch_size: int
    accuracy_drop_points: float | None = None
    within_budget: bool = True
    skipped: str | None = Field(default=None, description="Why it was not measured (backend unavailable, ...)")
    latency_ms: LatencyStats | None = Field(default=None, description="From the last stage it was timed in")
    throughput: float | None = None
    pruned_at_stage: int | None = Field(default=None, description="Stage after which it was clearly slower")

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.backend}:{self.variant} ({self.precision}) [{opts}] batch {self.batch_size}"


class TuneResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    created_at: str = Field(default_factory=utc_now)
    machine: dict[str, Any] = Field(default_factory=machine_info)
    config: dict[str, Any]
    candidates: list[Candidate]
    winner: str | None
    stages_run: int
    reason: str
    best_per_batch: dict[str, str] = Field(
        default_factory=dict, description="Batch size -> the best candidate measured at it (e.g. which INT8 layout "
                                          "to deploy at that batch): the one that lasted longest in the search, "
                                          "then the lowest p50")
    best_per_precision: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Batch size -> precision -> its best candidate (best_per_batch's rule)")
    final_stage: list[str] = Field(default_factory=list, description="Candidates re-timed side by side after the "
                                                                     "search, when one was pruned early: the "
                                                                     "winner, those within its noise (the winner "
                                                                     "is picked again among them), best_per_batch's "
                                                                     "and best_per_precision's")


def settings_for(backend: str, manifest: Manifest | None = None) -> list[dict[str, Any]]:
    """The search dimensions of a backend, as its runner declares them (``Runner.search_space``; for ``manifest``'s
    model, ``Runner.search_space_for``): its settings that change speed, never its numbers."""
    return RUNNERS[backend].search_space() if manifest is None else RUNNERS[backend].search_space_for(manifest)


def _accuracy(setup: Any, target: Target, log: Callable[[str], None]) -> AccuracyStats | str:
    """One accuracy check per backend and variant (settings do not change the numbers), or why it can't run."""
    opts = RunnerOptions(precision=target.precision)
    runner = RUNNERS[target.backend](setup.manifest, setup.base, target.artifact, opts)
    try:
        with runner:
            return pool_accuracy(setup, runner)
    except BackendUnavailableError as exc:
        log(f"skipped {target.backend}:{target.artifact.name}: {exc}")
        return str(exc)


def _per_sample(c: Candidate) -> LatencyStats:
    """The candidate's latency per sample (batch divided out): what throughput compares."""
    assert c.latency_ms is not None
    lat, b = c.latency_ms, c.batch_size
    interval = (lat.p50_interval[0] / b, lat.p50_interval[1] / b) if lat.p50_interval else None
    return lat.model_copy(update={"p50": lat.p50 / b, "p50_interval": interval})


def _candidates(cfg: TuneConfig, setup: Any, log: Callable[[str], None]) -> list[Candidate]:
    """Every (backend, variant, settings, batch), with its accuracy drop; the latency objective keeps only the
    smallest batch."""
    batches = [min(cfg.batch_sizes)] if cfg.objective == "latency" else sorted(set(cfg.batch_sizes))
    out: list[Candidate] = []
    for t in setup.targets:
        acc = _accuracy(setup, t, log)
        drop, basis = (None, acc) if isinstance(acc, str) else graded_drop(acc, setup.pool, setup.manifest)  # as bench
        if drop is None and not isinstance(acc, str):
            log(f"skipped {t.backend}:{t.artifact.name}: {basis}")  # a constant reference output: not measurable
        for settings, b in itertools.product(settings_for(t.backend, setup.manifest), batches):
            out.append(Candidate(backend=t.backend, variant=t.artifact.name, precision=t.precision, settings=settings,
                                 batch_size=b, accuracy_drop_points=drop, skipped=basis if drop is None else None,
                                 within_budget=drop is not None and drop <= cfg.accuracy_budget + 1e-9))
    return out


def _time_stage(setup: Any, live: list[Candidate], iters: int, rounds: int) -> None:
    """Time the live candidates, one interleaved group per batch size; their latency and throughput updated."""
    targets = {(t.backend, t.artifact.name, t.precision): t for t in setup.targets}
    for b in sorted({c.batch_size for c in live}):
        group = [c for c in live if c.batch_size == b]
        feed = setup.feeds[next(i for i, (pb, _) in enumerate(setup.points) if pb == b)]
        opens = [functools.partial(RUNNERS[c.backend], setup.manifest, setup.base,
                                   targets[(c.backend, c.variant, c.precision)].artifact,
                                   RunnerOptions(precision=c.precision, **c.settings)) for c in group]
        timed = interleaved_within_memory(opens, feed, warmup=2, iters=iters, rounds=rounds)
        for c, tm in zip(group, timed, strict=True):
            c.latency_ms = LatencyStats.from_samples(tm.samples, tm.rounds)
            c.throughput = b / (c.latency_ms.mean / 1e3)


def run_tune(cfg: TuneConfig, log: Callable[[str], None] = print) -> TuneResult:
    """Search, prune, pick; see the module docstring."""
    if is_generation_artifact(Manifest.load(cfg.artifact_dir)):  # a KV-cache decoder: by decode tokens/s within a token-agreement budget
        return tune_generation(cfg, log)
    check_backends(cfg.backends)
    usable = [b for b in cfg.backends if RUNNERS[b].available("cpu") is None]
    for b in sorted(set(cfg.backends) - set(usable)):
        log(f"skipped backend {b}: {RUNNERS[b].available('cpu')}")
    if not usable:
        raise BackendUnavailableError(f"none of the backends {cfg.backends} can run here")
    from calibration.cpu import REDUCED_PRECISIONS, native_precisions

    native = list(native_precisions())
    setup = prepare_bench(BenchConfig(artifact_dir=cfg.artifact_dir, backends=usable, batch_sizes=cfg.batch_sizes,
                                      variants=cfg.variants, accuracy_samples=cfg.accuracy_samples, data=cfg.data,
                                      seed=cfg.seed, precisions=native), log)
    for t in [t for t in setup.targets if t.precision not in ("fp32", t.artifact.precision,
                                                              *RUNNERS[t.backend].compute_in)]:
        setup.targets.remove(t)  # no switch for it (ONNX Runtime): no candidate, one line
        log(f"{t.backend}:{t.artifact.name} is not searched in {t.precision}: "
            f"{RUNNERS[t.backend].precision_problem(t.precision, 'cpu')}")
    candidates = _candidates(cfg, setup, log)
    for t in [t for t in setup.targets if t.precision == "fp32" == t.artifact.precision]:  # what the CPU lacks
        for p in (p for p in REDUCED_PRECISIONS if p not in native and p in RUNNERS[t.backend].compute_in):
            why = RUNNERS[t.backend].precision_problem(p, "cpu")
            fp32 = [c for c in candidates if (c.backend, c.variant, c.precision) == (t.backend, t.artifact.name, "fp32")]
            candidates += [c.model_copy(update={"precision": p, "accuracy_drop_points": None, "within_budget": False,
                                                "skipped": why}) for c in fp32]
            log(f"skipped {t.backend}:{t.artifact.name} in {p}: {why}")
    live = [c for c in candidates if c.within_budget and c.skipped is None]
    if not live:
        raise InputError(f"no candidate is within the accuracy budget of {cfg.accuracy_budget:g} points")
    screens = [cfg.screen] if cfg.screen and len(live) > 1 else []
    deadline, stages_run = time.monotonic() + 60 * cfg.max_minutes, 0
    for stage, iters in enumerate([*screens, *cfg.stages]):
        if stage > len(screens) and (time.monotonic() > deadline or len(live) == 1):
            break
        rounds = iters if stage < len(screens) else cfg.rounds
        log(f"stage {stage + 1}{' (screen)' if stage < len(screens) else ''}: {len(live)} candidate(s) x {iters} "
            f"timed calls in {min(rounds, iters)} interleaved rounds")
        _time_stage(setup, live, iters, rounds)
        stages_run += 1
        best = min(live, key=lambda c: _per_sample(c).p50)
        for c in list(live):
            if clearly_slower(_per_sample(c), _per_sample(best)):
                c.pruned_at_stage = stage + 1
                live.remove(c)
    win, tied, final = _final_stage(cfg, setup, candidates, live, log)
    reason = (f"fastest {'p50 at batch ' + str(win.batch_size) if cfg.objective == 'latency' else 'samples/s'} "
              f"within {cfg.accuracy_budget:g} points after {stages_run} stage(s)"
              + (" and a final stage" if final else "")
              + (f"; within the noise of: {'; '.join(tied)}" if tied else "; every other candidate clearly slower"))
    return TuneResult(config=cfg.model_dump(mode="json"), candidates=candidates, winner=win.label,
                      stages_run=stages_run, reason=reason, best_per_batch=best_per_batch(candidates),
                      best_per_precision=best_per_precision(candidates),
                      final_stage=[c.label for c in final])


def _pick(live: list[Candidate]) -> tuple[Candidate, list[str]]:
    """The lowest p50 per sample, and the labels of the others not clearly slower than it."""
    win = min(live, key=lambda c: _per_sample(c).p50)
    return win, [c.label for c in live if c is not win and not clearly_slower(_per_sample(c), _per_sample(win))]


def _final_stage(cfg: TuneConfig, setup: Any, candidates: list[Candidate], live: list[Candidate],
                 log: Callable[[str], None]) -> tuple[Candidate, list[str], list[Candidate]]:
    """(winner, labels within its noise, candidates re-timed in the final stage). The winner, every candidate
    still within its noise and the best at each batch and precision are re-timed side by side when any of them
    has older figures than the others (pruned at an earlier stage); the winner is then picked again from those
    same-round figures, so that it is not whichever of a tie led at the stage before."""
    win, tied = _pick(live)
    picks = {*best_per_batch(candidates).values(),
             *(label for by_p in best_per_precision(candidates).values() for label in by_p.values())}
    final = [c for c in candidates if c.label in {win.label, *tied, *picks}]
    if not any(c.pruned_at_stage for c in final):
        return win, tied, []  # every one's figures already come from the same, last stage
    log(f"final stage: the winner, the {len(tied)} within its noise and the best at each batch and precision "
        f"({len(final)}) re-timed side by side, {cfg.stages[0]} timed calls in {cfg.rounds} interleaved rounds")
    _time_stage(setup, final, cfg.stages[0], cfg.rounds)
    win, tied = _pick([c for c in final if c is win or c.label in tied])
    return win, tied, final


def best_per_batch(candidates: list[Candidate]) -> dict[str, str]:
    """For each batch size measured, the candidate that lasted longest in the search at it (never pruned
    first), then the lowest p50: with the latency objective, the winner at its batch."""
    timed = [c for c in candidates if c.latency_ms is not None]

    def rank(c: Candidate) -> tuple[float, float]:
        return (-(c.pruned_at_stage or float("inf")), _per_sample(c).p50)

    return {str(b): min((c for c in timed if c.batch_size == b), key=rank).label
            for b in sorted({c.batch_size for c in timed})}


def best_per_precision(candidates: list[Candidate]) -> dict[str, dict[str, str]]:
    """For each batch size and precision measured, its best candidate by best_per_batch's rule."""
    timed = [c for c in candidates if c.latency_ms is not None]
    return {str(b): {p: best_per_batch([c for c in timed if c.batch_size == b and c.precision == p])[str(b)]
                     for p in sorted({c.precision for c in timed if c.batch_size == b})}
            for b in sorted({c.batch_size for c in timed})}


def tune_table(result: TuneResult) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="tune: every candidate (fastest first; pruned = clearly slower than the best)")
    for col in ("candidate", "drop pts", "p50 ms [95%]", "samples/s", "outcome"):
        table.add_column(col, justify="left" if col in ("candidate", "outcome") else "right")
    measured = sorted((c for c in result.candidates if c.latency_ms is not None),
                      key=lambda c: _per_sample(c).p50)
    rest = [c for c in result.candidates if c.latency_ms is None]
    for c in [*measured, *rest]:
        lat = c.latency_ms
        p50 = "-" if lat is None else f"{lat.p50:.3f}" + (
            f" [{lat.p50_interval[0]:.3f}-{lat.p50_interval[1]:.3f}]" if lat.p50_interval else "")
        outcome = ("winner" if c.label == result.winner else c.skipped or
                   ("over the accuracy budget" if not c.within_budget else
                    f"pruned after stage {c.pruned_at_stage}" if c.pruned_at_stage else "within the noise"))
        if c.label in result.final_stage:
            outcome += "; re-timed in the final stage"
        drop = "-" if c.accuracy_drop_points is None else f"{c.accuracy_drop_points:.2f}"
        table.add_row(escape(c.label), drop, p50, "-" if c.throughput is None else f"{c.throughput:.1f}",
                      escape(outcome))
    return table


# -- tune on a KV-cache decoder -----------------------------------------------------------------------------------------
#: the prompt and the new tokens of a tune candidate's generation loop (the prompt capped by the model's positions)
TUNE_PROMPT, TUNE_NEW_TOKENS, TUNE_CHECK_TOKENS = 32, 32, 16


def tune_generation(cfg: TuneConfig, log: Callable[[str], None] = print) -> TuneResult:
    """``tune`` on a KV-cache decoder: every backend x variant that can run the generation loop, ranked by decode
    tokens/s (the objective; ``latency``: at the smallest batch, ``throughput``: at any batch), within an accuracy
    budget in points of greedy token agreement with FP32 (the reference of :func:`check_decoders`: eager PyTorch
    FP32, else ONNX Runtime's FP32; teacher-forced steps, as convert's generation gate). Candidates over the budget
    are not timed; the rest are timed once, interleaved (``stages[0]`` generation loops in ``rounds`` rounds), so
    there is no pruning and no final stage; runner settings are not searched (each runs with its defaults)."""

    from runtimes.decoding import GenerationConfig, max_positions
    from runtimes.genbackends import check_generation_backends
    from runtimes.generation import (
        check_decoders,
        load_decoders,
        load_generation_manifest,
        pick_reference,
        prompt_plan,
        seeded_prompts,
        time_point,
    )

    check_generation_backends(cfg.backends)  # its own table: genai runs a generation loop but has no runner
    manifest = load_generation_manifest(cfg.artifact_dir)
    batches = [min(cfg.batch_sizes)] if cfg.objective == "latency" else sorted(set(cfg.batch_sizes))
    gcfg = GenerationConfig(artifact_dir=cfg.artifact_dir, backends=cfg.backends, variants=cfg.variants,
                            prompt_lengths=[TUNE_PROMPT], batch_sizes=batches, new_tokens=TUNE_NEW_TOKENS,
                            no_cache_tokens=0, check_prompts=cfg.accuracy_samples, check_tokens=TUNE_CHECK_TOKENS,
                            iters=cfg.stages[0], rounds=cfg.rounds, round_warmup=0, seed=cfg.seed)
    lengths, _, notes = prompt_plan(gcfg, max_positions(manifest))
    for n in notes:
        log(f"note: {n}")
    skipped: list[str] = []
    candidates: list[Candidate] = []
    with contextlib.ExitStack() as stack:
        decoders = load_decoders(manifest, gcfg, stack, skipped, log)
        reference = pick_reference(manifest, Path(cfg.artifact_dir), gcfg, decoders, stack, skipped)
        prompts = seeded_prompts(manifest, gcfg.check_prompts, lengths[0], cfg.seed + 1)
        log(f"accuracy: greedy token agreement of {len(decoders)} candidate(s) with {reference.label} "
            f"({gcfg.check_prompts} prompts x {TUNE_CHECK_TOKENS} tokens, teacher-forced)")
        checks = check_decoders(decoders, reference, prompts, TUNE_CHECK_TOKENS)
        ref_label = checks[0].reference
        drops = [round(100.0 * (1.0 - c.forced_agreement), 4) for c in checks]
        for d, drop in zip(decoders, drops, strict=True):
            candidates += [Candidate(backend=d.backend, variant=d.variant, precision=d.precision, settings={},
                                     batch_size=b, accuracy_drop_points=drop,
                                     within_budget=drop <= cfg.accuracy_budget + 1e-9) for b in batches]
        live = [d for d, drop in zip(decoders, drops, strict=True) if drop <= cfg.accuracy_budget + 1e-9]
        if not live:
            raise InputError(f"no candidate is within the accuracy budget of {cfg.accuracy_budget:g} points of "
                             f"greedy token agreement with {ref_label}")
        largest = seeded_prompts(manifest, max(batches), lengths[0], cfg.seed)
        for b in batches:
            log(f"batch {b}: {len(live)} candidate(s) x {gcfg.iters} generation loops of {TUNE_NEW_TOKENS} tokens "
                f"(prompt {lengths[0]}) in {gcfg.rounds} interleaved rounds")
            for row in time_point(manifest, [(d, True) for d in live], largest[:b], TUNE_NEW_TOKENS, gcfg):
                c = next(c for c in candidates if (c.backend, c.variant, c.batch_size) ==
                         (row.backend, row.variant, b))
                c.latency_ms, c.throughput = row.tpot_ms, row.decode_tokens_per_s
    for s in skipped:
        log(f"skipped {s}")
    timed = [c for c in candidates if c.throughput is not None]
    win = max(timed, key=lambda c: c.throughput or 0.0)
    tied = [c.label for c in timed if c is not win and not clearly_slower(_per_sample(c), _per_sample(win))]
    reason = (f"most decode tokens/s (KV-cache generation loop, prompt {lengths[0]}, {TUNE_NEW_TOKENS} new tokens"
              f"{', batch ' + str(win.batch_size) if cfg.objective == 'latency' else ', any batch'}) within "
              f"{cfg.accuracy_budget:g} points of greedy token agreement with {ref_label}; latency_ms is "
              f"the time per output token" + (f"; within the noise of: {'; '.join(tied)}" if tied else
                                               "; every other candidate clearly slower"))
    return TuneResult(config=cfg.model_dump(mode="json") | {"generation": gcfg.model_dump(mode="json"),
                                                            "skipped": skipped},
                      candidates=candidates, winner=win.label, stages_run=1, reason=reason,
                      best_per_batch=best_per_batch(candidates), best_per_precision=best_per_precision(candidates))
