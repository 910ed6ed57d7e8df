"""TensorRT: a ``model.plan`` from ``convert --trt``, run through Polygraphy's ``TrtRunner``.

Loading refuses an engine whose file does not match the manifest, or that was built for another
GPU or TensorRT version (``convert.engine.load_engine``). In the timed loop the inputs are
PyTorch CUDA tensors prepared once and the outputs stay on the device
(``copy_outputs_to_host=False``); with ``include_transfers`` the host arrays go in and host arrays
come out, so both copies are timed. Timing: CUDA events on the runner's own stream.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np

from core.errors import BackendUnavailableError
from runtimes.base import Device, Runner


class TrtRunner(Runner):
    """Polygraphy's ``TrtRunner`` over a deserialized ``ICudaEngine``."""

    name = "trt"
    artifact_kinds: ClassVar[tuple[str, ...]] = ("plan",)  # type: ignore[assignment]
    devices: ClassVar[tuple[Device, ...]] = ("cuda",)

    _runner: Any = None
    _stream: Any = None
    _dtypes: dict[str, np.dtype[Any]]

    @classmethod
    def available(cls, device: Device) -> str | None:
        if device != "cuda":
            from runtimes.torch_eager import cuda_problem

            why = cuda_problem()
            return ("TensorRT needs an NVIDIA GPU and none is usable here: " + why) if why else \
                "TensorRT engines run on cuda only (use --device cuda)"
        from convert.engine import tensorrt_problem

        return tensorrt_problem()

    def _load(self) -> None:
        if (why := self.available(self.options.device)) is not None:
            raise BackendUnavailableError(f"trt: {why}")
        import torch
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner
        from polygraphy.datatype import DataType

        from convert.engine import load_engine

        engine = load_engine(self.base, self.artifact)
        self._runner = PolygraphyTrtRunner(engine, name=self.label)
        self._runner.activate()
        # Polygraphy enqueues on its own stream; the CUDA-event timer records on the same one.
        self._stream = torch.cuda.ExternalStream(self._runner.stream.ptr)
        meta = self._runner.get_input_metadata(use_numpy_dtypes=False)
        self._dtypes = {name: np.dtype(DataType.to_dtype(dtype, "numpy")) for name, (dtype, _shape) in meta.items()}

    def cuda_stream(self) -> Any:
        return self._stream

    def _host_feed(self, feed: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        return OrderedDict((n, np.ascontiguousarray(feed[n], dtype=self._dtypes.get(n, feed[n].dtype)))
                           for n in self.manifest.iospec.input_names)

    def prepare(self, feed: dict[str, np.ndarray]) -> Any:
        import torch

        host = self._host_feed(feed)
        device = OrderedDict((n, torch.from_numpy(a).cuda()) for n, a in host.items())
        torch.cuda.synchronize()
        return {"host": host, "device": device}

    def run_once(self, prepared: Any) -> None:
        if self.options.include_transfers:
            self._runner.infer(prepared["host"], check_inputs=False)
        else:
            self._runner.infer(prepared["device"], check_inputs=False, copy_outputs_to_host=False)

    def infer_prepared(self, prepared: Any) -> list[np.ndarray]:
        out = self._runner.infer(prepared["host"])
        # Polygraphy reuses its output buffers between calls: copy.
        return [np.array(out[n], dtype=np.float32, copy=True) if np.asarray(out[n]).dtype.kind == "f"
                else np.array(out[n], copy=True) for n in self.manifest.iospec.output_names]

    def _close(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
        self._runner = None
        self._stream = None
