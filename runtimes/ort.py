"""ONNX Runtime: CPU provider; CUDA (and TensorRT) providers when present, with IO binding on GPU."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from core.errors import BackendUnavailableError
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

    session: Any = None
    _input_types: dict[str, np.dtype[Any]]

    @classmethod
    def available(cls, device: Device) -> str | None:
        providers = ort_providers()
        if not providers:
            return "onnxruntime is not installed (pip install onnxruntime)"
        if device == "cuda" and "CUDAExecutionProvider" not in providers:
            return ("ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu: pip install .[gpu]); "
                    f"available providers: {providers}")
        return None

    def providers(self) -> list[Any]:
        if self.options.device == "cuda":
            avail = ort_providers()
            return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        return ["CPUExecutionProvider"]

    def _load(self) -> None:
        import onnxruntime as ort

        if (why := self.available(self.options.device)) is not None:
            raise BackendUnavailableError(f"ort on {self.options.device}: {why}")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        path = self.base / self.artifact.file.path
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=self.providers())
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendUnavailableError(f"ONNX Runtime cannot load {path.name}: {first}") from None
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
