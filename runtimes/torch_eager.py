"""PyTorch eager: the FP32 reference on CPU; FP16/BF16 autocast on CUDA, and on a CPU that computes them natively
(AVX512_BF16/AMX-BF16, AVX512-FP16/AMX-FP16: ``calibration.cpu.native_precisions``; elsewhere PyTorch emulates them,
slower than FP32, so they are refused, never timed under their name); channels_last (``--channels-last``; `tune`
searches it, with and without, for a model with a 4-D float input: an image, where oneDNN's and cuDNN's convolutions
prefer NHWC and the NCHW<->NHWC reorders around each one go away); on CUDA also CUDA graphs (``--cuda-graphs``: one
graph per input shape, replayed in the timed loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from core.errors import BackendUnavailableError
from core.iospec import IOSpec
from core.manifest import Manifest
from core.models import output_list
from core.resources import cuda_problem
from runtimes.base import Device, Runner


def has_image_input(spec: IOSpec) -> bool:
    """Whether the model takes a 4-D float tensor (N, C, H, W): the inputs channels_last changes (PyTorch's
    ``channels_last`` memory format is defined for 4-D tensors only)."""
    return any(len(t.shape) == 4 and t.dtype.startswith("float") for t in spec.inputs)


def load_torch_module(runner: Runner) -> Any:
    """The PyTorch module behind an artifact folder: the TorchScript copy, or the rebuilt model."""
    import torch

    from core.models import rebuild_module

    path = runner.base / runner.artifact.file.path
    if runner.artifact.kind == "torchscript":
        return torch.jit.load(str(path), map_location="cpu").eval()
    man = runner.manifest
    component = (man.source.component or "model", man.iospec.input_names, man.iospec.output_names) \
        if man.source.kind == "hf" and man.exporter == "optimum" else None  # Optimum export: its file's inputs
    return rebuild_module(man.source, path, component=component).eval()


@dataclass
class TorchFeed:
    """A feed ready for the timed loop: device tensors (plus the host arrays, for
    ``--include-transfers``) and, with CUDA graphs, the graph that reads ``tensors``."""

    tensors: list[Any]
    host: list[np.ndarray] = field(default_factory=list)
    graph: Any = None
    graph_out: Any = None


class TorchRunnerBase(Runner):
    artifact_kinds: ClassVar[tuple[str, ...]] = ("state_dict", "torchscript")  # type: ignore[assignment]
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")
    torch_like = True
    needs_weights = True
    profiler = "torch"
    compute_in: ClassVar[tuple[str, ...]] = ("fp16", "bf16")  # autocast; on the CPU only where it has the units

    module: Any = None
    _threads_before: int | None = None
    #: Whether ``--cuda-graphs`` applies (eager only: TorchScript's profiling executor re-specialises).
    supports_cuda_graphs: ClassVar[bool] = False
    _graphs: dict[tuple[tuple[int, ...], ...], TorchFeed]

    @classmethod
    def available(cls, device: Device) -> str | None:
        if device == "cuda":
            return cuda_problem()
        return None

    @classmethod
    def search_space_for(cls, manifest: Manifest) -> list[dict[str, Any]]:
        """channels_last, off and on, for a model with an image input (4-D); nothing to search otherwise."""
        return [{"channels_last": False}, {"channels_last": True}] if has_image_input(manifest.iospec) else [{}]

    @property
    def precision(self) -> str:
        return self.options.precision

    def _torch_setup(self) -> Any:
        import torch

        if self.options.threads:
            self._threads_before = torch.get_num_threads()  # restored on close: the process's setting, not ours
            torch.set_num_threads(self.options.threads)
        if self.options.device == "cuda" and (why := cuda_problem()):
            raise BackendUnavailableError(f"{self.name} on cuda: {why}")
        if self.options.precision == "bf16" and self.options.device == "cuda" and \
                not torch.cuda.is_bf16_supported(including_emulation=False):
            major, minor = torch.cuda.get_device_capability()
            raise BackendUnavailableError(f"{self.name}: bf16 needs compute capability 8.0 or newer (Ampere+); "
                                          f"{torch.cuda.get_device_name()} is {major}.{minor}")
        self._graphs = {}
        return torch

    def _dtype(self) -> Any:
        import torch

        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.options.precision]

    def _to_device(self, arrays: list[np.ndarray]) -> list[Any]:
        import torch

        tensors = []
        for a in arrays:
            t = torch.from_numpy(a).to(self.options.device)
            if self.options.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            tensors.append(t)
        return tensors

    @property
    def _use_graphs(self) -> bool:
        return self.options.cuda_graphs and self.options.device == "cuda" and self.supports_cuda_graphs

    def prepare(self, feed: dict[str, np.ndarray]) -> TorchFeed:
        host = [np.ascontiguousarray(feed[n]) for n in self.manifest.iospec.input_names]
        tensors = self._to_device(host)
        if not self._use_graphs:
            return TorchFeed(tensors=tensors, host=host)
        key = tuple(tuple(t.shape) for t in tensors)
        if key not in self._graphs:
            self._graphs[key] = self._capture(tensors)
        captured = self._graphs[key]
        for static, new in zip(captured.tensors, tensors, strict=True):
            static.copy_(new)
        return TorchFeed(tensors=captured.tensors, host=host, graph=captured.graph, graph_out=captured.graph_out)

    def _capture(self, tensors: list[Any]) -> TorchFeed:
        """Capture one forward pass on static input buffers (after warm-up on a side stream, as
        CUDA graph capture requires); replaying it re-runs the pass on whatever those buffers hold."""
        import torch

        static = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(static)
        return TorchFeed(tensors=static, graph=graph, graph_out=out)

    def _forward(self, tensors: list[Any]) -> Any:
        import torch

        dtype = self._dtype()
        with torch.inference_mode():
            if dtype is not None:
                # No autocast weight cache under graph capture: cached casts would be freed memory.
                with torch.autocast(device_type=self.options.device, dtype=dtype,
                                    cache_enabled=not self._use_graphs):
                    return self.module(*tensors)
            return self.module(*tensors)

    def _execute(self, prepared: TorchFeed) -> Any:
        if prepared.graph is not None:
            prepared.graph.replay()
            return prepared.graph_out
        return self._forward(prepared.tensors)

    def run_once(self, prepared: Any) -> None:
        """CPU: one forward. CUDA: one forward (or graph replay) left on the device; the CUDA-event
        timer synchronises. With ``include_transfers`` the host->device and device->host copies
        are part of the call."""
        if self.options.device == "cuda" and self.options.include_transfers:
            for static, new in zip(prepared.tensors, self._to_device(prepared.host), strict=True):
                static.copy_(new)
            out = self._execute(prepared)
            for o in output_list(out):
                o.cpu()
            return
        self._execute(prepared)

    def infer_prepared(self, prepared: Any) -> list[np.ndarray]:
        out = self._execute(prepared)
        return [o.detach().float().cpu().numpy() for o in output_list(out)]

    def time_iterations(self, prepared: Any, warmup: int, iters: int) -> list[float]:
        if self.options.device == "cuda":
            from runtimes.gpu import reset_peak_memory

            reset_peak_memory()
        return super().time_iterations(prepared, warmup, iters)

    def memory_stats(self) -> dict[str, float]:
        """CUDA: peak memory allocated through PyTorch over the last timed loop (weights included)."""
        if self.options.device != "cuda":
            return {}
        from runtimes.gpu import peak_allocated_mb

        return {"vram_mb": peak_allocated_mb()}

    def _close(self) -> None:
        import torch

        self.module = None
        self._graphs = {}
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self.options.device == "cuda":
            torch.cuda.empty_cache()


class EagerRunner(TorchRunnerBase):
    """PyTorch eager mode, ``model.eval()`` under ``torch.inference_mode``."""

    name = "eager"
    supports_cuda_graphs = True

    def _load(self) -> None:
        torch = self._torch_setup()
        module = load_torch_module(self).to(self.options.device)
        if self.options.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
