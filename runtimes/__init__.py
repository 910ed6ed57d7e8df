"""Backends. ONE explicit table: name -> runner class. Heavy imports happen in ``Runner.load``."""

from __future__ import annotations

from runtimes.base import Runner, RunnerOptions
from runtimes.ort import OrtRunner
from runtimes.torch_eager import EagerRunner
from runtimes.torchscript import TorchScriptRunner

RUNNERS: dict[str, type[Runner]] = {
    "eager": EagerRunner,
    "torchscript": TorchScriptRunner,
    "ort": OrtRunner,
}

__all__ = ["RUNNERS", "Runner", "RunnerOptions"]
