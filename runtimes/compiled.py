"""``torch.compile`` (TorchInductor) on the exported PyTorch weights: the same module the eager runner runs,
compiled. Compilation happens in ``load()`` (one call at the model's bound shape), and its time is recorded
apart from the run time (``BenchRecord.extra['compile_s']``); a new batch size recompiles during the
harness's warm-up, never inside timed calls. On CPU, Inductor needs a C++ compiler. With channels_last (searched by
`tune` for image inputs, as for eager) the module and the compile-time input are in that memory format, so the
compiled graph is the one timed.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from core.errors import BackendUnavailableError, first_line
from runtimes.base import Device
from runtimes.torch_eager import EagerRunner


class CompileRunner(EagerRunner):
    name = "compile"
    supports_cuda_graphs = False
    compile_s: float | None = None

    @classmethod
    def available(cls, device: Device) -> str | None:
        if device == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
            return "torch.compile's Inductor needs a C++ compiler on CPU (none on PATH)"
        return super().available(device)

    def _load(self) -> None:
        import torch

        super()._load()
        spec = self.manifest.iospec
        feed = spec.random_feed(spec.fixed_batch() or 1, seed=0)
        compiled: Any = torch.compile(self.module, backend="inductor")
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                compiled(*self._to_device([feed[n] for n in spec.input_names]))  # channels_last as timed
        except Exception as exc:
            raise BackendUnavailableError(f"torch.compile failed on this model: {first_line(exc, with_type=True)}") \
                from None
        self.compile_s = time.perf_counter() - t0
        self.module = compiled

    def record_extra(self) -> dict[str, Any]:
        return {"compile_s": self.compile_s}
