"""The benchmark harness: every backend, the same inputs, the same reference, the same timer.

Every (backend, variant) is loaded once and its outputs on the accuracy pool checked against the FP32
reference; then, for each batch size (and swept dim value), all of them are timed on the exact same feed
in interleaved rounds with the order rotated (``runtimes.timing``), so the order they run in cannot decide
which is faster, and each p50 comes with the spread of its rounds.

A sequence of calls that belongs together (a runner's session: prefill, then decode steps) is timed as one unit
by ``runtimes.timing.time_units``, with the same rounds and intervals.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from calibration.cpu import precision_problem
from calibration.pools import InputPool, heldout_pool, image_pool, random_pool, source_pool
from core.errors import BackendUnavailableError, InputError
from core.flagtext import int_items, ints_field, names_field
from core.flops import PEAK_MEASURES, measured_peaks, peak_fraction, row_peak, variant_macs
from core.iospec import IOSpec, feed_digest
from core.manifest import Artifact, Manifest
from core.metrics import (
    AccuracyStats,
    LatencyStats,
    accuracy_drop,
    accuracy_stats,
    cosine_drop,
    unmeasured_drop,
)
from core.models import is_random_init
from core.records import TrtQdqParams
from core.resources import ResourceSampler, check_feed_memory
from core.shapes import apply_input_shapes
from reports.models import BenchRecord, BenchResults
from runtimes import RUNNERS, check_backends
from runtimes.base import Device, Runner, RunnerOptions
from runtimes.timing import interleaved

if TYPE_CHECKING:
    from core.flops import Peak, VariantMacs
    from runtimes.decoding import GenerationConfig
    from runtimes.gpu import NvmlSampler


class BenchConfig(BaseModel):
    """A benchmark request."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: Path = Field(description="Folder with manifest.json (from `convert`)")
    backends: list[str] = Field(default=["eager", "torchscript", "ort"], description="Names from runtimes.RUNNERS")
    batch_sizes: list[int] = Field(default=[1, 8])
    warmup: int = Field(default=10, ge=0)
    iters: int = Field(default=100, ge=1)
    device: Device = "cpu"
    threads: int | None = Field(default=None, ge=1, description="Intra-op threads for every backend")
    data: Path | None = Field(default=None, description="Accuracy data instead of the artifact's own held-out data: "
                                                         "an image folder (class sub-folders = labels), or a "
                                                         ".npy/.npz keyed by input name (optional 'labels')")
    variants: list[str] | None = Field(default=None, description="Artifact names to include (default: all ok)")
    precisions: list[str] = Field(default=["fp32"], description="Compute precisions of the FP32 file and the PyTorch "
                                                               "weights (PyTorch autocast, OpenVINO's precision hint; "
                                                               "fp16/bf16: cuda, or a CPU with units for them)")
    accuracy_samples: int = Field(default=32, ge=1, description="Inputs in the accuracy pool")
    input_shape: str | None = Field(default=None, description="Binds the model's symbolic dims for the run, as "
                                                              "convert's --input-shape (its batch is not used)")
    dims: dict[str, list[int]] = Field(default_factory=dict, description="Named dims to sweep as batch_sizes is "
                                                                         "swept, e.g. {'sequence': [16, 128]}")
    seed: int = 0
    component: str | None = Field(default=None, description="A model exported as several files (encoder, decoder, "
                                                             "...): the one to measure (default: each in turn)")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra RunnerOptions fields, a backend's own "
                                                                        "settings included (openvino_hint, ...)")
    rounds: int = Field(default=5, ge=1, description="Interleaved rounds the timed iterations are split over; "
                                                     "the order of the targets rotates each round")
    round_warmup: int = Field(default=1, ge=0, description="Untimed calls at the start of every round's block")
    ort_spinning: bool = Field(default=True, description="ONNX Runtime's intra-op threads spin while waiting "
                                                         "for work (its default, what a deployment runs); recorded "
                                                         "in the results")
    text: str | None = Field(default=None, description="A KV-cache decoder: held-out text for each variant's "
                                                       "perplexity (a UTF-8 file, or 'stdlib': the held-out "
                                                       "standard library files of calibration.text)")

    # -- the flags' text, parsed here (one line naming the flag), so the API, sweep and the CLI share the rules ----
    _names = field_validator("backends", "precisions", "variants", mode="before")(names_field)
    _batches = field_validator("batch_sizes", mode="before")(ints_field)

    @field_validator("dims", mode="before")
    @classmethod
    def _dims(cls, value: Any) -> Any:
        if value is None or value == "":  # --dims not given
            return {}
        return parse_dims(value) if isinstance(value, str) else value

    @field_validator("dims")
    @classmethod
    def _positive_dims(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        if any(not v or min(v) < 1 for v in value.values()):
            raise InputError(f"--dims values must be positive integers, got {value}")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        return resolve_device(value) if isinstance(value, str) else value

    @field_validator("options")
    @classmethod
    def _openvino_hint(cls, value: dict[str, Any]) -> dict[str, Any]:
        hint = value.get("openvino_hint")
        if isinstance(hint, str):
            if hint.upper() not in OPENVINO_HINTS:
                raise InputError(f"unknown --openvino-hint {hint!r}; choose LATENCY or THROUGHPUT")
            return {**value, "openvino_hint": hint.upper()}
        return value

    @model_validator(mode="after")
    def _fits_the_device(self) -> BenchConfig:
        check_gpu_request(self)
        return self


def parse_dims(text: str) -> dict[str, list[int]]:
    """``sequence=16,128`` (``;`` between dims) -> {"sequence": [16, 128]}, or one clear line."""
    out: dict[str, list[int]] = {}
    for part in text.split(";"):
        name, sep, values = part.strip().partition("=")
        if not sep or not name.strip():
            raise InputError(f"malformed --dims {text!r}: expected NAME=V1,V2 (e.g. sequence=16,128)")
        out[name.strip()] = int_items(values, f"--dims {name.strip()}")
    return out


#: OpenVINO's PERFORMANCE_HINT values (``--openvino-hint``, any case)
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT")


@dataclass
class Target:
    backend: str
    artifact: Artifact
    precision: str


def build_pool(manifest: Manifest, cfg: BenchConfig, size: int, log: Callable[[str], None]) -> InputPool:
    """The accuracy pool: ``--data`` when given; else the held-out data convert graded the variants on
    (``Manifest.held_out``); random inputs only where the artifact has none, said in one line (then accuracy is
    graded on the centered output cosine only, see :func:`graded_drop`)."""
    if cfg.data is not None:
        if Path(cfg.data).is_dir():
            return image_pool(manifest.iospec, manifest.source, cfg.data, size, log, cfg.seed)
        return source_pool(str(cfg.data), manifest.iospec, manifest.source, cfg.seed, size, role="accuracy (--data)")
    why = "this artifact has no held-out data (convert keeps it with --int8/--calib, --eval-data)"
    if manifest.held_out is not None:
        got = heldout_pool(cfg.artifact_dir, manifest.held_out, manifest.iospec, size)
        if isinstance(got, InputPool):
            return got
        why = f"the artifact's held-out data does not fit this run: {got}"
    log(f"[yellow]warning:[/] accuracy on random inputs: {why}; pass --data for real inputs. Top-1 is not graded "
        "on noise: the centered output cosine is")
    return random_pool(manifest.iospec, size, cfg.seed)


#: How a drop graded on random inputs (``graded_drop``) ends its basis, after the cosine it rests on.
RANDOM_INPUTS_BASIS = "on random inputs (no held-out data): top-1 on noise is not graded"


def graded_drop(stats: AccuracyStats, pool: InputPool, manifest: Manifest) -> tuple[float | None, str]:
    """A variant's drop against FP32 in points, and its basis, as convert's gates and tune grade it
    (``core.metrics.accuracy_drop``: top-1 accuracy with labels, the centered output cosine for random-init weights,
    else top-1 agreement); on random inputs the centered output cosine only. A reference output the drop rests on
    that is constant or all zeros gives (None, the one line that says so): not measurable, never a perfect match."""
    random_init = is_random_init(manifest.source)
    if (why := unmeasured_drop(stats, random_init or pool.kind == "random", pool.source)) is not None:
        return None, why
    if pool.kind == "random":
        drop, basis = cosine_drop(stats)
        return drop, f"{basis} {RANDOM_INPUTS_BASIS}"
    return accuracy_drop(stats, random_init)


TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
GPU_ONLY_OPTIONS = ("cuda_graphs", "include_transfers")


def check_gpu_request(cfg: BenchConfig) -> None:
    """Precisions and options that cannot apply to the requested device: one clear line (BenchConfig's own rule:
    every config built is checked)."""
    unknown = [p for p in cfg.precisions if p not in TORCH_PRECISIONS]
    if unknown:
        raise InputError(f"unknown precision(s) {unknown}; choose from {', '.join(TORCH_PRECISIONS)}")
    if cfg.device == "cpu":
        # a CPU without bf16/fp16 units: refused, not timed as an emulation under the precision's name (issue 32)
        lacks = [(p, why) for p in cfg.precisions if (why := precision_problem(p)) is not None]
        gpu_only = [f"--precisions {p}" for p, _ in lacks]
        gpu_only += [f"--{k.replace('_', '-')}" for k in GPU_ONLY_OPTIONS if cfg.options.get(k)]
        if gpu_only:
            raise InputError(f"{', '.join(gpu_only)}: only measured with --device cuda"
                             + (f" or on a CPU with the units for it: {lacks[0][1]}" if lacks else ""))


def check_engine_batches(manifest: Manifest, cfg: BenchConfig) -> None:
    """Every requested batch size must lie in each selected TensorRT engine's profile."""
    from runtimes.trt import batch_range

    if not any("plan" in RUNNERS[b].artifact_kinds for b in cfg.backends if b in RUNNERS):
        return
    for a in manifest.by_kind("plan"):
        if a.status != "ok" or (cfg.variants is not None and a.name not in cfg.variants):
            continue
        lo, hi = batch_range(a)
        outside = [b for b in cfg.batch_sizes if not lo <= b <= hi]
        if outside:
            raise InputError(f"TensorRT engine {a.name} ({a.file.path}) accepts batch {lo}..{hi}, but --batch-sizes "
                             f"asks for {outside}: rebuild with `convert ... --trt --max-batch "
                             f"{max([hi, *outside])}` (and --min-batch) or drop those sizes")


def resolve_device(device: str) -> Device:
    """``auto`` -> cuda when PyTorch sees a GPU, else cpu; anything but auto/cpu/cuda is an InputError."""
    if device == "auto":
        from core.resources import cuda_problem

        return "cuda" if cuda_problem() is None else "cpu"
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown --device {device!r}; choose auto, cpu or cuda")
    return device  # type: ignore[return-value]


def _wanted(a: Artifact, runner_cls: type[Runner], variants: list[str] | None) -> bool:
    """Whether ``runner_cls`` runs ``a``: the PyTorch weights always (they are the model), a variant named
    by ``--variants``, else every variant but those made for TensorRT on backends that do not run them as
    TensorRT would (``Runner.tensorrt_like``)."""
    if runner_cls.needs_weights:
        return True
    if variants is not None:
        return a.name in variants
    return runner_cls.tensorrt_like or not isinstance(a.params, TrtQdqParams)


def _check_backends(manifest: Manifest, cfg: BenchConfig) -> None:
    """Unknown or unavailable backends, impossible requests and unknown variants: one clear error."""
    check_backends(cfg.backends)
    check_engine_batches(manifest, cfg)
    problems = {b: why for b in cfg.backends if (why := RUNNERS[b].available(cfg.device)) is not None}
    if problems:
        usable = [b for b in RUNNERS if RUNNERS[b].available(cfg.device) is None]
        detail = "; ".join(f"{b}: {w}" for b, w in problems.items())
        raise BackendUnavailableError(f"backend(s) unavailable on {cfg.device}: {detail} "
                                      f"(usable here: {', '.join(usable) or 'none'})")
    if cfg.variants:
        missing = [v for v in cfg.variants if v not in manifest.artifacts]
        failed = {f.name: f for f in manifest.failed_variants}
        if (gone := next((v for v in missing if v in failed), None)) is not None:
            raise InputError(f"variant {gone!r} was not written by convert ({failed[gone].status}: "
                             f"{failed[gone].reason}); in the manifest: {sorted(manifest.artifacts)}")
        if missing:
            raise InputError(f"unknown variant(s) {missing}; in the manifest: {sorted(manifest.artifacts)}")


def select_targets(manifest: Manifest, cfg: BenchConfig) -> list[Target]:
    """(backend, artifact, precision) triples; unknown/unavailable backends are one clear error."""
    _check_backends(manifest, cfg)
    targets: list[Target] = []
    for b in cfg.backends:
        runner_cls = RUNNERS[b]
        # a variant that failed its gate runs only when --variants names it
        arts = [a for a in manifest.artifacts.values() if a.kind in runner_cls.artifact_kinds
                and (a.status == "ok" or a.name in (cfg.variants or [])) and _wanted(a, runner_cls, cfg.variants)]
        if not arts:
            raise InputError(f"backend {b} has nothing to run in this artifact folder "
                             f"(needs {'/'.join(runner_cls.artifact_kinds)}; have {sorted(manifest.artifacts)})")
        for a in arts:
            for p in runner_cls.compute_precisions(a, cfg.precisions):
                targets.append(Target(backend=b, artifact=a, precision=p))
    return targets


def unrunnable(manifest: Manifest, cfg: BenchConfig) -> list[tuple[str, str, str]]:
    """(backend:variant, precision, why) of each variant ``--variants`` names that a backend asked for cannot run: a
    file of a kind only another backend reads (an OpenVINO IR on ONNX Runtime), skipped with that reason."""
    out: list[tuple[str, str, str]] = []
    for b in cfg.backends:
        cls = RUNNERS[b]
        for a in [manifest.artifacts[v] for v in cfg.variants or [] if v in manifest.artifacts]:
            if not cls.needs_weights and a.kind not in cls.artifact_kinds:
                readers = [n for n, r in RUNNERS.items() if a.kind in r.artifact_kinds]
                out.append((f"{b}:{a.name}", a.precision, f"{b} does not run {a.kind} files; {a.name} runs on "
                                                          f"{', '.join(readers) or 'no backend here'}"))
    return out


def run_pool(runner: Runner, pool: InputPool, chunk: int) -> list[np.ndarray]:
    """Every output over the whole pool, in batches of ``chunk``. A fixed-batch model gets full
    batches (the last one wraps around the pool) and the surplus rows are dropped."""
    fixed = runner.manifest.iospec.fixed_batch() is not None
    outs = [runner.infer(pool.feed(s, chunk if fixed else min(chunk, pool.size - s)))
            for s in range(0, pool.size, chunk)]
    return [np.concatenate([o[i] for o in outs])[: pool.size] for i in range(len(outs[0]))]


def reference_runner(manifest: Manifest, base: Path, threads: int | None) -> Runner:
    """The FP32 reference: PyTorch eager on CPU, or ONNX Runtime on the FP32 ONNX for ONNX inputs."""
    from runtimes.ort import OrtRunner
    from runtimes.torch_eager import EagerRunner

    opts = RunnerOptions(device="cpu", threads=threads)
    kinds = EagerRunner.artifact_kinds
    weights = sorted((a for a in manifest.artifacts.values() if a.kind in kinds), key=lambda a: kinds.index(a.kind))
    if weights:
        return EagerRunner(manifest, base, weights[0], opts)
    return OrtRunner(manifest, base, manifest.artifacts["fp32"], opts)


@dataclass
class BenchSetup:
    """What every target is measured against: the same feeds, the same reference outputs."""

    manifest: Manifest
    base: Path
    targets: list[Target]
    pool: InputPool
    chunk: int
    points: list[tuple[int, dict[str, int]]]  # (batch, dim values) of every timed measurement
    feeds: list[dict[str, np.ndarray]]  # one per point
    digests: list[str]
    ref_out: list[np.ndarray]
    ref_label: str
    macs: dict[str, VariantMacs]  # by artifact: multiply-accumulates of one call at each point, on its own file


def load_checked_manifest(cfg: BenchConfig) -> Manifest:
    """The manifest, refused unless every file matches its hash and every batch size fits the model."""
    manifest = Manifest.load(cfg.artifact_dir)
    problems = manifest.verify(Path(cfg.artifact_dir))
    if problems:
        raise InputError("artifact folder does not match its manifest: " + "; ".join(problems))
    if cfg.component is not None:
        if not manifest.components():
            raise InputError(f"--component {cfg.component}: this model was exported as one file")
        manifest = manifest.component_view(cfg.component)
    for b in cfg.batch_sizes:
        manifest.iospec.check_batch(b)
    return manifest


def prepare_bench(cfg: BenchConfig, log: Callable[[str], None]) -> BenchSetup:
    """Check the request, pick the targets, build the input pool and run the FP32 reference on it."""
    manifest = load_checked_manifest(cfg)
    manifest.iospec = bench_spec(manifest.iospec, cfg)
    base = Path(cfg.artifact_dir)
    targets = select_targets(manifest, cfg)
    chunk = manifest.iospec.fixed_batch() or max(cfg.batch_sizes)
    points = bench_points(manifest.iospec, cfg)
    pool = build_pool(manifest, cfg, max(cfg.accuracy_samples, max(cfg.batch_sizes)), log)
    # The bound dims: slices of the accuracy pool (as before); a swept value: seeded random feeds of its own.
    feeds = [pool.feed(0, b) if not dims else manifest.iospec.random_feed(b, seed=cfg.seed, dims=dims)
             for b, dims in points]
    with reference_runner(manifest, base, cfg.threads) as ref_runner:
        ref_out = run_pool(ref_runner, pool, chunk)
        ref_label = f"{ref_runner.name}:{ref_runner.artifact.name}:fp32:cpu"
    log(f"reference: {ref_label} on {pool.size} inputs ({pool.source})")
    macs = variant_macs(manifest, base, dict.fromkeys(t.artifact.name for t in targets),
                        [{n: a.shape for n, a in f.items()} for f in feeds])
    return BenchSetup(manifest=manifest, base=base, targets=targets, pool=pool, chunk=chunk, points=points,
                      feeds=feeds, digests=[feed_digest(f) for f in feeds], ref_out=ref_out, ref_label=ref_label,
                      macs=macs)


def bench_spec(spec: IOSpec, cfg: BenchConfig) -> IOSpec:
    """The artifact's IOSpec with --input-shape's dim values; an unbound dim not swept: one line."""
    spec, _ = apply_input_shapes(spec, cfg.input_shape)
    spec.with_dims({d: v[0] for d, v in cfg.dims.items() if v})  # unknown names and bad values: one line
    missing = [d for d in spec.unbound_dims() if d not in cfg.dims]
    if missing:
        raise InputError(f"the model's dim(s) {', '.join(missing)} have no value: give them with --input-shape or "
                         f"sweep them with --dims {missing[0]}=16,128")
    return spec


def bench_points(spec: IOSpec, cfg: BenchConfig) -> list[tuple[int, dict[str, int]]]:
    """Every (batch, dim values) to time: --batch-sizes x every combination of the --dims values (each, and the
    accuracy pool, checked to fit in memory)."""
    combos: list[dict[str, int]] = [dict(zip(cfg.dims, vals, strict=True))
                                    for vals in itertools.product(*cfg.dims.values())] if cfg.dims else [{}]
    points = [(b, c) for b in cfg.batch_sizes for c in combos]
    for batch, dims in [*points, (cfg.accuracy_samples, combos[0])]:  # too big to fit: refused before any is built
        check_feed_memory(spec, batch, f"--batch-sizes {batch}{''.join(f' {d}={v}' for d, v in dims.items())}"
                          if (batch, dims) in points else f"--accuracy-samples {batch}", dims)
    return points


@dataclass
class Loaded:
    """A target loaded for the timing rounds, with what was measured while loading it."""

    target: Target
    runner: Runner
    load_s: float
    accuracy: AccuracyStats
    ram_mb: float
    ram_delta_mb: float
    vram_mb: float | None
    drop: tuple[float | None, str]  # points lost against FP32 and the basis (graded_drop)


def pool_accuracy(setup: BenchSetup, runner: Runner) -> AccuracyStats:
    """``runner``'s outputs on the accuracy pool against the reference's (every output, by name; no top-k agreement
    on random inputs: see :func:`core.metrics.accuracy_stats`)."""
    return accuracy_stats(run_pool(runner, setup.pool, setup.chunk), setup.ref_out, setup.pool.labels,
                          setup.ref_label, runner.manifest.iospec.output_names, random_inputs=setup.pool.kind == "random")


def _load_target(setup: BenchSetup, t: Target, runner: Runner, skip: Callable[[str], None],
                 device: Device) -> Loaded | None:
    """Load ``runner`` and check its outputs on the pool against the reference; the RSS sampler runs only
    here, never during timed calls. A backend that cannot load here (BackendUnavailableError) is reported to
    ``skip`` and gives None."""
    from runtimes.gpu import NvmlSampler

    with ResourceSampler() as sampler, NvmlSampler(enabled=device == "cuda") as gpu:
        t_load = time.perf_counter()
        try:
            runner.load()
        except BackendUnavailableError as exc:
            skip(str(exc))
            return None
        load_s = time.perf_counter() - t_load
        acc = pool_accuracy(setup, runner)
    return Loaded(target=t, runner=runner, load_s=load_s, accuracy=acc, ram_mb=sampler.peak_rss / 2**20,
                  ram_delta_mb=(sampler.peak_rss - sampler.baseline_rss) / 2**20, vram_mb=gpu.growth_mb,
                  drop=graded_drop(acc, setup.pool, setup.manifest))


def _time_point(setup: BenchSetup, cfg: BenchConfig, loaded: list[Loaded], i: int,
                gpu: NvmlSampler, peaks: dict[str, Peak]) -> list[BenchRecord]:
    """Every loaded target on the feed of point ``i`` (a batch size and dim values), interleaved: one record
    each."""
    b, dims = setup.points[i]
    feed = setup.feeds[i]
    prepared = [x.runner.prepare(feed) for x in loaded]

    def window() -> Callable[[], float | None]:
        mark = gpu.mark()
        return lambda: gpu.util_since(mark)

    timed = interleaved([x.runner for x in loaded], prepared, warmup=cfg.warmup, iters=cfg.iters, rounds=cfg.rounds,
                        block_warmup=cfg.round_warmup, gpu_util=window if gpu.available else None)
    records = []
    # each row against the peak of its own precision (never an INT8 row against FP32's), measured in run_bench
    for x, tm in zip(loaded, timed, strict=True):
        lat = LatencyStats.from_samples(tm.samples, tm.rounds)
        peak, basis = row_peak(x.target.precision, peaks, "this CPU" if cfg.device == "cpu" else cfg.device)
        macs = setup.macs[x.target.artifact.name]
        gflop, fraction = peak_fraction(macs.per_point[i], lat.p50, peak.rate if peak else None)
        t = x.target
        records.append(BenchRecord(
            model=setup.manifest.source.model, backend=t.backend, variant=t.artifact.name, precision=t.precision,
            device=cfg.device, batch_size=b, latency_ms=lat, throughput=b / (lat.mean / 1e3),
            ram_mb=x.ram_mb, ram_delta_mb=x.ram_delta_mb, cpu_util=tm.cpu_util,
            vram_mb=x.runner.memory_stats().get("vram_mb", x.vram_mb),
            gpu_util=sum(tm.gpu_util) / len(tm.gpu_util) if tm.gpu_util else None,
            model_size_mb=t.artifact.file.size_bytes / 2**20, load_s=x.load_s, input_digest=setup.digests[i],
            gflop=gflop, peak_fraction=fraction, peak_precision=peak.precision if peak else None, peak_basis=basis,
            accuracy=x.accuracy, accuracy_drop=x.drop[0], accuracy_basis=x.drop[1], dims=dims, input_shapes={n: list(a.shape) for n, a in feed.items()},
            notes=[f"failed at convert: {_failure(t.artifact)}"] if t.artifact.status != "ok" else [],
            extra=x.runner.record_extra() | tm.block_warmup()))
        if macs.note:
            records[-1].notes.append(macs.note)
    return records


def _failure(a: Artifact) -> str:
    gate = a.metrics.gate
    return (gate.reason if gate is not None and gate.reason else "; ".join(a.notes[-1:])) or "status failed"


def _skipped(results: BenchResults, log: Callable[[str], None], label: str, precision: str, why: str) -> None:
    results.warnings.append(f"{label} ({precision}) skipped: {why}")
    log(f"[yellow]skipped {label}: {why}[/]")


def generation_request(cfg: BenchConfig) -> GenerationConfig | None:
    """``bench``'s request as a generation benchmark when its artifact is one decoder file with a KV cache, else
    None: its flags where given; a flag left at bench's default takes the generation default (bench's default
    backends mean every backend with a generation loop, its default 100 iterations would be 100 generation loops
    per point). ``--dims sequence=...`` gives the prompt lengths."""
    from runtimes.decoding import GenerationConfig
    from runtimes.session import is_generation_artifact

    if cfg.component is not None or not is_generation_artifact(Manifest.load(cfg.artifact_dir)):
        if cfg.text is not None:
            raise InputError("--text (perplexity) is for a decoder exported with its KV cache (convert --task "
                             "text-generation-with-past); this artifact is measured one call at a time")
        return None
    if cfg.device != "cpu":
        raise InputError("the generation benchmark of a KV-cache decoder runs on cpu here (--device cpu)")

    def given(name: str) -> bool:
        return bool(getattr(cfg, name) != BenchConfig.model_fields[name].get_default(call_default_factory=True))

    fields: dict[str, Any] = {"artifact_dir": cfg.artifact_dir, "variants": cfg.variants, "text": cfg.text,
                              "threads": cfg.threads, "seed": cfg.seed, "ort_spinning": cfg.ort_spinning}
    fields |= {name: getattr(cfg, name) for name in ("backends", "batch_sizes", "warmup", "iters", "rounds",
                                                     "round_warmup") if given(name)}
    if "backends" in fields:  # the generation backends' own table (genai has no runner): one line naming them
        from runtimes.genbackends import check_generation_backends

        check_generation_backends(fields["backends"])
    if "sequence" in cfg.dims:
        fields["prompt_lengths"] = cfg.dims["sequence"]
    return GenerationConfig(**fields)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print,
              progress: Callable[[str], None] | None = None, *,
              generation: GenerationConfig | Literal["ask"] | None = "ask") -> BenchResults:
    """:func:`bench_one`; a model exported as several files (Optimum's encoder, decoders): each component in turn
    (``--component`` for one), every row's variant named ``fp32/component``. ``generation``: the request's
    :func:`generation_request` when the caller already made it (None: not a generation artifact), so the manifest
    is read for it once."""
    from runtimes.generation import run_generation_bench

    gen = generation_request(cfg) if generation == "ask" else generation
    if gen is not None:  # one decoder file with a KV cache: its generation loop
        return run_generation_bench(gen, log, progress)
    components = Manifest.load(cfg.artifact_dir).components() if cfg.component is None else []
    if not components:
        return bench_one(cfg, log, progress)
    merged: BenchResults | None = None
    for name in components:
        log(f"component {name}")
        got = bench_one(cfg.model_copy(update={"component": name}), log, progress)
        for rec in got.records:
            rec.variant = f"{rec.variant}/{name}"
        if merged is None:
            merged = got
        else:
            merged.records.extend(got.records)
            merged.warnings.extend(w for w in got.warnings if w not in merged.warnings)
    assert merged is not None
    return merged


