"""TorchScript: the model traced on the bench inputs' shapes and frozen (``torch.jit.freeze``)."""

from __future__ import annotations

import warnings
from typing import ClassVar

from runtimes.torch_eager import TorchRunnerBase, load_torch_module


class TorchScriptRunner(TorchRunnerBase):
    """``torch.jit.trace`` + ``torch.jit.freeze`` (+ ``optimize_for_inference`` on CPU)."""

    name = "torchscript"
    profile_notes: ClassVar[dict[str, str]] = {
        "forward": "'forward' is time inside the frozen TorchScript graph that no aten operator claims (fused and "
                   "prepacked kernels, e.g. convolutions); profile --backend eager or ort for a per-operator split",
    }

    def _load(self) -> None:
        torch = self._torch_setup()
        module = load_torch_module(self).to(self.options.device)
        if self.options.channels_last:
            module = module.to(memory_format=torch.channels_last)
        spec = self.manifest.iospec
        example_batch = spec.fixed_batch() or 2
        feed = spec.random_feed(example_batch, seed=0)
        example = tuple(self.prepare(feed).tensors)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(module, torch.jit.ScriptModule):
                traced = module
            else:
                dtype = self._dtype()
                if dtype is not None:
                    # Tracing under autocast needs its cast cache off, or cached casts become constants.
                    with torch.autocast(device_type=self.options.device, dtype=dtype, cache_enabled=False):
                        traced = torch.jit.trace(module, example, check_trace=False, strict=False)
                else:  # strict=False: a forward() may return a dict of outputs
                    traced = torch.jit.trace(module, example, check_trace=False, strict=False)
            frozen = torch.jit.freeze(traced.eval())
            if self.options.device == "cpu":
                frozen = torch.jit.optimize_for_inference(frozen)
        self.module = frozen
