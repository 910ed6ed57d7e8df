"""PyTorch eager: the FP32 reference on CPU; on CUDA also FP16/BF16 autocast and channels_last."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from core.errors import BackendUnavailableError
from runtimes.base import Device, Runner


def cuda_problem() -> str | None:
    """None when CUDA is usable, else one line saying why not."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"
    return None


def load_torch_module(runner: Runner) -> Any:
    """The PyTorch module behind an artifact folder: the TorchScript copy, or the rebuilt model."""
    import torch

    from convert.models import rebuild_module

    path = runner.base / runner.artifact.file.path
    if runner.artifact.kind == "torchscript":
        return torch.jit.load(str(path), map_location="cpu").eval()
    return rebuild_module(runner.manifest.source, path).eval()


class TorchRunnerBase(Runner):
    artifact_kinds: ClassVar[tuple[str, ...]] = ("state_dict", "torchscript")  # type: ignore[assignment]
    devices: ClassVar[tuple[Device, ...]] = ("cpu", "cuda")

    module: Any = None

    @classmethod
    def available(cls, device: Device) -> str | None:
        if device == "cuda":
            return cuda_problem()
        return None

    @property
    def precision(self) -> str:
        return self.options.precision

    def _torch_setup(self) -> Any:
        import torch

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        if self.options.device == "cuda" and (why := cuda_problem()):
            raise BackendUnavailableError(f"{self.name} on cuda: {why}")
        if self.options.precision != "fp32" and self.options.device == "cpu":
            raise BackendUnavailableError(f"{self.name}: {self.options.precision} autocast is only measured on cuda")
        return torch

    def _dtype(self) -> Any:
        import torch

        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.options.precision]

    def prepare(self, feed: dict[str, np.ndarray]) -> Any:
        import torch

        dev = self.options.device
        tensors = []
        for name in self.manifest.iospec.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feed[name])).to(dev)
            if self.options.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            tensors.append(t)
        return tensors

    def _forward(self, tensors: list[Any]) -> Any:
        import torch

        dtype = self._dtype()
        with torch.inference_mode():
            if dtype is not None:
                with torch.autocast(device_type=self.options.device, dtype=dtype):
                    return self.module(*tensors)
            return self.module(*tensors)

    def _sync(self) -> None:
        if self.options.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def run_once(self, prepared: Any) -> None:
        self._forward(prepared)
        self._sync()

    def infer_prepared(self, prepared: Any) -> list[np.ndarray]:
        out = self._forward(prepared)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().float().cpu().numpy() for o in outs]

    def _close(self) -> None:
        self.module = None
        if self.options.device == "cuda":
            import torch

            torch.cuda.empty_cache()


class EagerRunner(TorchRunnerBase):
    """PyTorch eager mode, ``model.eval()`` under ``torch.inference_mode``."""

    name = "eager"

    def _load(self) -> None:
        torch = self._torch_setup()
        module = load_torch_module(self).to(self.options.device)
        if self.options.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
