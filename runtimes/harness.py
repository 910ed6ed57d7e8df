"""The benchmark harness: every backend, the same inputs, the same reference, the same timer.

For each (backend, variant) it loads a runner once, checks its outputs on the accuracy pool
against the FP32 reference, then times every batch size on the exact same feeds.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import BackendUnavailableError, InputError
from core.iospec import feed_digest
from core.manifest import Artifact, Manifest
from reports.models import AccuracyStats, BenchRecord, BenchResults, LatencyStats
from runtimes import RUNNERS
from runtimes.base import Device, Runner, RunnerOptions


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
    data: Path | None = Field(default=None, description="Image folder (optionally class sub-folders = labels)")
    variants: list[str] | None = Field(default=None, description="Artifact names to include (default: all ok)")
    precisions: list[str] = Field(default=["fp32"], description="PyTorch compute precisions (fp16/bf16: cuda)")
    accuracy_samples: int = Field(default=32, ge=1, description="Inputs in the accuracy pool")
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict, description="Extra RunnerOptions fields")


@dataclass
class Target:
    backend: str
    artifact: Artifact
    precision: str


@dataclass
class InputPool:
    """The inputs every backend sees: one array per input name, plus labels when known."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    @property
    def size(self) -> int:
        return len(next(iter(self.arrays.values())))

    def feed(self, start: int, batch: int) -> dict[str, np.ndarray]:
        """``batch`` samples from ``start``, wrapping around so any batch size can be served."""
        idx = (np.arange(start, start + batch)) % self.size
        return {n: np.ascontiguousarray(a[idx]) for n, a in self.arrays.items()}


