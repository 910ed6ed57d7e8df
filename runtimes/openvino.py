"""OpenVINO runtime on the same ONNX files ONNX Runtime runs (FP32, FP16, INT8 Q/DQ), on CPU.

OpenVINO is an optional extra (``pip install .[openvino]``). Its ``PERFORMANCE_HINT`` (``LATENCY`` or
``THROUGHPUT``) and ``INFERENCE_NUM_THREADS`` come from the runner options; ``INFERENCE_PRECISION_HINT`` is f32,
as ONNX Runtime computes (OpenVINO's default on a CPU with AMX is bf16: ``core.flops.openvino_config``), unless the
row's precision is bf16 or fp16: then the FP32 file is compiled with that hint, on a CPU with the units for it
(``calibration.cpu.native_precisions``), and the precision OpenVINO reports after compiling is checked (its CPU
plugin falls back to f32 silently where it has no such kernels: such a row is skipped, never labelled bf16).
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
from core.sigstack import keep_valid
from runtimes.base import BackendOptions, Device, Runner, Session, TritonSettings

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
    # openvino_ir: OpenVINO's own INT4 weight compression (convert/int4_ov.py), read as it reads ONNX
    artifact_kinds: ClassVar[tuple[str, ...]] = ("onnx", "openvino_ir")  # type: ignore[assignment]
    devices: ClassVar[tuple[Device, ...]] = ("cpu",)
    options_model = OpenVinoOptions
    triton_backend: ClassVar[str | None] = "openvino"
    compute_in: ClassVar[tuple[str, ...]] = ("bf16", "fp16")  # INFERENCE_PRECISION_HINT on the FP32 file

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
        ``PERFORMANCE_HINT``, threads -> ``INFERENCE_NUM_THREADS``, a bf16 compute precision (``precision``) ->
        ``HINT_BF16=YES``, the one precision key that backend reads (its ParseParameters). The f32 compute the
        runner pins for other rows and an f16 one have no key there: recorded as not carried over."""
        params: dict[str, str] = {}
        not_carried: list[str] = []
        precision = settings.get("precision") or "fp32"
        for key, value in settings.items():
            if key == "threads" and value:
                params["INFERENCE_NUM_THREADS"] = str(int(value))
            elif key == "openvino_hint":
                params["PERFORMANCE_HINT"] = str(value)
            elif key != "precision" and value is not None:
                not_carried.append(f"{key}={value}")
        if precision == "bf16":
            params["HINT_BF16"] = "YES"
        elif precision == "fp16":
            not_carried.append("f16 compute (INFERENCE_PRECISION_HINT=f16, as tune measured): the openvino backend "
                               "has no key for it (only HINT_BF16=YES); it computes in its CPU's default precision")
        else:
            not_carried.append("f32 compute (INFERENCE_PRECISION_HINT=f32, as tune measured): the openvino backend "
                               "has no key for it (only HINT_BF16=YES); on a CPU with AMX it computes in bf16 by "
                               "default")
        return TritonSettings(backend=str(cls.triton_backend), model_filename="model.onnx", parameters=params,
                              not_carried=not_carried)

    @property
    def hint(self) -> str:
        return self.options.of(OpenVinoOptions).openvino_hint

    @property
    def precision(self) -> str:
        """The compute precision: bf16/fp16 asked for an FP32 file, else the file's own (compiled in f32)."""
        asked = self.options.precision
        return asked if self.artifact.precision == "fp32" and asked in self.compute_in else self.artifact.precision

    @property
    def config(self) -> dict[str, Any]:
        """The compile settings: hint, threads, compute precision (f32 but for a bf16/fp16 row)."""
        return openvino_config(self.hint, self.options.threads, self.precision if self.precision in self.compute_in
                               else "fp32")

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
        self._check_precision(path)
        self.request = self.compiled.create_infer_request()
        self._output_names = [self._name(p) for p in self.compiled.outputs]
        self._types = {self._name(p): p.get_element_type().to_dtype() for p in self.compiled.inputs}

    def _check_precision(self, path: Path) -> None:
        """The precision OpenVINO compiled in is the one asked: its CPU plugin falls back to f32 where it has no
        bf16/f16 kernels (an AVX2 CPU), silently; such a row would be f32 labelled bf16, so it is refused."""
        asked = self.config["INFERENCE_PRECISION_HINT"]
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if asked != got and asked != "f32":
            import openvino as ov

            caps = ", ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            raise BackendUnavailableError(f"OpenVINO compiled {path.name} in {got}, not {asked}: its CPU plugin has no "
                                          f"{asked} kernels on this CPU (OPTIMIZATION_CAPABILITIES: {caps})")

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

    def open_session(self) -> Session:
        """A KV-cache session for a decoder exported with its cache (as ONNX Runtime's), else the stateless one."""
        from runtimes.session import KVCacheSession, has_kv_cache

        return KVCacheSession(self) if has_kv_cache(self.manifest.iospec) else super().open_session()

    def _close(self) -> None:
        self.request = None
        self.compiled = None
        keep_valid()  # the CPU plugin may have put back a freed signal stack (core.sigstack)
