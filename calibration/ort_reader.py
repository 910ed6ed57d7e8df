"""A calibration source as ONNX Runtime's ``CalibrationDataReader``: one batch per ``get_next()``.

The reader pulls batches lazily from the source's generator, so only one batch exists at a time;
``rewind()`` starts a new pass. For a model exported with a fixed batch, batches have exactly that
size and a short last batch is dropped (counted in ``dropped``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calibration.sources import CalibrationSource


class OrtCalibrationReader(CalibrationDataReader):
    """Streams ``source`` in batches of ``batch_size`` (or the model's fixed batch)."""

    def __init__(self, source: CalibrationSource, batch_size: int, fixed_batch: int | None = None,
                 limit_batches: int | None = None) -> None:
        self.source = source
        self.batch_size = fixed_batch or batch_size
        self.fixed = fixed_batch is not None
        self.limit_batches = limit_batches
        self.batches_read = 0
        self.samples_read = 0
        self.dropped = 0
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def rewind(self) -> None:
        self._it = None
        self.batches_read = self.samples_read = self.dropped = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.limit_batches is not None and self.batches_read >= self.limit_batches:
            return None
        if self._it is None:
            self._it = self.source.iter_batches(self.batch_size)
        for batch in self._it:
            n = len(next(iter(batch.values())))
            if self.fixed and n != self.batch_size:
                self.dropped += n
                continue
            self.batches_read += 1
            self.samples_read += n
            return batch
        return None

    def __len__(self) -> int:
        """Number of batches a full pass yields (an upper bound when unreadable files are skipped)."""
        n = self.source.num_samples
        return n // self.batch_size if self.fixed else -(-n // self.batch_size)
