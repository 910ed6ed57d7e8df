"""Static INT8 calibration: the data it reads, ONNX Runtime's calibrator run batch by batch, and the
ranges cache.

Calibration streams: ONNX Runtime's calibrator runs one batch at a time (``collect_data`` per batch
merges ranges/histograms), the ranges are saved with ``save_tensors_data`` and handed to
``quantize_static(calibration_cache_path=...)``, so peak memory does not grow with the number of
calibration images and ``--auto`` re-quantizes without re-calibrating.

The ranges are kept in the output folder (``calib.<key>.json``, keyed by the model, the data, the
method, the batch, the op types and ONNX Runtime's version) and reused by the next conversion that
matches. The held-out data of the accuracy gates never shares a sample or a source (a photo, a file's
content) with the calibration data, nor with ``--auto``'s selection data (:func:`open_quant_data`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.loaders import count_samples, open_parts, open_source, resolve_preprocessing
from calibration.sources import DEFAULT_SYNTHETIC_SIZE, EVAL_ROLE, Source
from convert.config import CalibConfig, CalibMethod, GateConfig, QuantConfig
from convert.ort_quant import QuantizeError, ort_method, quiet
from core.errors import BackendUnavailableError, InputError, ToolkitError, first_line
from core.fsutil import atomic_path, atomic_write_text
from core.iospec import IOSpec
from core.manifest import Preprocessing
from core.records import CalibrationRecord, DataRecord


@dataclass
class CalibrationRun:
    """Ranges of one calibration method, saved where ``quantize_static`` reads them."""

    method: CalibMethod
    cache: Path
    seconds: float
    samples: int
    batches: int
    dropped: int
    peak_rss_mb: float  # process peak during calibration
    rss_growth_mb: float  # that peak minus the RSS when calibration started
    reused: bool = False  # read from an earlier conversion's cache, no calibration run

    def record(self, data: DataRecord, batch_size: int, seed: int) -> CalibrationRecord:
        """The manifest's record of this run on ``data`` (the source's record)."""
        return CalibrationRecord(**data.model_dump(), images_used=self.samples, batches=self.batches,
                                 dropped_short_batch=self.dropped, seconds=round(self.seconds, 3),
                                 peak_rss_mb=self.peak_rss_mb, rss_growth_mb=self.rss_growth_mb,
                                 cache=self.cache.name, cache_reused=self.reused, batch_size=batch_size, seed=seed)


def calibration_cache_path(out: Path, model_sha256: str, data_digest: str, method: CalibMethod, batch: int,
                           op_types: list[str]) -> Path:
    """One ranges file per (model, data, method, batch, op types, ONNX Runtime version)."""
    import onnxruntime

    key = "|".join([model_sha256, data_digest, method, str(batch), ",".join(op_types), onnxruntime.__version__])
    return out / f"calib.{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _meta_path(cache: Path) -> Path:
    return cache.with_suffix(".meta.json")


def reuse_calibration(cache: Path, method: CalibMethod) -> CalibrationRun | None:
    """The run recorded with ``cache`` by an earlier conversion, or None (absent or unreadable: calibrate)."""
    meta = _meta_path(cache)
    if not (cache.is_file() and meta.is_file()):
        return None
    try:
        from onnxruntime.quantization import load_tensors_data

        load_tensors_data(cache)  # a cache ONNX Runtime cannot read is recomputed, not trusted
        m = json.loads(meta.read_text(encoding="utf-8"))
        return CalibrationRun(method=method, cache=cache, seconds=float(m["seconds"]), samples=int(m["samples"]),
                              batches=int(m["batches"]), dropped=int(m["dropped"]), peak_rss_mb=0.0,
                              rss_growth_mb=0.0, reused=True)
    except Exception:
        return None


class _OneBatch:
    """A ``CalibrationDataReader`` holding exactly one batch (ONNX Runtime's ``get_next`` protocol)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self._batch: dict[str, Any] | None = batch

    def get_next(self) -> dict[str, Any] | None:
        batch, self._batch = self._batch, None
        return batch


def _require_calibration_cache() -> None:
    try:
        from onnxruntime.quantization import save_tensors_data  # noqa: F401
    except ImportError:
        import onnxruntime

        raise BackendUnavailableError(
            f"static INT8 needs ONNX Runtime's calibration cache (save_tensors_data, quantize_static("
            f"calibration_cache_path=...)), which onnxruntime {onnxruntime.__version__} lacks; 1.32 is tested: "
            "pip install -U onnxruntime") from None


def calibrate(model: Path, source: Source, method: CalibMethod, batch: int, fixed_batch: int | None,
              work: Path, op_types: list[str], cache: Path) -> CalibrationRun:
    """Run ONNX Runtime's calibrator over ``source`` one batch at a time and save the ranges to ``cache``.

    ``collect_data`` is called once per batch: MinMax merges running ranges, Entropy/Percentile merge
    histograms, and the batch's intermediate outputs are dropped before the next batch is read.
    ``cache`` (ranges JSON) and its ``.meta.json`` are written atomically, only on success.
    """
    _require_calibration_cache()
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    from calibration.ort_reader import OrtCalibrationReader
    from core.resources import ResourceSampler

    reader = OrtCalibrationReader(source, batch, fixed_batch)
    t0 = time.perf_counter()
    with ResourceSampler() as sampler:
        try:
            with quiet(), atomic_path(cache) as tmp:
                calibrator = create_calibrator(str(model), op_types, augmented_model_path=str(work / f"aug.{method}.onnx"),
                                               calibrate_method=ort_method(method), extra_options={})
                while (feed := reader.get_next()) is not None:
                    calibrator.collect_data(_OneBatch(feed))
                if reader.batches_read == 0:
                    raise InputError(f"no calibration batch could be read from {source.describe()}"
                                     + (f" (the model's fixed batch is {fixed_batch})" if fixed_batch else ""))
                save_tensors_data(calibrator.compute_data(), tmp)
        except ToolkitError:
            raise
        except Exception as exc:
            raise QuantizeError(f"{method} calibration failed: {first_line(exc, with_type=True)}") from exc
    run = CalibrationRun(method=method, cache=cache, seconds=time.perf_counter() - t0, samples=reader.samples_read,
                         batches=reader.batches_read, dropped=reader.dropped,
                         peak_rss_mb=round(sampler.peak_rss / 2**20, 1),
                         rss_growth_mb=round((sampler.peak_rss - sampler.baseline_rss) / 2**20, 1))
    atomic_write_text(_meta_path(cache), json.dumps({"method": method, "samples": run.samples, "batches": run.batches,
                                                     "dropped": run.dropped, "seconds": round(run.seconds, 3),
                                                     "data": source.describe()}))
    return run


@dataclass
class Calibrations:
    """The calibration run of each method over one pre-processed model and source: each method is
    calibrated (or read from the output folder's cache) once, for every variant that needs its ranges."""

    model: Path  # the quant_pre_process'd model the calibrator augments
    model_sha256: str  # of the FP32 artifact it was made from: part of the cache key
    source: Source
    cfg: CalibConfig
    fixed_batch: int | None
    op_types: list[str]
    out: Path  # the artifact folder, where the caches are kept
    work: Path  # where the calibrator writes its augmented models
    log: Callable[[str], None] = print
    runs: dict[CalibMethod, CalibrationRun] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.fixed_batch or self.cfg.batch

    def run(self, method: CalibMethod) -> CalibrationRun:
        """``method``'s ranges: calibrated now, or read from the cache an earlier conversion left."""
        if method in self.runs:
            return self.runs[method]
        cache = calibration_cache_path(self.out, self.model_sha256, self.source.digest(), method, self.batch,
                                       self.op_types)
        run = reuse_calibration(cache, method)
        if run is not None:
            self.log(f"calibration ({method}): reusing {cache.name} ({run.samples} sample(s), same model and data)")
        else:
            self.log(f"calibrating ({method}) on {self.source.num_samples} sample(s), batch {self.batch}")
            run = calibrate(self.model, self.source, method, self.cfg.batch, self.fixed_batch, self.work,
                            self.op_types, cache)
            self.log(f"  {run.samples} sample(s) in {run.seconds:.1f}s, peak RSS {run.peak_rss_mb:.0f} MB "
                     f"(+{run.rss_growth_mb:.0f} MB during calibration); ranges saved to {cache.name}")
        self.runs[method] = run
        return run

    def record(self, method: CalibMethod) -> CalibrationRecord:
        data = DataRecord.model_validate(self.source.manifest_record())
        return self.run(method).record(data, self.batch, self.cfg.seed)


# -- which data calibrates, which checks -------------------------------------------------------------
def _same_data(a: str, b: str | None) -> bool:
    """Whether two data specs name the same data (then one is split, so that no sample is in both)."""
    if b is None:
        return False
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def quant_preprocessing(cfg: CalibConfig, spec: IOSpec, known: Preprocessing | None) -> Preprocessing | None:
    """The image preprocessing (with --resize/--mean/--std); None for a model that takes no images."""
    try:
        return resolve_preprocessing(spec, known, resize=cfg.resize, mean=cfg.mean, std=cfg.std)
    except InputError:
        if cfg.resize is not None or cfg.mean is not None or cfg.std is not None:
            raise
        return None  # not an image model: only tensor sources apply, and they say so


@dataclass
class QuantData:
    """The data of one conversion's variants: three parts that share no source (see
    :func:`calibration.loaders.open_parts`)."""

    calib: Source | None  # calibrates static INT8
    held: Source  # every variant's accuracy gate
    selection: Source | None = None  # --auto grades its trials here, so its gate is on data it never saw


def open_quant_data(cfg: QuantConfig, spec: IOSpec, known: Preprocessing | None) -> QuantData:
    """Calibration, held-out and (``--auto``) selection data: no two share a sample or a source.

    ``--eval-data`` (other than the calibration data) is the held-out set (with ``--auto``, split by
    source into the gate's part and the selection's); otherwise the calibration data is split by source
    into held-out, (selection,) calibration parts; with no data at all (FP16 / dynamic INT8), random
    inputs, with a warning.
    """
    c, g = cfg.calib, cfg.gate
    pre = quant_preprocessing(c, spec, known)
    if g.eval_data and not _same_data(g.eval_data, c.data):
        calib = open_source(c.data, spec, pre, size=c.size, seed=c.seed) if c.data else None
        if not g.auto:
            return QuantData(calib, open_source(g.eval_data, spec, pre, size=g.eval_size, seed=c.seed, role=EVAL_ROLE))
        held, sel = open_parts(g.eval_data, spec, pre, sizes=_halves(g.eval_data, g.eval_size), seed=c.seed,
                               role=EVAL_ROLE)
        return QuantData(calib, held, sel)
    if c.data:
        parts = open_parts(c.data, spec, pre, sizes=_split(c.data, c, g, spec, pre), seed=c.seed)
        return QuantData(parts[-1], parts[0], parts[1] if g.auto else None)
    held = open_source(None, spec, pre, size=min(g.eval_size, DEFAULT_SYNTHETIC_SIZE), seed=c.seed + 1,
                       allow_synthetic=True)
    held.warnings.append("no held-out data given (--eval-data or --calib): accuracy was checked on random "
                         "inputs, which says little about real ones")
    return QuantData(None, held)


def _halves(data: str, eval_size: int) -> list[int]:
    """--auto with --eval-data: (gate, selection) sizes, half of ``data`` each when it is short."""
    total = count_samples(data, EVAL_ROLE)
    n = eval_size if total is None or total >= 2 * eval_size else total // 2
    if n < 1:
        raise InputError(f"--auto needs at least 2 held-out samples in {data} (one part to choose on, one to "
                         f"check the choice on); it has {total}")
    return [n, n]


def _split(data: str, c: CalibConfig, g: GateConfig, spec: IOSpec, pre: Preprocessing | None) -> list[int]:
    """Sizes of the parts of ``data`` when it gives every one: held-out, (--auto's selection,) calibration."""
    k = 2 if g.auto else 1
    total = count_samples(data)
    if total is None:
        return [min(g.eval_size, DEFAULT_SYNTHETIC_SIZE)] * k + [c.size]
    n_eval = g.eval_size if total >= c.size + k * g.eval_size else min(g.eval_size, max(1, total // (2 * k + 2)))
    n_calib = min(c.size, total - k * n_eval)
    if n_calib < 1:
        open_source(data, spec, pre, size=None, seed=c.seed)  # unreadable data: say that first
        raise InputError(f"calibration data {data} has {total} sample(s): too few to calibrate and "
                         "hold samples out for the accuracy check; add data or pass --eval-data")
    return [n_eval] * k + [n_calib]
