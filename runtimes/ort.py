"""ONNX Runtime: CPU provider; CUDA (and TensorRT) providers when present, with IO binding on GPU.

On CUDA the session runs on a PyTorch-created stream (``user_compute_stream``), so the CUDA-event
timer records on the stream that does the work; inputs are bound on the device once and outputs
stay there in the timed loop unless ``include_transfers``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from core.errors import BackendUnavailableError, InputError, first_line
from core.resources import cuda_problem
from runtimes.base import BackendOptions, Device, Profiler, Runner, Session, TritonSettings, usable_cpus

GraphOptimization = Literal["all", "extended", "basic", "none"]


#: ONNX Runtime's tensor type strings (``NodeArg.type``) -> NumPy dtypes.
ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(bool)": np.bool_,
}


def numpy_type(ort_type: str) -> np.dtype[Any]:
    """The NumPy dtype of an ONNX Runtime type string (float32 for a type without one)."""
    return np.dtype(ORT_TYPES.get(ort_type, np.float32))


def session_options(threads: int | None = None, *, spinning: bool = True,
                    optimization: GraphOptimization = "all", profile_prefix: str | None = None,
                    parallel: bool = False) -> Any:
    """The one place ONNX Runtime ``SessionOptions`` are made: quiet logging, the graph optimization
    level, intra-op threads (None = ONNX Runtime's default), whether idle threads spin, and (with
    ``profile_prefix``) ONNX Runtime's profiler writing its trace to ``profile_prefix``*.json; ``parallel``: run
    independent nodes at once (ORT_PARALLEL) instead of one after another."""
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = levels[optimization]
    if threads:
        so.intra_op_num_threads = threads
    if parallel:
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


#: Graph optimizers left off for a model with float16 tensors: ONNX Runtime 1.32's NCHWc layout transformer kills
#: the process (SIGSEGV) while creating a session over some FP16 graphs (torchvision's vit_b_16, or a 2-layer ViT,
#: after ONNX Runtime's own float16 converter), so ``convert --fp16`` and ``bench`` of such a file died without a
#: word. Its blocked layout is for FP32 convolutions: an FP16 model loses nothing without it.
FP16_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def disabled_optimizers(model: Path | bytes) -> list[str]:
    """The graph optimizers to leave off for ``model`` (a file or a serialised model): FP16_DISABLED_OPTIMIZERS where
    it has a float16 initializer, else none. Reads the graph without external data."""
    import onnx

    try:
        proto = onnx.ModelProto.FromString(model) if isinstance(model, bytes) else \
            onnx.load(str(model), load_external_data=False)
    except Exception:
        return []  # ONNX Runtime says what is wrong with it
    half = onnx.TensorProto.FLOAT16
    graphs = [proto.graph]
    while graphs:  # subgraphs (If / Loop bodies) too
        g = graphs.pop()
        if any(t.data_type == half for t in g.initializer) or \
                any(a.t.data_type == half for n in g.node for a in n.attribute if a.HasField("t")):
            return list(FP16_DISABLED_OPTIMIZERS)
        graphs += [a.g for n in g.node for a in n.attribute if a.HasField("g")]
        graphs += [sub for n in g.node for a in n.attribute for sub in a.graphs]
    return []


def ort_session(model: Path | bytes, threads: int | None = None, providers: list[str] | None = None, *,
                simulate_qdq: bool = False) -> Any:
    """An ONNX Runtime CPU session (or the given providers) over a file or a serialised model;
    a model ONNX Runtime refuses is an InputError.

    ``simulate_qdq`` turns graph optimizations off, so Q/DQ pairs run as written (quantize, then
    dequantize, then the FP32 op) instead of being fused into ONNX Runtime's integer kernels: the
    arithmetic TensorRT's INT8 kernels follow (INT32 accumulation), without the x86 CPU kernels'
    saturation of full-range signed INT8 weights.
    """
    import onnxruntime as ort

    so = session_options(threads, optimization="none" if simulate_qdq else "all")
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=so,
                                    providers=providers or ["CPUExecutionProvider"],
                                    disabled_optimizers=disabled_optimizers(model))
    except Exception as exc:
        what = "the in-memory model" if isinstance(model, bytes) else str(model)
        raise InputError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from None


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


class OrtOptions(BackendOptions):
    """ONNX Runtime's own settings (``RunnerOptions(ort_spinning=False)``, ``--no-ort-spinning``, tune.json)."""

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
    ort_profile_prefix: str | None = Field(default=None,
                                           description="ONNX Runtime: switch its profiler on and write the trace "
                                                       "to PREFIX*.json (what `profile` does)")


#: our graph optimization level -> the Triton onnxruntime backend's optimization.graph.level (all: its default)
TRITON_GRAPH_LEVELS = {"extended": 1, "basic": -1}


