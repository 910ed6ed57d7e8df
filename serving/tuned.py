"""`package --from-tune`: the winner of `tune` packaged with its settings in Triton's ``config.pbtxt``.

``tune.json`` is read with the model `tune` writes it with (``runtimes.tune.TuneResult``); the winner's variant
is packaged and its settings become the parameters of the Triton backend that runs it the same way:

    ort        platform onnxruntime_onnx; intra-op threads -> ``intra_op_thread_count``, execution mode ->
               ``execution_mode`` (0 sequential, 1 parallel), graph optimization level -> ``optimization { graph
               { level } }`` (all: the backend's default, no field; extended: 1; basic: -1, the backend's
               numbering). Thread spinning has no key in the backend: recorded as not carried over.
    openvino   backend "openvino" reading ``1/model.onnx``; ``PERFORMANCE_HINT`` (LATENCY / THROUGHPUT) and
               threads -> ``INFERENCE_NUM_THREADS``. The f32 compute the runner pins has no key in that
               backend (only ``HINT_BF16``): recorded as not carried over.

Only keys the backends read are written (the onnxruntime backend's ``ModelState`` and the openvino backend's
``ParseParameters``); ``check_config`` refuses any other. A winner batch above 1 becomes the dynamic batcher's
preferred batch size. Other winners (eager, torchscript, compile, ...) have no Triton backend: one clear line.
What was carried over and what was not is recorded per model in ``MANIFEST.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from core.errors import InputError
from core.fsutil import sha256_file

TUNE_FILE = "tune.json"
#: tune backend -> the Triton backend that runs its variant the same way
TRITON_BACKENDS = {"ort": "onnxruntime", "openvino": "openvino"}
#: our ORT graph optimization level -> the onnxruntime backend's optimization.graph.level (all: its default)
GRAPH_LEVELS = {"extended": 1, "basic": -1}


class TunedSettings(BaseModel):
    """The tune winner a model was packaged from and what of its settings reached ``config.pbtxt``."""

    model_config = ConfigDict(extra="forbid")

    tune_json: str = Field(description="The tune.json read")
    tune_json_sha256: str
    winner: str = Field(description="The winner's label in tune.json")
    reason: str = Field(description="Why tune picked it (its interval against the others)")
    tuned_on: str = Field(description="The CPU tune measured on: thread counts are that machine's")
    backend: str
    variant: str
    batch_size: int
    settings: dict[str, Any] = Field(description="The winner's settings, as tune.json records them")
    triton_backend: str = Field(description="onnxruntime or openvino")
    parameters: dict[str, str] = Field(description="config.pbtxt parameters written from the settings")
    graph_level: int | None = Field(default=None, description="config.pbtxt optimization.graph.level (onnxruntime "
                                                               "backend: 1 extended, -1 basic; None: its default, all)")
    not_carried: list[str] = Field(default_factory=list, description="Settings the Triton backend has no key for")


def tune_path(path: Path) -> Path:
    """``path`` itself, or ``path``/tune.json for a folder (the artifact folder `tune` writes to)."""
    path = Path(path)
    return path / TUNE_FILE if path.is_dir() else path


def load_tuned(path: Path, artifact_dir: Path) -> TunedSettings:
    """The winner of the tune.json at ``path`` (a file, or a folder holding tune.json) and its Triton settings."""
    from runtimes.tune import TuneResult

    file = tune_path(path)
    if not file.is_file():
        raise InputError(f"--from-tune: no {file}; run `python cli.py tune {artifact_dir}` first")
    try:
        result = TuneResult.model_validate_json(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, PydanticValidationError) as exc:
        raise InputError(f"--from-tune: {file} is not a tune.json `tune` wrote: {str(exc).splitlines()[0]}") from None
    tuned_dir = Path(str(result.config.get("artifact_dir", "")))
    if tuned_dir.is_dir() and not tuned_dir.samefile(artifact_dir):
        raise InputError(f"--from-tune: {file} tuned {tuned_dir}, not {artifact_dir}")
    winner = next((c for c in result.candidates if c.label == result.winner), None)
    if winner is None:
        raise InputError(f"--from-tune: {file} names no winner ({result.reason})")
    if winner.backend not in TRITON_BACKENDS:
        raise InputError(f"--from-tune: the winner {winner.label} runs on {winner.backend}, which Triton has no "
                         f"backend for; tune again with --backends {','.join(TRITON_BACKENDS)} to package its winner")
    parameters, not_carried = triton_parameters(winner.backend, winner.settings)
    graph_level = GRAPH_LEVELS.get(str(winner.settings.get("ort_graph_optimization", "all"))) \
        if winner.backend == "ort" else None
    flags = result.machine.get("cpu_flags") or {}
    return TunedSettings(tune_json=str(file), tune_json_sha256=sha256_file(file), winner=winner.label,
                         reason=result.reason, tuned_on=str(flags.get("summary") or result.machine.get("processor")),
                         backend=winner.backend, variant=winner.variant, batch_size=winner.batch_size,
                         settings=winner.settings, triton_backend=TRITON_BACKENDS[winner.backend],
                         parameters=parameters, graph_level=graph_level, not_carried=not_carried)


def triton_parameters(backend: str, settings: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """(config.pbtxt parameters, settings that have no key in that Triton backend)."""
    params: dict[str, str] = {}
    not_carried: list[str] = []
    for key, value in settings.items():
        if key == "threads" and value:
            params["intra_op_thread_count" if backend == "ort" else "INFERENCE_NUM_THREADS"] = str(int(value))
        elif backend == "openvino" and key == "openvino_hint":
            params["PERFORMANCE_HINT"] = str(value)
        elif backend == "ort" and key == "ort_execution_mode":
            params["execution_mode"] = "1" if value == "parallel" else "0"
        elif backend == "ort" and key == "ort_graph_optimization":
            continue  # not a parameter: optimization.graph.level (graph_level)
        elif backend == "ort" and key == "ort_spinning":
            if not value:  # spinning is ONNX Runtime's default: only "off" is lost
                not_carried.append("ort_spinning=False (the onnxruntime backend has no key for "
                                   "session.intra_op.allow_spinning; its threads spin)")
        elif value is not None:
            not_carried.append(f"{key}={value}")
    if backend == "ort":
        params.setdefault("execution_mode", "0")  # sequential, the runner's default
    if backend == "openvino":
        not_carried.append("f32 compute (INFERENCE_PRECISION_HINT=f32, as tune measured): the openvino backend has "
                           "no key for it (only HINT_BF16=YES); on a CPU with AMX it computes in bf16 by default")
    return params, not_carried


def apply_tuning(msg: Any, tuned: TunedSettings) -> None:
    """Set the Triton backend, its parameters and the preferred batch of the config message ``msg``."""
    if tuned.triton_backend == "openvino":
        msg.ClearField("platform")
        msg.backend = "openvino"
        msg.default_model_filename = "model.onnx"
    for key, value in tuned.parameters.items():
        msg.parameters[key].string_value = value
    if tuned.graph_level is not None:
        msg.optimization.graph.level = tuned.graph_level
    if msg.HasField("dynamic_batching") and 1 < tuned.batch_size <= msg.max_batch_size:
        msg.dynamic_batching.preferred_batch_size.append(tuned.batch_size)
