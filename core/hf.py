"""Hugging Face transformers from a local folder (``hf:path/to/folder``), described by Optimum's ONNX configs.

Optimum declares, per architecture and task, the model's input and output names, their dynamic axes and
dummy inputs (``optimum.exporters.onnx`` model configs). We take that description, not a guess: the module
(wrapped so that it takes its inputs positionally and returns its outputs as a tuple in Optimum's order), the
sample inputs and the dynamic axes go through the same export, parity and quantization as any other model,
and the eager backend runs the same wrapped module. Optional: ``pip install .[hf]``; nothing is downloaded.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from core.errors import BackendUnavailableError, InputError, first_line

PREFIX = "hf:"
#: Optimum's axis names -> ours (a dim shared by several inputs is one dim, named once).
_DIM_NAMES = {"batch_size": "batch", "sequence_length": "sequence", "num_channels": "channels"}
#: The sequence length of the sample inputs (bind another with --input-shape input_ids:1x128,...).
SAMPLE_SEQUENCE = 16


def is_hf(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _imports() -> tuple[Any, Any]:
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        import transformers
        from optimum.exporters.tasks import TasksManager
    except ImportError as exc:
        raise BackendUnavailableError(f"hf: models need transformers and optimum-onnx ({first_line(exc)}); "
                                      "install them with: pip install '.[hf]'") from None
    return transformers, TasksManager


def _folder(spec: str) -> Path:
    folder = Path(spec[len(PREFIX):])
    if not (folder / "config.json").is_file():
        raise InputError(f"{spec}: {folder} is not a Hugging Face model folder (no config.json there); save one "
                         "with model.save_pretrained(folder)")
    return folder


def infer_task(folder: Path, task: str | None) -> str:
    """``--task`` as given (checked against what Optimum exports for this architecture), else the task of the
    folder's ``architectures`` class (e.g. BertForSequenceClassification -> text-classification)."""
    transformers, tasks = _imports()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise InputError(f"{folder}/config.json cannot be read by transformers: {first_line(exc)}") from None
    try:
        supported = list(tasks.get_supported_tasks_for_model_type(config.model_type, "onnx",
                                                                  library_name="transformers"))
    except KeyError:
        raise InputError(f"Optimum has no ONNX export config for model type {config.model_type!r}") from None
    if task is None:
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise InputError(f"{folder}: config.json names no known architecture; pass --task, one of {supported}")
        task = str(tasks.infer_task_from_model(cls))
    if task not in supported:
        raise InputError(f"--task {task!r} is not exportable for {config.model_type!r}; choose one of {supported}")
    return task


def _wrapper(model: Any, inputs: list[str], outputs: list[str]) -> Any:
    """The model taking ``inputs`` positionally and returning ``outputs`` as a tuple (what exporters, the
    parity check and the eager runner call); its signature names the inputs."""
    import torch

    class HFModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> tuple[Any, ...]:
            out = self.model(**dict(zip(inputs, args, strict=True)), return_dict=True)
            return tuple(out[n] for n in outputs)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in inputs]
    HFModule.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return HFModule().eval()


def load_hf(spec: str, task: str | None, weights: str | None) -> tuple[Any, str, dict[str, Any],
                                                                        dict[str, dict[int, str]]]:
    """``hf:folder`` -> (wrapped module, task, sample inputs by name as NumPy, dynamic axes of every input
    and output with our dim names)."""
    if weights:
        raise InputError("--weights cannot be combined with an hf: model: its weights are in the folder")
    folder = _folder(spec)
    task = infer_task(folder, task)
    _, tasks = _imports()
    try:
        # eager attention: the MatMul/Softmax pattern ONNX Runtime's transformer optimizer fuses into Attention
        # (SDPA exports as a pattern it does not match); the same numbers either way
        model = tasks.get_model_from_task(task, str(folder), framework="pt", library_name="transformers",
                                          local_files_only=True, attn_implementation="eager")
        ctor = tasks.get_exporter_config_constructor(exporter="onnx", model=model, task=task,
                                                     library_name="transformers")
        onnx_config = ctor(model.config, task=task)
        dummy = onnx_config.generate_dummy_inputs(framework="pt", batch_size=2, sequence_length=SAMPLE_SEQUENCE)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{spec}: loading it as {task!r} failed: {type(exc).__name__}: {first_line(exc)}") from None
    inputs, outputs = list(onnx_config.inputs), list(onnx_config.outputs)
    axes = {name: {int(i): _DIM_NAMES.get(d, d) for i, d in dims.items()}
            for name, dims in {**onnx_config.inputs, **onnx_config.outputs}.items()}
    samples = {n: dummy[n].detach().cpu().numpy() for n in inputs}
    return _wrapper(model.eval(), inputs, outputs), task, samples, axes


def id2label(spec: str) -> list[str] | None:
    """The class names of a classification head (config.json's id2label), when it has real ones."""
    transformers, _ = _imports()
    config = transformers.AutoConfig.from_pretrained(str(_folder(spec)), local_files_only=True)
    labels = [str(config.id2label[i]) for i in sorted(config.id2label)] if config.id2label else []
    return None if not labels or labels == [f"LABEL_{i}" for i in range(len(labels))] else labels