class OrtRunner(Runner):
    """``onnxruntime.InferenceSession`` over an ONNX artifact."""

    name = "ort"
    artifact_kinds: ClassVar[tuple[str, ...]] = ("onnx",)  # type: ignore[assignment]
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")
    #: The execution provider that must be active on CUDA (ONNX Runtime silently falls back otherwise).
    gpu_provider: ClassVar[str] = "CUDAExecutionProvider"
    profiler: ClassVar[Profiler | None] = "onnxruntime"
    options_model = OrtOptions
    triton_backend: ClassVar[str | None] = "onnxruntime"
    #: No switch computes an FP32 file in a reduced precision on its CPU provider (issue 32): skipped with these lines
    precision_notes: ClassVar[dict[str, str]] = {
        "bf16": "ONNX Runtime's CPU provider has no bf16 compute for an FP32 file on x86 (its only bf16 GEMM path, "
                "mlas.enable_gemm_fastmath_arm64_bfloat16, is ARM64's)",
        "fp16": "ONNX Runtime computes an FP32 file in FP32 (no compute-precision switch); its FP16 is a file of its "
                "own: convert --fp16"}

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
            if (why := cuda_problem()) is not None:
                return f"the CUDA-event timer needs PyTorch with CUDA: {why}"
        return None

    @classmethod
    def search_space(cls) -> list[dict[str, Any]]:
        """Intra-op threads (1 and every usable CPU), spinning, graph optimization (all, or extended: without the
        CPU layout transformations) and execution mode."""
        threads = sorted({1, usable_cpus()})
        return [{"threads": t, "ort_spinning": s, "ort_graph_optimization": g, "ort_execution_mode": m}
                for t, s, g, m in itertools.product(threads, (True, False), ("all", "extended"),
                                                    ("sequential", "parallel"))]

    @classmethod
    def triton_settings(cls, settings: dict[str, Any]) -> TritonSettings | None:
        """Triton's onnxruntime backend (the artifact's platform, onnxruntime_onnx): threads ->
        ``intra_op_thread_count``, execution mode -> ``execution_mode`` (0 sequential, 1 parallel), graph
        optimization -> ``optimization { graph { level } }`` (all: the backend's default, no field; extended: 1;
        basic: -1, the backend's numbering). Thread spinning has no key there: recorded as not carried over."""
        params: dict[str, str] = {}
        not_carried: list[str] = []
        for key, value in settings.items():
            if key == "threads" and value:
                params["intra_op_thread_count"] = str(int(value))
            elif key == "ort_execution_mode":
                params["execution_mode"] = "1" if value == "parallel" else "0"
            elif key == "ort_graph_optimization":
                continue  # not a parameter: optimization.graph.level
            elif key == "ort_spinning":
                if not value:  # spinning is ONNX Runtime's default: only "off" is lost
                    not_carried.append("ort_spinning=False (the onnxruntime backend has no key for "
                                       "session.intra_op.allow_spinning; its threads spin)")
            elif value is not None:
                not_carried.append(f"{key}={value}")
        params.setdefault("execution_mode", "0")  # sequential, the runner's default
        level = TRITON_GRAPH_LEVELS.get(str(settings.get("ort_graph_optimization", "all")))
        return TritonSettings(backend=str(cls.triton_backend), parameters=params, graph_level=level,
                              not_carried=not_carried)

    def open_session(self) -> Session:
        """A decoder with a KV cache (``past_key_values.*`` inputs, ``present.*`` outputs) gets a session that
        feeds each step's present back as the next step's past; any other model the stateless default."""
        from runtimes.session import KVCacheSession, has_kv_cache

        return KVCacheSession(self) if has_kv_cache(self.manifest.iospec) else super().open_session()

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
        """The ``SessionOptions`` the session is created with (``ort_profile_prefix`` turns the profiler on)."""
        o = self.options.of(OrtOptions)
        return session_options(self.options.threads, spinning=o.ort_spinning, profile_prefix=o.ort_profile_prefix,
                               optimization=o.ort_graph_optimization, parallel=o.ort_execution_mode == "parallel")

    def end_profiling(self) -> Path:
        """Stop ONNX Runtime's profiler (``ort_profile_prefix``) and return the trace file it wrote."""
        return Path(self.session.end_profiling())

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
        off = disabled_optimizers(path)
        try:
            try:
                self.session = ort.InferenceSession(str(path), sess_options=so, providers=self.providers(),
                                                    disabled_optimizers=off)
            except Exception:
                if self._stream is None:
                    raise
                # Older ONNX Runtime without user_compute_stream: its Run() is then host-synchronous,
                # so events on the current stream still bracket the whole call.
                self._stream = None
                self.session = ort.InferenceSession(str(path), sess_options=so, providers=self.providers(),
                                                    disabled_optimizers=off)
        except Exception as exc:
            raise BackendUnavailableError(f"ONNX Runtime cannot load {path.name}: {first_line(exc)}") from None
        if self.options.device == "cuda" and self.gpu_provider not in self.session.get_providers():
            active = self.session.get_providers()
            self.session = None
            raise BackendUnavailableError(f"ONNX Runtime could not start {self.gpu_provider} (CUDA/cuDNN/TensorRT "
                                          f"libraries missing or mismatched?); it fell back to {active}")
        self._input_types = {i.name: numpy_type(i.type) for i in self.session.get_inputs()}
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
    tensorrt_like = True
    profiler = None
    #: its engines are its own: Triton's onnxruntime backend would not run them the same way
    triton_backend = None

    def gpu_provider_options(self) -> dict[str, Any]:
        cache = self.base / "bench" / "ort_trt_cache"
        cache.mkdir(parents=True, exist_ok=True)
        # Without trt_timing_cache_path ONNX Runtime writes its timing cache into the working directory.
        return super().gpu_provider_options() | {"trt_engine_cache_enable": True,
                                                 "trt_engine_cache_path": str(cache),
                                                 "trt_timing_cache_enable": True,
                                                 "trt_timing_cache_path": str(cache)}
