"""ONNX Runtime: CPU provider; CUDA (and TensorRT) providers when present, with IO binding on GPU.

On CUDA the session runs on a PyTorch-created stream (``user_compute_stream``), so the CUDA-event
timer records on the stream that does the work; inputs are bound on the device once and outputs
stay there in the timed loop unless ``include_transfers``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from core.errors import BackendUnavailableError, first_line
from runtimes.base import Device, Runner


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


class OrtRunner(Runner):
    """``onnxruntime.InferenceSession`` over an ONNX artifact."""

    name = "ort"
    artifact_kinds: ClassVar[tuple[str, ...]] = ("onnx",)  # type: ignore[assignment]
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")
    #: The execution provider that must be active on CUDA (ONNX Runtime silently falls back otherwise).
    gpu_provider: ClassVar[str] = "CUDAExecutionProvider"

    session: Any = None
    _stream: Any = None
    _input_types: dict[str, np.dtype[Any]]

    @classmethod
    def available(cls, device: Device) -> str | None:
        providers = ort_providers()
        if not providers:
            return "onnxruntime is not installed (pip install onnxruntime)"
        if device not in cls.devices:
            return f"{cls.name} does not run on {device}"
        if device == "cuda":
            if cls.gpu_provider not in providers:
                hint = "pip install .[gpu]" if cls.gpu_provider == "CUDAExecutionProvider" else \
                    "onnxruntime-gpu with TensorRT libraries: pip install .[gpu,trt]"
                return f"ONNX Runtime has no {cls.gpu_provider} here ({hint}); available providers: {providers}"
            from runtimes.torch_eager import cuda_problem

            if (why := cuda_problem()) is not None:
                return f"the CUDA-event timer needs PyTorch with CUDA: {why}"
        return None

    def gpu_provider_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"device_id": 0}
        if self._stream is not None:
            opts["user_compute_stream"] = str(self._stream.cuda_stream)
        return opts

    def providers(self) -> list[Any]:
        if self.options.device != "cuda":
            return ["CPUExecutionProvider"]
        chain: list[Any] = [(self.gpu_provider, self.gpu_provider_options())]
        if self.gpu_provider != "CUDAExecutionProvider":
            chain.append(("CUDAExecutionProvider", OrtRunner.gpu_provider_options(self)))
        return [*chain, "CPUExecutionProvider"]

    def cuda_stream(self) -> Any:
        return self._stream

    def session_options(self) -> Any:
        """The ``SessionOptions`` the session is created with (the profiler adds ``enable_profiling``)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        if not self.options.ort_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def _load(self) -> None:
        import onnxruntime as ort

        if (why := self.available(self.options.device)) is not None:
            raise BackendUnavailableError(f"{self.name} on {self.options.device}: {why}")
        so = self.session_options()
        path = self.base / self.artifact.file.path
        if self.options.device == "cuda":
            import torch

            # A non-default stream: ONNX Runtime ignores a user stream whose handle is 0.
            self._stream = torch.cuda.Stream()
        try:
            try:
                self.session = ort.InferenceSession(str(path), sess_options=so, providers=self.providers())
            except Exception:
                if self._stream is None:
                    raise
                # Older ONNX Runtime without user_compute_stream: its Run() is then host-synchronous,
                # so events on the current stream still bracket the whole call.
                self._stream = None
                self.session = ort.InferenceSession(str(path), sess_options=so, providers=self.providers())
        except Exception as exc:
            raise BackendUnavailableError(f"ONNX Runtime cannot load {path.name}: {first_line(exc)}") from None
        if self.options.device == "cuda" and self.gpu_provider not in self.session.get_providers():
            active = self.session.get_providers()
            self.session = None
            raise BackendUnavailableError(f"ONNX Runtime could not start {self.gpu_provider} (CUDA/cuDNN/TensorRT "
                                          f"libraries missing or mismatched?); it fell back to {active}")
        type_map = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                    "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
                    "tensor(bool)": np.bool_}
        self._input_types = {i.name: np.dtype(type_map.get(i.type, np.float32)) for i in self.session.get_inputs()}
        self._output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, feed: dict[str, np.ndarray]) -> Any:
        host = {n: np.ascontiguousarray(feed[n], dtype=self._input_types.get(n, feed[n].dtype)) for n in feed}
        if self.options.device != "cuda":
            return host
        import onnxruntime as ort

        # IO binding: inputs copied to the GPU once, outputs stay on the GPU during timing.
        binding = self.session.io_binding()
        self._device_inputs = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in host.items()}
        for n, v in self._device_inputs.items():
            binding.bind_ortvalue_input(n, v)
        for n in self._output_names:
            binding.bind_output(n, "cuda")
        return {"binding": binding, "host": host}

    def run_once(self, prepared: Any) -> None:
        if self.options.device == "cuda":
            if self.options.include_transfers:
                self.session.run(None, prepared["host"])
            else:
                self.session.run_with_iobinding(prepared["binding"])
            return
        self.session.run(self._output_names, prepared)

    def infer_prepared(self, prepared: Any) -> list[np.ndarray]:
        if self.options.device == "cuda":
            return list(self.session.run(self._output_names, prepared["host"]))
        return list(self.session.run(self._output_names, prepared))

    def _close(self) -> None:
        self.session = None
        self._stream = None


class OrtTensorrtRunner(OrtRunner):
    """ONNX Runtime's TensorRT execution provider (CUDA provider as fallback for unsupported nodes).

    It builds its own engines on first use of each shape range, during the accuracy pass and
    warm-up; they are cached under ARTIFACT_DIR/bench/ort_trt_cache for the next run.
    """

    name = "ort-trt"
    devices: ClassVar[tuple[Device, ...]] = ("cuda",)
    gpu_provider = "TensorrtExecutionProvider"

    def gpu_provider_options(self) -> dict[str, Any]:
        cache = self.base / "bench" / "ort_trt_cache"
        cache.mkdir(parents=True, exist_ok=True)
        # Without trt_timing_cache_path ONNX Runtime writes its timing cache into the working directory.
        return super().gpu_provider_options() | {"trt_engine_cache_enable": True,
                                                 "trt_engine_cache_path": str(cache),
                                                 "trt_timing_cache_enable": True,
                                                 "trt_timing_cache_path": str(cache)}
