"""Resource measurement and device checks shared by the harness, calibration and the runners."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from core.errors import InputError

if TYPE_CHECKING:
    from core.iospec import IOSpec


def cuda_problem() -> str | None:
    """None when CUDA is usable, else one line saying why not."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"
    return None


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


def available_memory() -> int:
    """Bytes of memory this machine can give a new allocation now (RAM free for use, without swapping)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_feed_memory(spec: IOSpec, batch: int, what: str, dims: Mapping[str, int] | None = None) -> None:
    """Refuse, before allocating anything, inputs of ``batch`` rows that cannot fit in memory: one clear
    InputError starting with ``what`` (the flag that asked for them). Random inputs are drawn in float64 and
    then cast, so building them needs up to twice their size at once; the model's own memory comes on top."""
    import numpy as np

    shapes = spec.input_shapes(batch, dims)
    sizes = {t.name: math.prod(shapes[t.name]) * np.dtype(t.dtype).itemsize for t in spec.inputs}
    need = sum(sizes.values())
    avail = available_memory()
    if 2 * need <= avail:
        return
    big = max(sizes, key=lambda n: sizes[n])
    shape = "x".join(str(d) for d in shapes[big])
    raise InputError(f"{what} needs {_human(need)} of memory for the inputs alone (input {big!r} is {shape} "
                     f"{spec.input(big).dtype}); this machine has {_human(avail)} available: ask for less")


def _human(nbytes: float) -> str:
    unit = 0
    while nbytes >= 1024 and unit < 4:
        nbytes, unit = nbytes / 1024, unit + 1
    return f"{nbytes:.3g} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"
