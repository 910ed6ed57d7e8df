"""TensorRT: a ``model.plan`` from ``convert --trt``, run through Polygraphy's ``TrtRunner``.

Loading refuses an engine whose file does not match the manifest, or that was built for another
GPU or TensorRT version (:func:`load_engine`). In the timed loop the inputs are
PyTorch CUDA tensors prepared once and the outputs stay on the device
(``copy_outputs_to_host=False``); with ``include_transfers`` the host arrays go in and host arrays
come out, so both copies are timed. Timing: CUDA events on the runner's own stream.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import BackendUnavailableError, InputError
from core.fsutil import sha256_file
from core.manifest import Artifact
from core.records import EngineParams
from core.resources import cuda_problem
from runtimes.base import Device, Runner

TRT_INSTALL_HINT = "pip install .[trt]"


class EngineMismatchError(InputError):
    """The engine was built for another GPU or TensorRT version, or its file is not the recorded one."""


class TrtEnv(BaseModel):
    """What an engine is tied to: the TensorRT version and the GPU model."""

    model_config = ConfigDict(extra="forbid")

    tensorrt_version: str
    gpu_name: str
    compute_capability: str = Field(description="major.minor, e.g. '8.9'")

    def describe(self) -> str:
        return f"{self.gpu_name} (compute capability {self.compute_capability}) with TensorRT {self.tensorrt_version}"


# -- environment ------------------------------------------------------------------------------
def tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def tensorrt_problem() -> str | None:
    """None when TensorRT and a CUDA GPU are both usable here, else one line saying what is missing."""
    if not tensorrt_installed():
        return f"TensorRT is not installed ({TRT_INSTALL_HINT}; it needs an NVIDIA GPU and driver too)"
    if (why := cuda_problem()) is not None:
        return f"TensorRT needs an NVIDIA GPU: {why}"
    return None


def require_tensorrt(what: str = "--trt") -> None:
    """Raise one clear BackendUnavailableError unless TensorRT and a GPU are usable."""
    if (why := tensorrt_problem()) is not None:
        raise BackendUnavailableError(f"{what} builds a TensorRT engine, which needs TensorRT and an NVIDIA GPU: {why}")


def current_trt_env() -> TrtEnv:
    """This machine's TensorRT version and GPU 0 (tests replace this function)."""
    require_tensorrt("loading a TensorRT engine")
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return TrtEnv(tensorrt_version=str(trt.__version__), gpu_name=torch.cuda.get_device_name(0),
                  compute_capability=f"{major}.{minor}")


def recorded_env(artifact: Artifact) -> TrtEnv:
    """The build environment recorded for a plan artifact (``artifact.engine``); a missing one is refused."""
    keys = ("tensorrt_version", "gpu_name", "compute_capability")
    recorded = {k: getattr(artifact.engine, k, "") for k in keys}
    missing = [k for k, v in recorded.items() if not v]
    if missing:
        raise EngineMismatchError(f"engine {artifact.file.path} has no recorded {', '.join(missing)} in the "
                                  "manifest: rebuild it with `python cli.py convert MODEL --trt`")
    return TrtEnv(**recorded)


def check_engine_compat(artifact: Artifact, current: TrtEnv) -> None:
    """Refuse an engine built for another GPU model or TensorRT version, naming both."""
    built = recorded_env(artifact)
    if (built.tensorrt_version, built.gpu_name, built.compute_capability) != \
            (current.tensorrt_version, current.gpu_name, current.compute_capability):
        raise EngineMismatchError(f"engine {artifact.file.path} was built for {built.describe()}; this machine has "
                                  f"{current.describe()}: TensorRT engines only run where they were built, rebuild "
                                  "it here with `python cli.py convert MODEL --trt`")


def batch_range(artifact: Artifact) -> tuple[int, int]:
    """(min, max) batch the engine's profile accepts, from its build parameters in the manifest."""
    params = artifact.params
    if not isinstance(params, EngineParams):
        raise EngineMismatchError(f"engine {artifact.file.path} has no recorded batch range in the manifest: "
                                  "rebuild it with `python cli.py convert MODEL --trt`")
    return params.min_batch, params.max_batch


def check_engine_file(base: Path, artifact: Artifact, env: TrtEnv | None = None) -> Path:
    """The checks before deserializing: the file is the recorded one, and fits this machine."""
    path = Path(base) / artifact.file.path
    if not path.is_file():
        raise EngineMismatchError(f"engine file {path} is missing")
    if sha256_file(path) != artifact.file.sha256:
        raise EngineMismatchError(f"engine file {path} does not match the manifest's sha256 (corrupt, truncated or "
                                  "replaced): rebuild it with `python cli.py convert MODEL --trt`")
    check_engine_compat(artifact, env if env is not None else current_trt_env())
    return path


def load_engine(base: Path, artifact: Artifact, env: TrtEnv | None = None) -> Any:
    """Deserialize a plan artifact after ``check_engine_file``; a file TensorRT rejects is refused."""
    path = check_engine_file(base, artifact, env)
    from polygraphy.backend.trt import engine_from_bytes
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            engine = engine_from_bytes(path.read_bytes())
    except PolygraphyException:
        engine = None
    if not engine:
        raise EngineMismatchError(f"TensorRT could not deserialize {path} (corrupt file, or built by another "
                                  "TensorRT?): rebuild it with `python cli.py convert MODEL --trt`")
    return engine


class TrtRunner(Runner):
    """Polygraphy's ``TrtRunner`` over a deserialized ``ICudaEngine``."""

    name = "trt"
    artifact_kinds: ClassVar[tuple[str, ...]] = ("plan",)  # type: ignore[assignment]
    devices: ClassVar[tuple[Device, ...]] = ("cuda",)
    tensorrt_like = True

    _runner: Any = None
    _stream: Any = None
    _dtypes: dict[str, np.dtype[Any]]

    @classmethod
    def available(cls, device: Device) -> str | None:
        if device != "cuda":
            why = cuda_problem()
            return ("TensorRT needs an NVIDIA GPU and none is usable here: " + why) if why else \
                "TensorRT engines run on cuda only (use --device cuda)"
        return tensorrt_problem()

    def _load(self) -> None:
        if (why := self.available(self.options.device)) is not None:
            raise BackendUnavailableError(f"trt: {why}")
        import torch
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner
        from polygraphy.datatype import DataType

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
