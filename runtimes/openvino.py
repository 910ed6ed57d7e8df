"""OpenVINO runtime on the same ONNX files ONNX Runtime runs (FP32, FP16, INT8 Q/DQ), on CPU.

OpenVINO is an optional extra (``pip install .[openvino]``). Its ``PERFORMANCE_HINT`` (``LATENCY`` or
``THROUGHPUT``) and ``INFERENCE_NUM_THREADS`` come from the runner options; ``INFERENCE_PRECISION_HINT`` is f32,
as ONNX Runtime computes (OpenVINO's default on a CPU with AMX is bf16: ``core.flops.openvino_config``).
OpenVINO can crash the whole process on a graph it does not handle (seen: a segfault on a static INT8 Q/DQ
file), so each file is first compiled and run once in a child process: a crash there is one line saying so, and
the other backends go on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from core.errors import BackendUnavailableError, first_line
from core.flops import openvino_config
from runtimes.base import BackendOptions, Device, Runner, TritonSettings

#: Compile and run the model once, in a child process (argv: path, the compile settings as JSON).
_PROBE = """
import json, sys, numpy as np, openvino as ov
path, config = sys.argv[1], json.loads(sys.argv[2])
core = ov.Core()
compiled = core.compile_model(core.read_model(path), "CPU", config)
feed = {}
for port in compiled.inputs:
    shape = [d.get_length() if d.is_static else 1 for d in port.get_partial_shape()]
    feed[port.get_any_name()] = np.zeros(shape, dtype=port.get_element_type().to_dtype())
compiled.create_infer_request().infer(feed)
"""


def openvino_problem() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install '.[openvino]')"
    return None


class OpenVinoOptions(BackendOptions):
    """OpenVINO's own settings (``--openvino-hint``, ``RunnerOptions(openvino_hint=...)``, tune.json)."""

    openvino_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        default="LATENCY", description="OpenVINO's PERFORMANCE_HINT: LATENCY (one request at a time) or THROUGHPUT")


class OpenVinoRunner(Runner):
    """OpenVINO's CPU plugin on an ONNX artifact."""

    name = "openvino"
    artifact_kinds: ClassVar[tuple[str, ...]] = ("onnx",)  # type: ignore[assignment]
    devices: ClassVar[tuple[Device, ...]] = ("cpu",)
    options_model = OpenVinoOptions
    triton_backend: ClassVar[str | None] = "openvino"

    compiled: Any = None
    request: Any = None
    _output_names: list[str]

    @classmethod
    def available(cls, device: Device) -> str | None:
        if device not in cls.devices:
            return f"{cls.name} runs on cpu only here"
        return openvino_problem()

    @classmethod
    def search_space(cls) -> list[dict[str, Any]]:
        """Its performance hint."""
        return [{"openvino_hint": h} for h in ("LATENCY", "THROUGHPUT")]

    @classmethod
    def triton_settings(cls, settings: dict[str, Any]) -> TritonSettings | None:
        """Triton's openvino backend, named (``backend: "openvino"``) and reading ``1/model.onnx``: the hint ->
        ``PERFORMANCE_HINT``, threads -> ``INFERENCE_NUM_THREADS``. The f32 compute the runner pins has no key
        there (only ``HINT_BF16``): recorded as not carried over."""
        params: dict[str, str] = {}
        not_carried: list[str] = []
        for key, value in settings.items():
            if key == "threads" and value:
                params["INFERENCE_NUM_THREADS"] = str(int(value))
            elif key == "openvino_hint":
                params["PERFORMANCE_HINT"] = str(value)
            elif value is not None:
                not_carried.append(f"{key}={value}")
        not_carried.append("f32 compute (INFERENCE_PRECISION_HINT=f32, as tune measured): the openvino backend has "
                           "no key for it (only HINT_BF16=YES); on a CPU with AMX it computes in bf16 by default")
        return TritonSettings(backend=str(cls.triton_backend), model_filename="model.onnx", parameters=params,
                              not_carried=not_carried)

    @property
    def hint(self) -> str:
        return self.options.of(OpenVinoOptions).openvino_hint

    @property
    def config(self) -> dict[str, Any]:
        """The compile settings: hint, threads, f32 compute."""
        return openvino_config(self.hint, self.options.threads)

    def _probe(self, path: Path) -> None:
        """Compile and run once in a child process; a crash or an error there is a BackendUnavailableError."""
        try:
            proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), json.dumps(self.config)],
                                  capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise BackendUnavailableError(f"OpenVINO took over 900 s to compile {path.name}") from None
        if proc.returncode < 0:
            raise BackendUnavailableError(f"OpenVINO crashed (signal {-proc.returncode}) compiling or running "
                                          f"{path.name}; the other backends are measured without it")
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise BackendUnavailableError(f"OpenVINO cannot run {path.name}: {lines[-1] if lines else 'failed'}")

    def _load(self) -> None:
        import openvino as ov

        if (why := self.available(self.options.device)) is not None:
            raise BackendUnavailableError(f"{self.name}: {why}")
        path = self.base / self.artifact.file.path
        self._probe(path)
        core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", self.config)
        except Exception as exc:
            raise BackendUnavailableError(f"OpenVINO cannot compile {path.name}: {first_line(exc)}") from None
        self.request = self.compiled.create_infer_request()
        self._output_names = [self._name(p) for p in self.compiled.outputs]
        self._types = {self._name(p): p.get_element_type().to_dtype() for p in self.compiled.inputs}

    @staticmethod
    def _name(port: Any) -> str:
        return str(port.get_any_name())

    def prepare(self, feed: dict[str, np.ndarray]) -> Any:
        return {n: np.ascontiguousarray(a, dtype=self._types.get(n, a.dtype)) for n, a in feed.items()}

    def run_once(self, prepared: Any) -> None:
        self.request.infer(prepared)

    def infer_prepared(self, prepared: Any) -> list[np.ndarray]:
        self.request.infer(prepared)
        by_name = {self._name(p): np.array(self.request.get_tensor(p).data) for p in self.compiled.outputs}
        return [by_name[n] for n in self._output_names]

    def _close(self) -> None:
        self.request = None
        self.compiled = None