def build_pool(manifest: Manifest, cfg: BenchConfig, size: int, log: Callable[[str], None]) -> InputPool:
    spec = manifest.iospec
    if cfg.data is None:
        feed = spec.random_feed(size, seed=cfg.seed) if spec.fixed_batch() is None else None
        if feed is None:  # static batch: stack fixed-size random batches
            fixed = spec.fixed_batch() or 1
            parts = [spec.random_feed(fixed, seed=cfg.seed + i) for i in range(-(-size // fixed))]
            feed = {n: np.concatenate([p[n] for p in parts])[:size] for n in spec.input_names}
        return InputPool(arrays=feed, labels=None, source=f"random normal (seed {cfg.seed})")
    from calibration.images import load_images, scan_image_folder
    from calibration.sources import image_input, resolve_preprocessing
    from convert.models import categories_for

    if len(spec.inputs) != 1:
        raise InputError("--data gives images; this model has several inputs")
    # The model's own preprocessing (torchvision weights' transforms), fitted to its input size.
    pre = resolve_preprocessing(spec, manifest.source.preprocessing)
    images = scan_image_folder(cfg.data, categories_for(manifest.source))
    loaded = load_images(images, pre, limit=size, channels=image_input(spec)[1])
    if loaded.skipped:
        log(f"skipped {len(loaded.skipped)} unreadable file(s) in {cfg.data}")
    desc = f"{len(loaded.array)} images from {cfg.data}"
    if images.labels is not None:
        desc += f" with labels ({images.label_source})"
    return InputPool(arrays={spec.input_names[0]: loaded.array}, labels=loaded.labels, source=desc)


TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
GPU_ONLY_OPTIONS = ("cuda_graphs", "include_transfers")


def check_gpu_request(cfg: BenchConfig) -> None:
    """Precisions and options that cannot apply to the requested device: one clear line."""
    unknown = [p for p in cfg.precisions if p not in TORCH_PRECISIONS]
    if unknown:
        raise InputError(f"unknown precision(s) {unknown}; choose from {', '.join(TORCH_PRECISIONS)}")
    if cfg.device == "cpu":
        gpu_only = [f"--precisions {p}" for p in cfg.precisions if p != "fp32"]
        gpu_only += [f"--{k.replace('_', '-')}" for k in GPU_ONLY_OPTIONS if cfg.options.get(k)]
        if gpu_only:
            raise InputError(f"{', '.join(gpu_only)}: only measured with --device cuda")


def check_engine_batches(manifest: Manifest, cfg: BenchConfig) -> None:
    """Every requested batch size must lie in each selected TensorRT engine's profile."""
    from convert.engine import batch_range

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
        from runtimes.torch_eager import cuda_problem

        return "cuda" if cuda_problem() is None else "cpu"
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown --device {device!r}; choose auto, cpu or cuda")
    return device  # type: ignore[return-value]


#: Backends that run a variant made for TensorRT (``int8_trt``) as TensorRT would; the others run it
#: only when --variants names it (ONNX Runtime's x86 kernels can saturate with its full-range weights).
TENSORRT_BACKENDS = ("ort-trt", "trt")


def _wanted(a: Artifact, backend: str, variants: list[str] | None) -> bool:
    if a.kind in ("state_dict", "torchscript"):
        return True
    if variants is not None:
        return a.name in variants
    return backend in TENSORRT_BACKENDS or a.params.get("target") != "tensorrt"


def select_targets(manifest: Manifest, cfg: BenchConfig) -> list[Target]:
    """(backend, artifact, precision) triples; unknown/unavailable backends are one clear error."""
    unknown = [b for b in cfg.backends if b not in RUNNERS]
    if unknown:
        raise InputError(f"unknown backend(s) {unknown}; available: {', '.join(RUNNERS)}")
    check_gpu_request(cfg)
    check_engine_batches(manifest, cfg)
    problems = {b: why for b in cfg.backends if (why := RUNNERS[b].available(cfg.device)) is not None}
    if problems:
        usable = [b for b in RUNNERS if RUNNERS[b].available(cfg.device) is None]
        detail = "; ".join(f"{b}: {w}" for b, w in problems.items())
        raise BackendUnavailableError(f"backend(s) unavailable on {cfg.device}: {detail} "
                                      f"(usable here: {', '.join(usable) or 'none'})")
    if cfg.variants:
        missing = [v for v in cfg.variants if v not in manifest.artifacts]
        if missing:
            raise InputError(f"unknown variant(s) {missing}; in the manifest: {sorted(manifest.artifacts)}")
    targets: list[Target] = []
    for b in cfg.backends:
        runner_cls = RUNNERS[b]
        arts = [a for a in manifest.artifacts.values() if a.kind in runner_cls.artifact_kinds and a.status == "ok"
                and _wanted(a, b, cfg.variants)]
        if not arts:
            raise InputError(f"backend {b} has nothing to run in this artifact folder "
                             f"(needs {'/'.join(runner_cls.artifact_kinds)}; have {sorted(manifest.artifacts)})")
        torch_like = b in ("eager", "torchscript")
        for a in arts:
            for p in (cfg.precisions if torch_like else [a.precision]):
                targets.append(Target(backend=b, artifact=a, precision=p))
    return targets


class ResourceSampler:
    """Samples process RSS (and, through hooks, GPU stats) in a background thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.baseline_rss = self._proc.memory_info().rss
        self.peak_rss = self.baseline_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ResourceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)


@contextmanager
def cpu_meter() -> Iterator[dict[str, float]]:
    """Process CPU time over the block as % of all cores."""
    import psutil

    proc = psutil.Process()
    box: dict[str, float] = {}
    t0, c0 = time.perf_counter(), proc.cpu_times()
    yield box
    wall = time.perf_counter() - t0
    c1 = proc.cpu_times()
    used = (c1.user - c0.user) + (c1.system - c0.system)
    box["cpu_util"] = 100.0 * used / max(wall, 1e-9) / (os.cpu_count() or 1)


def accuracy_stats(outputs: np.ndarray, ref: np.ndarray, labels: np.ndarray | None, reference: str) -> AccuracyStats:
    """Errors vs the reference (first output), top-k agreement and, with labels, top-k accuracy."""
    from convert.validate import compare_outputs

    cmp = compare_outputs([outputs], [ref])
    stats = AccuracyStats(reference=reference, samples=len(ref), max_abs_err=cmp["max_abs_err"],
                          mean_abs_err=cmp["mean_abs_err"], cosine=cmp["cosine"])
    if ref.ndim == 2 and ref.shape[1] > 1:
        k = min(5, ref.shape[1])
        ref_top1 = ref.argmax(1)
        got_top1 = outputs.argmax(1)
        got_topk = np.argsort(-outputs, axis=1)[:, :k]
        stats.top1_agreement = float((got_top1 == ref_top1).mean())
        stats.top5_agreement = float(np.mean([ref_top1[i] in got_topk[i] for i in range(len(ref))]))
        if labels is not None:
            ref_topk = np.argsort(-ref, axis=1)[:, :k]
            stats.top1_acc = float((got_top1 == labels).mean())
            stats.top5_acc = float(np.mean([labels[i] in got_topk[i] for i in range(len(labels))]))
            stats.ref_top1_acc = float((ref_top1 == labels).mean())
            stats.ref_top5_acc = float(np.mean([labels[i] in ref_topk[i] for i in range(len(labels))]))
    return stats


def run_pool(runner: Runner, pool: InputPool, chunk: int) -> np.ndarray:
    """The first output over the whole pool, in batches of ``chunk``. A fixed-batch model gets full
    batches (the last one wraps around the pool) and the surplus rows are dropped."""
    fixed = runner.manifest.iospec.fixed_batch() is not None
    outs = [runner.infer(pool.feed(s, chunk if fixed else min(chunk, pool.size - s)))[0]
            for s in range(0, pool.size, chunk)]
    return np.concatenate(outs)[: pool.size]


def interleaved_latency(manifest: Manifest, base: Path, arts: list[Artifact], feed: dict[str, np.ndarray], *,
                        warmup: int, iters: int, threads: int | None = None) -> list[LatencyStats]:
    """ONNX Runtime CPU latency of several artifacts on the same feed, one call of each in turn, so that
    load from other processes on a shared CPU falls on all of them alike rather than on whichever ran first.

    Intra-op spinning is off for these sessions: with it on, the session that just ran keeps its threads
    spinning and the next session's run loses the cores to them (measured on 2 cores: resnet50 batch 1
    went from 73 ms alone to 135 ms alternating with a second session; 65 vs 67 ms with spinning off).
    """
    from runtimes.ort import OrtRunner

    opts = RunnerOptions(device="cpu", threads=threads, ort_spinning=False)

    with contextlib.ExitStack() as stack:
        runners = [stack.enter_context(OrtRunner(manifest, base, a, opts))
                   for a in arts]
        prepared = [r.prepare(feed) for r in runners]
        for r, p in zip(runners, prepared, strict=True):
            r.time_iterations(p, warmup, 0)
        samples: list[list[float]] = [[] for _ in runners]
        for _ in range(iters):
            for r, p, out in zip(runners, prepared, samples, strict=True):
                out.extend(r.time_iterations(p, 0, 1))
    return [LatencyStats.from_samples(x) for x in samples]


def reference_runner(manifest: Manifest, base: Path, threads: int | None) -> Runner:
    """The FP32 reference: PyTorch eager on CPU, or ONNX Runtime on the FP32 ONNX for ONNX inputs."""
    opts = RunnerOptions(device="cpu", threads=threads)
    torch_arts = manifest.by_kind("state_dict") + manifest.by_kind("torchscript")
    if torch_arts:
        return RUNNERS["eager"](manifest, base, torch_arts[0], opts)
    return RUNNERS["ort"](manifest, base, manifest.artifacts["fp32"], opts)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print,
              progress: Callable[[str], None] | None = None) -> BenchResults:
    """Measure every target on every batch size; see the module docstring."""
    manifest = Manifest.load(cfg.artifact_dir)
    base = Path(cfg.artifact_dir)
    problems = manifest.verify(base)
    if problems:
        raise InputError("artifact folder does not match its manifest: " + "; ".join(problems))
    for b in cfg.batch_sizes:
        manifest.iospec.check_batch(b)
    targets = select_targets(manifest, cfg)
    fixed = manifest.iospec.fixed_batch()
    chunk = fixed or max(cfg.batch_sizes)
    pool = build_pool(manifest, cfg, max(cfg.accuracy_samples, max(cfg.batch_sizes)), log)
    feeds = {b: pool.feed(0, b) for b in cfg.batch_sizes}
    digests = {b: feed_digest(f) for b, f in feeds.items()}
    results = BenchResults(model=manifest.source.model, artifact_dir=str(base),
                           config=cfg.model_dump(mode="json") | {"inputs": pool.source})

    with reference_runner(manifest, base, cfg.threads) as ref_runner:
        ref_out = run_pool(ref_runner, pool, chunk)
        ref_label = f"{ref_runner.name}:{ref_runner.artifact.name}:fp32:cpu"
    log(f"reference: {ref_label} on {pool.size} inputs ({pool.source})")

    extra_opts = RunnerOptions(**cfg.options) if cfg.options else RunnerOptions()
    from runtimes.gpu import NvmlSampler

    for t in targets:
        opts = extra_opts.model_copy(update={"device": cfg.device, "threads": cfg.threads, "precision": t.precision})
        runner = RUNNERS[t.backend](manifest, base, t.artifact, opts)
        sampler = ResourceSampler()
        # GPU utilisation per timed loop and device memory growth since before load (NVML, optional).
        gpu = NvmlSampler(enabled=cfg.device == "cuda")
        with sampler, gpu:
            t_load = time.perf_counter()
            try:
                runner.load()
            except BackendUnavailableError as exc:
                results.warnings.append(f"{runner.label} ({t.precision}) skipped: {exc}")
                log(f"[yellow]skipped {runner.label}: {exc}[/]")
                continue
            load_s = time.perf_counter() - t_load
            try:
                acc = accuracy_stats(run_pool(runner, pool, chunk), ref_out, pool.labels, ref_label)
                for b in cfg.batch_sizes:
                    if progress:
                        progress(f"{runner.label} {t.precision} batch {b}")
                    prepared = runner.prepare(feeds[b])
                    mark = gpu.mark()
                    with cpu_meter() as cpu:
                        samples = runner.time_iterations(prepared, cfg.warmup, cfg.iters)
                    lat = LatencyStats.from_samples(samples)
                    mem = {"vram_mb": gpu.growth_mb, "gpu_util": gpu.util_since(mark)} | runner.memory_stats()
                    results.records.append(BenchRecord(
                        model=manifest.source.model, backend=t.backend, variant=t.artifact.name,
                        precision=t.precision, device=cfg.device, batch_size=b, latency_ms=lat,
                        throughput=b / (lat.mean / 1e3), ram_mb=sampler.peak_rss / 2**20,
                        ram_delta_mb=(sampler.peak_rss - sampler.baseline_rss) / 2**20,
                        vram_mb=mem.get("vram_mb"), gpu_util=mem.get("gpu_util"),
                        cpu_util=cpu.get("cpu_util"), model_size_mb=t.artifact.file.size_bytes / 2**20,
                        load_s=load_s, input_digest=digests[b], accuracy=acc,
                    ))
            finally:
                runner.close()
    if not results.records:
        raise BackendUnavailableError("no backend could be measured: " + "; ".join(results.warnings))
    return results
