"""The Runner protocol: load / infer / close, used as a context manager.

Heavy imports (torch, onnxruntime, tensorrt) happen inside ``load()`` so that a machine without
one backend still imports every other. ``infer`` returns host NumPy arrays and is synchronised:
when it returns, the work is done, so the harness can time it with ``perf_counter_ns``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.manifest import Artifact, ArtifactKind, Manifest

Device = Literal["cpu", "cuda"]
#: How ``profile`` traces a runner: ONNX Runtime's own profiler, or ``torch.profiler``.
Profiler = Literal["onnxruntime", "torch"]


class RunnerOptions(BaseModel):
    """Options common to every backend."""

    model_config = ConfigDict(extra="forbid")

    device: Device = Field(default="cpu", description="cpu or cuda")
    threads: int | None = Field(default=None, description="Intra-op threads; None = library default")
    precision: str = Field(default="fp32", description="Eager/TorchScript compute precision: fp32, fp16, bf16")
    channels_last: bool = Field(default=False, description="PyTorch: use channels_last memory format")
    cuda_graphs: bool = Field(default=False, description="Eager PyTorch on CUDA: capture a CUDA graph")
    ort_spinning: bool = Field(default=True,
                               description="ONNX Runtime intra-op threads spin between runs (its default). "
                                           "Interleaved comparisons turn it off: one session's spinning threads "
                                           "would steal the cores from the next session's run")
    ort_graph_optimization: Literal["all", "extended", "basic"] = Field(
        default="all", description="ONNX Runtime's graph optimization level (all: its default, with the CPU layout "
                                   "transformations; extended: fusions without them; basic)")
    ort_execution_mode: Literal["sequential", "parallel"] = Field(
        default="sequential", description="ONNX Runtime runs the nodes one after another (its default) or "
                                          "independent branches at once")
    include_transfers: bool = Field(default=False,
                                    description="GPU: time host->device->host copies inside the loop")
    openvino_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        default="LATENCY", description="OpenVINO's PERFORMANCE_HINT: LATENCY (one request at a time) or THROUGHPUT")
    ort_profile_prefix: str | None = Field(default=None,
                                           description="ONNX Runtime: switch its profiler on and write the trace "
                                                       "to PREFIX*.json (what `profile` does)")


class Runner:
    """Base class for every backend; subclasses implement ``_load``, ``infer`` and ``_close``."""

    name: ClassVar[str] = "base"
    #: Manifest artifact kinds this runner can execute.
    artifact_kinds: ClassVar[tuple[ArtifactKind, ...]] = ()
    #: Devices this runner can use.
    devices: ClassVar[tuple[Device, ...]] = ("cpu",)

    # -- capabilities: what the harness, `profile` and the benchmarks ask of a backend ----------
    #: Runs a PyTorch module: takes ``--precisions`` (autocast compute precisions) instead of the
    #: artifact's own precision.
    torch_like: ClassVar[bool] = False
    #: Needs the PyTorch weights (state_dict / TorchScript artifacts); it runs them whatever
    #: ``--variants`` says, since they are the model, not a variant.
    needs_weights: ClassVar[bool] = False
    #: Runs a variant made for TensorRT (``int8_trt``) as TensorRT would; other backends run it only
    #: when ``--variants`` names it (ONNX Runtime's x86 kernels can saturate with its full-range weights).
    tensorrt_like: ClassVar[bool] = False
    #: How ``profile`` traces it: ONNX Runtime's own profiler, ``torch.profiler``, or None (not profilable).
    profiler: ClassVar[Profiler | None] = None
    #: ``profile``: operators that, among the top three, need a word of explanation -> that word.
    profile_notes: ClassVar[dict[str, str]] = {}

    def __init__(self, manifest: Manifest, base: Path, artifact: Artifact, options: RunnerOptions) -> None:
        self.manifest = manifest
        self.base = Path(base)
        self.artifact = artifact
        self.options = options
        self.loaded = False
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def available(cls, device: Device) -> str | None:
        """None when usable on ``device``, else one line saying what is missing."""
        return None if device in cls.devices else f"{cls.name} does not run on {device}"

    @property
    def precision(self) -> str:
        """The precision actually computed (artifact precision, or the autocast one for PyTorch)."""
        return self.artifact.precision

    @property
    def label(self) -> str:
        return f"{self.name}:{self.artifact.name}"

    def load(self) -> Runner:
        """Load the model; if that fails, release whatever was acquired before the failure, then raise."""
        self._started = True
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        self.loaded = True
        return self

    def close(self) -> None:
        """Release what ``load`` acquired, also after a failed ``load``; closing twice is harmless."""
        if self._started:
            self._started = False
            self.loaded = False
            self._close()

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- to implement ------------------------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def prepare(self, feed: dict[str, np.ndarray]) -> Any:
        """Turn a host feed into what ``infer_prepared`` consumes (e.g. device tensors).

        Done once per batch outside the timed loop; the default is the feed itself.
        """
        return feed

    def infer_prepared(self, prepared: Any) -> list[np.ndarray]:
        """Run on a prepared feed; synchronised; returns host arrays in IOSpec output order."""
        raise NotImplementedError

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.infer_prepared(self.prepare(feed))

    def run_once(self, prepared: Any) -> None:
        """One timed call. GPU runners override it to leave outputs on the device (no host copy)
        unless ``include_transfers`` is set; the default runs ``infer_prepared``."""
        self.infer_prepared(prepared)

    def cuda_stream(self) -> Any:
        """The torch CUDA stream this runner's work is queued on (None = the current stream)."""
        return None

    def time_iterations(self, prepared: Any, warmup: int, iters: int) -> list[float]:
        """Latencies in milliseconds of ``iters`` calls after ``warmup`` untimed ones.

        CPU: ``time.perf_counter_ns`` around each synchronised call. CUDA: CUDA events recorded on
        ``cuda_stream()`` around each call, synchronised after each iteration.
        """
        if self.options.device == "cuda":
            from runtimes.gpu import cuda_event_times

            return cuda_event_times(lambda: self.run_once(prepared), warmup, iters, stream=self.cuda_stream())
        for _ in range(warmup):
            self.run_once(prepared)
        out: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(iters):
            t0 = clock()
            self.run_once(prepared)
            out.append((clock() - t0) / 1e6)
        return out

    def record_extra(self) -> dict[str, Any]:
        """Backend-specific facts for the results' ``extra`` (e.g. torch.compile's compile time)."""
        return {}

    def memory_stats(self) -> dict[str, float]:
        """Backend-specific memory facts (e.g. peak GPU memory allocated, MB)."""
        return {}
