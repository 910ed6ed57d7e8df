"""GPU measurement helpers: CUDA-event timing, peak allocated memory, and an NVML sampler.

Everything imports its library lazily: torch only when a CUDA timer is used, ``pynvml``
(package ``nvidia-ml-py``, in the ``gpu``/``trt`` extras) only when a sampler starts. Without NVML
the sampler reports nothing rather than failing: utilisation is a nice-to-have, timing is not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

NVML_HINT = "nvidia-ml-py is not installed (pip install .[gpu])"


def cuda_event_times(fn: Callable[[], Any], warmup: int, iters: int, stream: Any = None) -> list[float]:
    """Milliseconds per call of ``fn``, measured with CUDA events on ``stream`` after ``warmup`` calls.

    ``stream`` is a ``torch.cuda.Stream``/``ExternalStream`` (None = the current stream). The device
    is synchronised before the first timed call and after each one, so each sample covers exactly
    one call's device work (and the host launch gaps inside it).
    """
    import torch

    stream = stream if stream is not None else torch.cuda.current_stream()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    out: list[float] = []
    for _ in range(iters):
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        out.append(float(start.elapsed_time(end)))
    return out


def reset_peak_memory() -> None:
    """Forget the PyTorch caching allocator's peak, so the next reading covers what follows."""
    import torch

    torch.cuda.reset_peak_memory_stats()


def peak_allocated_mb() -> float:
    """Peak memory allocated through PyTorch's allocator since the last reset (MB)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def nvml_bus_id(device_index: int = 0) -> str | None:
    """The PCI bus id of CUDA device ``device_index`` as NVML writes it, or None when unknown.

    CUDA and NVML number devices differently when CUDA_VISIBLE_DEVICES is set; the bus id is the
    one name both agree on.
    """
    try:
        import torch

        props: Any = torch.cuda.get_device_properties(device_index)
        return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except Exception:
        return None


class NvmlSampler:
    """Samples GPU utilisation (%) and device memory in use (MB) in a background thread.

    Use as a context manager around the work to observe. ``available`` is False (and ``reason``
    says why) when NVML cannot be used or ``enabled`` is False; the results are then None.
    Memory is device-wide, so it includes other processes; ``growth_mb`` is the rise since entry.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.02, enabled: bool = True) -> None:
        self.enabled = enabled
        self.device_index = device_index
        self.interval_s = interval_s
        self.available = False
        self.reason = ""
        self.util_samples: list[float] = []
        self.baseline_used_mb: float | None = None
        self.peak_used_mb: float | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- NVML ---------------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.reason = NVML_HINT
            return
        try:
            pynvml.nvmlInit()
            bus = nvml_bus_id(self.device_index)
            try:
                self._handle = pynvml.nvmlDeviceGetHandleByPciBusId_v2(bus) if bus else None
            except Exception:
                self._handle = None
            if self._handle is None:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as exc:  # NVMLError: no driver, no device, ...
            self.reason = f"NVML unavailable: {exc}"
            return
        self._nvml = pynvml
        self.available = True

    def sample(self, util: bool = True) -> None:
        """Take one reading now. NVML's utilisation covers its own recent window (up to a second),
        so the reading taken on entry is kept for memory only: it describes the time before."""
        if not self.available:
            return
        used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        if util:
            self.util_samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
        self.peak_used_mb = used if self.peak_used_mb is None else max(self.peak_used_mb, used)
        if self.baseline_used_mb is None:
            self.baseline_used_mb = used

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    # -- results ------------------------------------------------------------------------------
    def mark(self) -> int:
        """A position in the utilisation samples; ``util_since(mark)`` averages what follows."""
        return len(self.util_samples)

    def util_since(self, mark: int = 0) -> float | None:
        """Mean utilisation (%) of the samples taken after ``mark`` (a final one is taken now)."""
        self.sample()
        window = self.util_samples[mark:]
        return sum(window) / len(window) if window else None

    @property
    def growth_mb(self) -> float | None:
        """Peak device memory in use minus the reading on entry (MB)."""
        if self.peak_used_mb is None or self.baseline_used_mb is None:
            return None
        return self.peak_used_mb - self.baseline_used_mb

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> NvmlSampler:
        if not self.enabled:
            self.reason = "disabled"
            return self
        self._open()
        if self.available:
            self.sample(util=False)
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.available:
            self.sample()
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
