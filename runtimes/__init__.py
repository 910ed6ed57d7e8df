"""Backends. ONE explicit table: name -> runner class. Heavy imports happen in ``Runner.load``.

What a backend can do is a class attribute of its runner (``artifact_kinds``, ``devices``, ``torch_like``,
``needs_weights``, ``tensorrt_like``, ``profiler``), never a list of names elsewhere; so is what it knows of its
own settings: its options model (``options_model``), what `tune` searches (``search_space``) and how the settings
are written into a Triton config (``triton_settings``). Backend names are checked against the table in one
place, :func:`check_backends`.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.errors import InputError
from runtimes.base import BackendOptions, Runner, RunnerOptions, Session, TritonSettings
from runtimes.compiled import CompileRunner
from runtimes.openvino import OpenVinoRunner
from runtimes.ort import OrtRunner, OrtTensorrtRunner
from runtimes.torch_eager import EagerRunner
from runtimes.torchscript import TorchScriptRunner
from runtimes.trt import TrtRunner

RUNNERS: dict[str, type[Runner]] = {
    "eager": EagerRunner,
    "torchscript": TorchScriptRunner,
    "ort": OrtRunner,
    "ort-trt": OrtTensorrtRunner,
    "trt": TrtRunner,
    "openvino": OpenVinoRunner,
    "compile": CompileRunner,
}


def unknown_backends(names: Iterable[str]) -> str | None:
    """None when every name is a backend of :data:`RUNNERS`, else the one line that says which are not."""
    if unknown := [b for b in names if b not in RUNNERS]:
        return f"unknown backend(s) {unknown}; available: {', '.join(RUNNERS)}"
    return None


def check_backends(names: Iterable[str]) -> None:
    """:func:`unknown_backends` as an InputError (bench, tune; a sweep plan's validator raises its line)."""
    if (why := unknown_backends(names)) is not None:
        raise InputError(why)


#: ``RunnerOptions`` checks each backend setting with the options model of the runner of this table that declares it.
RunnerOptions.runners = RUNNERS


__all__ = ["RUNNERS", "BackendOptions", "Runner", "RunnerOptions", "Session", "TritonSettings",
           "check_backends", "unknown_backends"]
