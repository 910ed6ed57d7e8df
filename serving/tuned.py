"""`package --from-tune`: the winner of `tune` packaged with its settings in Triton's ``config.pbtxt``.

``tune.json`` is read with the model `tune` writes it with (``runtimes.tune.TuneResult``); the winner's variant
is packaged and its settings become the parameters of the Triton backend that runs it the same way. The winner's
runner says which backend that is and how each setting is written (``Runner.triton_settings``: ONNX Runtime's
threads, execution mode and graph optimization level for the onnxruntime backend, OpenVINO's hint, threads and a bf16
compute precision (``HINT_BF16``) for the openvino backend), and which settings have no key there (recorded as not
carried over, and said in the package's notes: an f32 or f16 compute precision on the openvino backend). The winner's
precision is a setting when it is not its file's own (bf16 computed from the FP32 file).

Only keys the backends read are written (the onnxruntime backend's ``ModelState`` and the openvino backend's
``ParseParameters``); ``check_config`` refuses any other. A winner batch above 1 becomes the dynamic batcher's
preferred batch size. A winner whose runner has no Triton backend (eager, torchscript, compile, ...): one clear line.
What was carried over and what was not is recorded per model in ``MANIFEST.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from core.errors import InputError
from core.fsutil import sha256_file

if TYPE_CHECKING:
    from core.manifest import Artifact
    from runtimes.base import TritonSettings

TUNE_FILE = "tune.json"


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
    precision: str = Field(default="fp32", description="The precision the winner computed in (tune.json's)")
    settings: dict[str, Any] = Field(description="The winner's settings, as tune.json records them, and its compute "
                                                 "precision (precision) where that is not its file's own (bf16 on the "
                                                 "FP32 file)")
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
    settings = dict(winner.settings)
    art = _artifact(artifact_dir, winner.variant)
    if art is not None and winner.precision != art.precision:  # computed in another precision than its file's
        settings["precision"] = winner.precision
    triton = triton_settings(winner.backend, settings)
    if triton is None:
        raise InputError(f"--from-tune: the winner {winner.label} runs on {winner.backend}, which Triton has no "
                         f"backend for; tune again with --backends {','.join(triton_runners())} to package its winner")
    flags = result.machine.get("cpu_flags") or {}
    return TunedSettings(tune_json=str(file), tune_json_sha256=sha256_file(file), winner=winner.label,
                         reason=result.reason, tuned_on=str(flags.get("summary") or result.machine.get("processor")),
                         backend=winner.backend, variant=winner.variant, batch_size=winner.batch_size,
                         precision=winner.precision, settings=settings, triton_backend=triton.backend, parameters=triton.parameters,
                         graph_level=triton.graph_level, not_carried=triton.not_carried)


def _artifact(artifact_dir: Path, variant: str) -> Artifact | None:
    """The winner's artifact in the folder's manifest (None where it is not there: `package` says so itself)."""
    from core.manifest import Manifest

    try:
        return Manifest.load(artifact_dir).artifacts.get(variant)
    except InputError:  # no or an unreadable manifest: package's own one-line error, raised where it reads it
        return None


def triton_settings(backend: str, settings: dict[str, Any]) -> TritonSettings | None:
    """What the runner of ``backend`` writes into config.pbtxt for ``settings``; None: Triton has no backend for it
    (or ``backend`` is no runner's)."""
    from runtimes import RUNNERS

    runner = RUNNERS.get(backend)
    return None if runner is None or runner.triton_backend is None else runner.triton_settings(settings)


def triton_runners() -> list[str]:
    """The backends whose winner can be packaged: their runner maps its settings to a Triton backend."""
    from runtimes import RUNNERS

    return [name for name, runner in RUNNERS.items() if runner.triton_backend is not None]


def triton_parameters(backend: str, settings: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """(config.pbtxt parameters, settings that have no key in that Triton backend), as the runner maps them."""
    triton = triton_settings(backend, settings)
    if triton is None:
        raise InputError(f"{backend}: Triton has no backend that runs it")
    return triton.parameters, triton.not_carried


def apply_tuning(msg: Any, tuned: TunedSettings) -> None:
    """Set the Triton backend, its parameters and the preferred batch of the config message ``msg``."""
    triton = triton_settings(tuned.backend, tuned.settings)
    if triton is not None and triton.model_filename is not None:  # a backend named instead of the platform
        msg.ClearField("platform")
        msg.backend = triton.backend
        msg.default_model_filename = triton.model_filename
    for key, value in tuned.parameters.items():
        msg.parameters[key].string_value = value
    if tuned.graph_level is not None:
        msg.optimization.graph.level = tuned.graph_level
    if msg.HasField("dynamic_batching") and 1 < tuned.batch_size <= msg.max_batch_size:
        msg.dynamic_batching.preferred_batch_size.append(tuned.batch_size)
