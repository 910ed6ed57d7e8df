"""The one held-out evaluator: FP32 reference outputs on held-out inputs, computed once, and each
variant's statistics against them.

The quantization gates (held-out window or ``--eval-data`` read as a streamed
:class:`calibration.sources.Source`) and the sparsity/pruning checks (an in-memory
:class:`calibration.pools.InputPool`) both use it: every model runs in the same ONNX Runtime CPU
session settings, in the same batches, and is described by :func:`core.metrics.accuracy_stats`
(the statistics ``bench`` reports). A fixed-batch model gets full batches: the short last batch
wraps around to the first samples (as the bench harness does), and the surplus rows are dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from calibration.pools import InputPool
from calibration.sources import LABELS_KEY
from core.errors import InputError, ValidationError
from core.fsutil import sha256_file
from core.manifest import FileRecord, HeldOutFile
from core.metrics import AccuracyStats, accuracy_stats
from core.records import AccuracyChange, DataRecord, HeldOutRecord
from runtimes.ort import ort_session

if TYPE_CHECKING:
    from convert.context import ConvertContext

#: The held-out file kept in an artifact folder (``save_heldout``) and its size limit: the gates read up to
#: --eval-size samples (200 by default, 120 MB of 224x224 images); bench grades on up to --accuracy-samples (32).
HELDOUT_FILE = "heldout.npz"
HELDOUT_MAX_BYTES = 32 << 20

LabelledBatch = tuple[dict[str, np.ndarray], np.ndarray | None]


class HeldOutData(Protocol):
    """Held-out inputs read in batches, with their labels when known (a ``Source`` is one)."""

    kind: str  # "synthetic" for random inputs (no top-k agreement on them: see core.metrics.accuracy_stats)

    def iter_labelled(self, batch_size: int) -> Iterator[LabelledBatch]: ...

    def describe(self) -> str: ...

    def manifest_record(self) -> dict[str, Any]: ...


class PoolData:
    """An in-memory :class:`InputPool` read in batches like a ``Source``."""

    def __init__(self, pool: InputPool) -> None:
        self.pool = pool
        self.kind = "synthetic" if pool.kind == "random" else "pool"

    def iter_labelled(self, batch_size: int) -> Iterator[LabelledBatch]:
        labels = self.pool.labels
        for s in range(0, self.pool.size, batch_size):
            feed = {n: np.ascontiguousarray(a[s:s + batch_size]) for n, a in self.pool.arrays.items()}
            yield feed, None if labels is None else labels[s:s + batch_size]

    def describe(self) -> str:
        return self.pool.source

    def manifest_record(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for name in sorted(self.pool.arrays):
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.pool.arrays[name]).tobytes())
        return {"source": self.pool.source, "kind": self.kind, "sha256": h.hexdigest(), "num_samples": self.pool.size,
                "skipped": 0, "labels": self.pool.labels is not None, "warnings": []}


def _rows(feed: dict[str, np.ndarray]) -> int:
    return len(next(iter(feed.values())))


class HeldOutEvaluator:
    """Held-out inputs, the FP32 reference's outputs on them, and variant statistics against it."""

    def __init__(self, data: HeldOutData, batch: int, fixed_batch: int | None = None) -> None:
        self.data = data
        self.batch = fixed_batch or batch
        self.fixed = fixed_batch
        self.reference: list[np.ndarray] | None = None
        self.labels: np.ndarray | None = None
        self.reference_name = ""
        self.output_names: list[str] = []  # class scores, or not, is read from the names too

    def _batches(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, int]]:
        """(feed, labels, real rows): a fixed-batch model's short last batch is filled from the first samples."""
        first: dict[str, np.ndarray] | None = None
        seen = 0
        for feed, lab in self.data.iter_labelled(self.batch):
            n = _rows(feed)
            first = feed if first is None else first
            seen += n
            if self.fixed and n < self.fixed:
                idx = np.arange(self.fixed - n) % seen  # the rows after the last wrap around to the start
                feed = {k: np.concatenate([v, first[k][idx]]) for k, v in feed.items()}
            yield feed, lab, n

    def outputs(self, path: Path, simulate_qdq: bool = False,
                session: Any = None) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Every output of ``path`` on every held-out sample, and the labels (``simulate_qdq``: see
        ``runtimes.ort.ort_session``; ``session``: another runtime's, with ONNX Runtime's ``get_outputs``/``run``,
        for a file ONNX Runtime does not read: an OpenVINO IR)."""
        try:
            sess = session if session is not None else ort_session(path, simulate_qdq=simulate_qdq)
        except InputError as exc:  # a variant this run built: its failure, not the user's input
            raise ValidationError(f"held-out evaluation of {path.name}", [str(exc)]) from None
        self.output_names = [o.name for o in sess.get_outputs()]
        outs: list[list[np.ndarray]] = []
        labels: list[np.ndarray] = []
        for feed, lab, n in self._batches():
            outs.append([np.asarray(o, dtype=np.float32)[:n] for o in sess.run(None, feed)])
            if lab is not None:
                labels.append(lab)
        if not outs:
            raise InputError(f"no held-out batch could be run ({self.data.describe()})")
        joined = [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
        return joined, (np.concatenate(labels) if labels else None)

    def set_reference(self, path: Path, name: str) -> None:
        self.reference, self.labels = self.outputs(path)
        self.reference_name = name

    def evaluate(self, path: Path, simulate_qdq: bool = False, session: Any = None) -> AccuracyStats:
        """Statistics of ``path`` against the reference (run by ``session`` when given, see :meth:`outputs`)."""
        if self.reference is None:
            raise RuntimeError("set_reference() first")
        got, _ = self.outputs(path, simulate_qdq, session)
        return accuracy_stats(got, self.reference, self.labels, f"ort:{self.reference_name}:fp32:cpu",
                              self.output_names, random_inputs=self.data.kind == "synthetic")

    def change(self, path: Path) -> AccuracyChange:
        """:meth:`evaluate`, with the inputs named and the drops against FP32 in points."""
        stats = self.evaluate(path)
        change = AccuracyChange(inputs=self.data.describe(), **stats.model_dump())
        if stats.top1_agreement is not None:
            change.agreement_drop_points = round(100.0 * (1.0 - stats.top1_agreement), 4)
        if stats.top1_acc is not None and stats.ref_top1_acc is not None:
            change.accuracy_drop_points = round(100.0 * (stats.ref_top1_acc - stats.top1_acc), 4)
        return change

    def record(self) -> HeldOutRecord:
        """The held-out data, as the manifest keeps it, and how many samples were compared."""
        data = DataRecord.model_validate(self.data.manifest_record())
        return HeldOutRecord(**data.model_dump(), used=0 if self.reference is None else len(self.reference[0]))


def save_heldout(data: HeldOutData, used: int, path: Path, base: Path,
                 max_bytes: int = HELDOUT_MAX_BYTES) -> HeldOutFile | None:
    """Write the first held-out samples of ``data`` (as many as fit in ``max_bytes``, at least one) to ``path``, an
    .npz keyed by input name plus ``labels``, and describe it for the manifest (``Manifest.held_out``); ``used``:
    how many samples the gates were graded on; ``base``: the artifact folder. Synthetic (random) held-out data is
    not kept: bench says it has no held-out data instead of grading on noise."""
    record = data.manifest_record()
    if record.get("kind") == "synthetic":
        return None
    kept: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    cap: int | None = None
    rows = 0
    for feed, lab in data.iter_labelled(16):
        if cap is None:
            cap = max(1, max_bytes // max(1, sum(a[:1].nbytes for a in feed.values())))
        take = min(_rows(feed), cap - rows)
        kept.append({k: v[:take] for k, v in feed.items()})
        if lab is not None:
            labels.append(lab[:take])
        rows += take
        if rows >= cap:
            break
    if not kept:
        return None
    arrays = {k: np.concatenate([f[k] for f in kept]) for k in kept[0]}
    if labels and sum(len(x) for x in labels) == _rows(arrays):
        arrays[LABELS_KEY] = np.concatenate(labels).astype(np.int64)
    named: dict[str, Any] = arrays  # every key is an array's name (savez also takes allow_pickle by keyword)
    with open(path, "wb") as f:  # the run's staging folder: swapped in only when every step succeeded
        np.savez(f, **named)
    return HeldOutFile(file=FileRecord(path=path.relative_to(base).as_posix(), sha256=sha256_file(path),
                                       size_bytes=path.stat().st_size),
                       source=data.describe(), samples=_rows(arrays), of_samples=max(used, _rows(arrays)),
                       labels=LABELS_KEY in arrays, data_sha256=str(record.get("sha256", "")))


def keep_heldout(ctx: ConvertContext, evaluator: HeldOutEvaluator) -> None:
    """The held-out inputs the gates grade on, kept in the artifact folder (``heldout.npz``, recorded as
    ``Manifest.held_out``) so that bench, tune and report grade on them by default. The first held-out data of a
    run is kept (the quantization gates' when there are several)."""
    if ctx.manifest.held_out is not None:
        return
    kept = save_heldout(evaluator.data, evaluator.record().used, ctx.path(HELDOUT_FILE), ctx.out)
    if kept is not None:
        ctx.manifest.held_out = kept
        ctx.log(f"held-out data kept for bench: {HELDOUT_FILE} ({kept.samples} of {kept.of_samples} sample(s), "
                f"{kept.file.size_bytes / 2**20:.1f} MB)")
