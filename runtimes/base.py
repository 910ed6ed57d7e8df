"""The Runner protocol: load / infer / close, used as a context manager.

Heavy imports (torch, onnxruntime, tensorrt) happen inside ``load()`` so that a machine without
one backend still imports every other. ``infer`` returns host NumPy arrays and is synchronised:
when it returns, the work is done, so the harness can time it with ``perf_counter_ns``.

A runner also owns what is known of its backend's settings: its options model (``options_model``, kept by name in
``RunnerOptions``), what `tune` searches (``search_space``) and how the settings are written into a Triton config
(``triton_backend``, ``triton_settings``). ``open_session`` gives a :class:`Session`, calls that share state (a
KV cache across prefill and decode steps; ``runtimes.session``); the default keeps none.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from core.errors import BackendUnavailableError, InputError
from core.manifest import Artifact, ArtifactKind, Manifest

Device = Literal["cpu", "cuda"]
#: How ``profile`` traces a runner: ONNX Runtime's own profiler, or ``torch.profiler``.
Profiler = Literal["onnxruntime", "torch"]
B = TypeVar("B", bound="BackendOptions")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), not every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> int | None:
    """``threads`` when this process can run them on CPUs of its own; more (``--threads 1000``) is one clear line:
    the intra-op pool would start that many busy threads on the few CPUs there are, and the run would crawl."""
    if threads is not None and threads > (cpus := usable_cpus()):
        raise InputError(f"--threads {threads} is more than the {cpus} CPU(s) this process may use: give at most "
                         f"{cpus} (more threads than CPUs only compete for them)")
    return threads


class BackendOptions(BaseModel):
    """A backend's own settings: its runner's ``options_model`` (the base has none).

    Field names carry the backend's prefix (``ort_spinning``, ``openvino_hint``): they are the names the CLI flags,
    ``BenchConfig.options``, ``RunnerOptions(...)`` keywords and ``tune.json`` settings use.
    """

    model_config = ConfigDict(extra="forbid")


class RunnerOptions(BaseModel):
    """Options common to every backend, and each backend's own settings (``backend``).

    A backend's setting is given by its name, as before (``RunnerOptions(ort_spinning=False)``); it is checked by
    the ``options_model`` of the runner that declares it (``runtimes.RUNNERS``), kept in ``backend`` and read by
    that runner with :meth:`of`. ``model_dump`` lists the backend settings given beside the common fields, so a
    dump builds the same options again.
    """

    model_config = ConfigDict(extra="forbid")

    device: Device = Field(default="cpu", description="cpu or cuda")
    threads: int | None = Field(default=None, description="Intra-op threads; None = library default")
    precision: str = Field(default="fp32", description="Eager/TorchScript compute precision: fp32, fp16, bf16")
    channels_last: bool = Field(default=False, description="PyTorch: use channels_last memory format")
    cuda_graphs: bool = Field(default=False, description="Eager PyTorch on CUDA: capture a CUDA graph")
    include_transfers: bool = Field(default=False,
                                    description="GPU: time host->device->host copies inside the loop")
    #: The runners whose options models check the backend settings: ``runtimes.RUNNERS`` itself, set by
    #: ``runtimes/__init__.py`` (which imports this module, so this module cannot import it).
    runners: ClassVar[Mapping[str, type[Runner]]] = {}

    backend: dict[str, Any] = Field(default_factory=dict,
                                    description="Backend settings given, by name (ort_spinning, openvino_hint, ...); "
                                                "each a field of a runner's options model")

    @field_validator("threads")
    @classmethod
    def _threads_fit(cls, value: int | None) -> int | None:
        return check_threads(value)

    def __init__(self, **data: Any) -> None:
        """The common fields and any backend's settings by name (``RunnerOptions(threads=1, ort_spinning=False)``),
        each checked by the model that declares it."""
        super().__init__(**data)

    @model_validator(mode="before")
    @classmethod
    def _gather_backend_settings(cls, data: Any) -> Any:
        """Names that are not common fields are backend settings: moved into ``backend``."""
        if not isinstance(data, dict):
            return data
        own = {k: v for k, v in data.items() if k not in cls.model_fields}
        if not own:
            return data
        return {k: v for k, v in data.items() if k in cls.model_fields} | {"backend": {**data.get("backend", {}),
                                                                                        **own}}

    @model_validator(mode="after")
    def _check_backend_settings(self) -> RunnerOptions:
        """Each backend setting validated by the options model that declares it; an undeclared one is refused."""
        models = self.backend_models()
        if unknown := sorted(k for k in self.backend if not any(k in m.model_fields for m in models)):
            known = sorted({f for m in models for f in m.model_fields})
            raise ValueError(f"unknown runner option(s) {unknown}; backend settings: {', '.join(known)}")
        checked: dict[str, Any] = {}
        for m in models:
            if given := {k: v for k, v in self.backend.items() if k in m.model_fields}:
                checked |= m.model_validate(given).model_dump(include=set(given))
        self.backend = checked
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        return {k: v for k, v in out.items() if k != "backend"} | dict(out.get("backend", {}))

    @classmethod
    def backend_models(cls) -> list[type[BackendOptions]]:
        """Every runner's options model, once each (a runner may share its parent's)."""
        return list(dict.fromkeys(r.options_model for r in cls.runners.values()))

    def of(self, model: type[B]) -> B:
        """The settings of one backend: ``model`` (a runner's ``options_model``) from those given, defaults else."""
        return model.model_validate({k: v for k, v in self.backend.items() if k in model.model_fields})

    if not TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any:
            """A backend setting read by name (``RunnerOptions().openvino_hint``), as when it was a field here."""
            if not name.startswith("_"):
                for m in self.backend_models():
                    if name in m.model_fields:
                        return getattr(self.of(m), name)
            return super().__getattr__(name)


class TritonSettings(BaseModel):
    """How a runner's tuned settings are written into a Triton ``config.pbtxt`` (``Runner.triton_settings``)."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(description="The Triton backend that runs the variant the same way (onnxruntime, ...)")
    model_filename: str | None = Field(default=None, description="Set: the backend is named (``backend:``) instead "
                                                                 "of the artifact's platform, with this model file")
    parameters: dict[str, str] = Field(default_factory=dict, description="config.pbtxt parameters")
    graph_level: int | None = Field(default=None, description="config.pbtxt optimization.graph.level (None: unset)")
    not_carried: list[str] = Field(default_factory=list, description="Settings the Triton backend has no key for")


class Session:
    """Calls of one loaded runner that share state (a KV cache: prefill, then decode steps), used as a context
    manager. This default keeps none: each ``step`` is one ``infer``; a runner with state returns its own
    subclass from :meth:`Runner.open_session`."""

    def __init__(self, runner: Runner) -> None:
        if not runner.loaded:
            raise RuntimeError(f"{runner.label}: open a session on a loaded runner")
        self.runner = runner
        self.steps = 0

    def step(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One call with what the session keeps; host arrays in IOSpec output order."""
        self.steps += 1
        return self.runner.infer(feed)

    def close(self) -> None:
        """Drop the state; the runner stays loaded."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

    # -- what a backend knows of its own settings: bench, tune and `package --from-tune` ask it ----
    #: Its own settings (``RunnerOptions`` keeps them by name; ``options.of(options_model)`` reads them).
    options_model: ClassVar[type[BackendOptions]] = BackendOptions
    #: The Triton backend that runs its variants the same way (``triton_settings`` maps its settings); None: none.
    triton_backend: ClassVar[str | None] = None
    #: The reduced precisions it can compute an FP32 file in when asked (``--precisions``, tune): PyTorch's autocast,
    #: OpenVINO's INFERENCE_PRECISION_HINT; ``precision_notes``: why it cannot compute one (more than the default line).
    compute_in: ClassVar[tuple[str, ...]] = ()
    precision_notes: ClassVar[dict[str, str]] = {}

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

    @classmethod
    def search_space(cls) -> list[dict[str, Any]]:
        """`tune`'s search dimensions: every combination of its settings that change speed, never its numbers
        (each a dict of ``RunnerOptions`` names -> values). Default: nothing to search."""
        return [{}]

    @classmethod
    def search_space_for(cls, manifest: Manifest) -> list[dict[str, Any]]:
        """:meth:`search_space` for the model of ``manifest`` (a setting that applies only to some models, e.g.
        PyTorch's channels_last to image inputs). Default: the same for every model."""
        return cls.search_space()

    @classmethod
    def triton_settings(cls, settings: dict[str, Any]) -> TritonSettings | None:
        """``settings`` (one of ``search_space``'s) written for ``triton_backend``; None when there is none."""
        return None

    @classmethod
    def compute_precisions(cls, artifact: Artifact, asked: list[str]) -> list[str]:
        """The precisions ``artifact`` runs in on this backend when ``asked`` are wanted: a file of a reduced precision
        (an INT8 or FP16 variant) in its own; an FP32 file (or PyTorch's weights) in each one asked, also those
        ``precision_problem`` refuses here (each then a skip with its line, not a silent omission)."""
        return list(dict.fromkeys(asked)) if artifact.precision == "fp32" else [artifact.precision]

    @classmethod
    def precision_problem(cls, precision: str, device: Device) -> str | None:
        """None when this backend computes an FP32 file in ``precision`` on ``device``, else one line why not: it has
        no switch for it, or (on the CPU) the CPU has no units for it (``calibration.cpu.precision_problem``: never
        a timing of an emulation labelled with the precision)."""
        if precision == "fp32":
            return None
        if precision not in cls.compute_in:
            return cls.precision_notes.get(precision, f"{cls.name} cannot compute an FP32 file in {precision}")
        if device == "cpu":
            from calibration.cpu import precision_problem

            return precision_problem(precision)
        return None

    def open_session(self) -> Session:
        """A session over this loaded runner (see :class:`Session`); stateless by default."""
        return Session(self)

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
            asked = self.options.precision  # a reduced precision of an FP32 file: can this backend and CPU compute it?
            if asked != "fp32" and asked != self.artifact.precision and \
                    (why := self.precision_problem(asked, self.options.device)) is not None:
                raise BackendUnavailableError(why)
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
