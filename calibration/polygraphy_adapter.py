"""A calibration source as Polygraphy's data loader, and the TensorRT INT8 ``Calibrator`` around it.

TensorRT calibrates a dynamic-shape network at the calibration profile's *opt* shape only, so the
loader re-chunks whatever batches the source yields into batches of exactly ``batch_size`` and
drops the remainder (reported by ``plan()``), rather than let Polygraphy's shape check end the
calibration early at a short last batch. The loader can be iterated again (Polygraphy's
``Calibrator.reset()`` calls ``iter()`` anew); each pass re-reads the source.

Only ``make_calibrator`` needs TensorRT; the loader is plain NumPy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from core.errors import InputError

CalibAlgo = Literal["entropy2", "minmax"]
#: TensorRT calibrator base classes by algorithm name.
_BASE_CLASSES = {"entropy2": "IInt8EntropyCalibrator2", "minmax": "IInt8MinMaxCalibrator"}


class CalibrationSourceLike(Protocol):
    """What this adapter needs from ``calibration.sources.CalibrationSource``."""

    @property
    def input_names(self) -> list[str]: ...

    @property
    def num_samples(self) -> int: ...

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]: ...

    def describe(self) -> str: ...

    def digest(self) -> str: ...


class PolygraphyDataLoader:
    """Yields ``OrderedDict[input name -> float32/int array]`` batches of exactly ``batch_size``."""

    def __init__(self, source: CalibrationSourceLike, batch_size: int, input_names: list[str] | None = None) -> None:
        if batch_size < 1:
            raise InputError(f"calibration batch size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = batch_size
        self.input_names = list(input_names or source.input_names)
        missing = [n for n in self.input_names if n not in source.input_names]
        if missing:
            raise InputError(f"calibration data ({source.describe()}) has no input(s) {missing}; "
                             f"it provides {source.input_names}")
        if source.num_samples < batch_size:
            raise InputError(f"calibration data ({source.describe()}) has {source.num_samples} sample(s), fewer than "
                             f"one batch of {batch_size} (the engine's opt batch): give more samples or a "
                             "smaller --opt-batch")
        #: Set by Polygraphy's CreateConfig/Calibrator to the network's input metadata.
        self.input_metadata: Any = None

    def plan(self) -> dict[str, int]:
        """How the samples are used: full batches, their size, and the samples left over."""
        n = self.source.num_samples
        return {"batches": n // self.batch_size, "batch_size": self.batch_size, "samples": n,
                "dropped": n % self.batch_size}

    def __len__(self) -> int:
        return self.source.num_samples // self.batch_size

    @staticmethod
    def _cast(arr: np.ndarray) -> np.ndarray:
        # TensorRT takes calibration data for non-index inputs in float32 only.
        a = np.asarray(arr)
        if a.dtype.kind == "f" and a.dtype != np.float32:
            a = a.astype(np.float32)
        return np.ascontiguousarray(a)

    def __iter__(self) -> Iterator[OrderedDict[str, np.ndarray]]:
        pending: dict[str, list[np.ndarray]] = {n: [] for n in self.input_names}
        held = 0
        for batch in self.source.iter_batches(self.batch_size):
            missing = [n for n in self.input_names if n not in batch]
            if missing:
                raise InputError(f"calibration data ({self.source.describe()}) yielded a batch without {missing}")
            sizes = {len(batch[n]) for n in self.input_names}
            if len(sizes) != 1:
                raise InputError(f"calibration data ({self.source.describe()}) yielded inputs of different batch "
                                 f"sizes {sorted(sizes)}")
            for n in self.input_names:
                pending[n].append(self._cast(batch[n]))
            held += sizes.pop()
            while held >= self.batch_size:
                joined = {n: np.concatenate(parts) if len(parts) > 1 else parts[0] for n, parts in pending.items()}
                yield OrderedDict((n, np.ascontiguousarray(joined[n][: self.batch_size])) for n in self.input_names)
                pending = {n: [joined[n][self.batch_size:]] for n in self.input_names}
                held -= self.batch_size
        # Fewer than batch_size samples remain: TensorRT cannot take them (see the module docstring).


def make_calibrator(loader: PolygraphyDataLoader, cache: Path | str | None, algo: CalibAlgo = "entropy2") -> Any:
    """Polygraphy's ``Calibrator`` over ``loader``; ``cache`` is read when non-empty, else written.

    Needs TensorRT (the calibrator subclasses a TensorRT calibrator class).
    """
    import tensorrt as trt
    from polygraphy.backend.trt import Calibrator

    base = getattr(trt, _BASE_CLASSES[algo])
    return Calibrator(loader, cache=str(cache) if cache is not None else None, BaseClass=base)
