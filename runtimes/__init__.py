"""Backends. ONE explicit table: name -> runner class. Heavy imports happen in ``Runner.load``.

What a backend can do is a class attribute of its runner (``artifact_kinds``, ``devices``, ``torch_like``,
``needs_weights``, ``tensorrt_like``, ``profiler``), never a list of names elsewhere.
"""

from __future__ import annotations

from runtimes.base import Runner, RunnerOptions
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

__all__ = ["RUNNERS", "Runner", "RunnerOptions"]