def bench_one(cfg: BenchConfig, log: Callable[[str], None] = print,
              progress: Callable[[str], None] | None = None) -> BenchResults:
    """Load every target (checking its accuracy), then time all of them point by point in interleaved
    rounds (``runtimes.timing``); see the module docstring. A target whose backend cannot load here is
    skipped with a warning; the others are still measured."""
    from runtimes.gpu import NvmlSampler

    setup = prepare_bench(cfg, log)
    results = BenchResults(model=setup.manifest.source.model, artifact_dir=str(setup.base),
                           config=cfg.model_dump(mode="json") | {"inputs": setup.pool.source},
                           accuracy_inputs=setup.pool.kind)
    for label, precision, why in unrunnable(setup.manifest, cfg):
        _skipped(results, log, label, precision, why)
    with contextlib.ExitStack() as stack:
        loaded: list[Loaded] = []
        for t in setup.targets:
            # BenchConfig.ort_spinning is bench's own field (recorded in the results); it overrides cfg.options'
            opts = RunnerOptions(**{**cfg.options, "device": cfg.device, "threads": cfg.threads,
                                    "precision": t.precision, "ort_spinning": cfg.ort_spinning})
            runner = RUNNERS[t.backend](setup.manifest, setup.base, t.artifact, opts)
            stack.callback(runner.close)
            if progress:
                progress(f"loading {runner.label} {t.precision}")
            skip = functools.partial(_skipped, results, log, runner.label, t.precision)
            if (got := _load_target(setup, t, runner, skip, cfg.device)) is not None:
                loaded.append(got)
        if not loaded:
            raise BackendUnavailableError("no backend could be measured: " + "; ".join(results.warnings))
        if setup.pool.kind == "random":
            results.warnings.append(f"accuracy graded on random inputs ({setup.pool.source}): the artifact has no "
                                    "held-out data that fits this run, so top-1 is not graded (the centered output cosine "
                                    "is); pass --data for real inputs")
        gpu = stack.enter_context(NvmlSampler(enabled=cfg.device == "cuda"))
        peaks: dict[str, Peak] = {}  # by precision: what each row's % of peak divides by (none off the CPU)
        if cfg.device == "cpu":  # measured before the timing, never during it
            fp32_by_library = dict(PEAK_MEASURES["fp32"](cfg.threads))  # the FP32 peak is the best library's
            results.machine["matmul_peak_gflops"] = max(fp32_by_library.values())
            results.machine["matmul_peaks_gflops"] = fp32_by_library
            # no bf16/fp16 peak where the CPU only emulates them
            peaks = measured_peaks(cfg.threads, {"fp32", *(p for x in loaded if precision_problem(
                p := x.target.precision) is None)})
            results.machine["peaks"] = {p: {"basis": k.basis, "library": k.library, "rate": k.rate, "unit": k.unit,
                                            "by_library": dict(PEAK_MEASURES[p](cfg.threads))}
                                        for p, k in peaks.items()}  # every precision's peak rows are divided by
        for i, (b, dims) in enumerate(setup.points):
            if progress:
                progress(f"batch {b}" + "".join(f" {d} {v}" for d, v in dims.items()) +
                         f": {len(loaded)} targets x {cfg.rounds} rounds")
            results.records.extend(_time_point(setup, cfg, loaded, i, gpu, peaks))
    return results
