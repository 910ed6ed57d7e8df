"""Hugging Face transformers from a local folder (``hf:path/to/folder``), exported by Optimum's ONNX exporter.

Optimum declares, per architecture and task, the submodels to export (one ``model``, or an encoder, a decoder, a
decoder with past and a merged decoder), their ONNX configs (input and output names, dynamic axes, dummy-input
generators) and the model patchers its export needs (KV caches, attention masks, unsupported ops). We use all of
it: ``convert.hf_export`` runs Optimum's own export; this module loads the model and its submodels, and gives, per
component, the eager module (the submodel under Optimum's patcher, taking the ONNX inputs by name and returning the
ONNX outputs in order: the parity reference and bench's eager backend) and feeds from Optimum's dummy-input
generators (values the model accepts: ids in the vocabulary, past lengths consistent with the masks).

Optional: ``pip install .[hf]``; nothing is downloaded. Where optimum-onnx cannot be imported with the installed
transformers (a newer transformers than it supports), the model is exported by torch.onnx's dynamo exporter from the
architecture's own inputs, with one line saying so (no ``*-with-past`` tasks then).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import BackendUnavailableError, InputError, first_line

if TYPE_CHECKING:
    from core.manifest import Preprocessing

PREFIX = "hf:"
#: Optimum's dim names -> ours, word by word ("past_sequence_length + sequence_length" -> "past_sequence + sequence").
_DIM_WORDS = {"batch_size": "batch", "sequence_length": "sequence", "past_sequence_length": "past_sequence",
              "encoder_sequence_length": "encoder_sequence", "decoder_sequence_length": "decoder_sequence",
              "past_decoder_sequence_length": "past_decoder_sequence", "num_channels": "channels"}
#: The sequence length of the export's dummy inputs, and the second value parity checks run at.
SAMPLE_SEQUENCE = 16
SECOND_SEQUENCE = 24
#: The single-file component's name (Optimum's file stem for a model exported as one file).
SINGLE = "model"
#: Optimum's merged decoder (decoder and decoder-with-past in one file, an If on use_cache_branch).
MERGED = "decoder_model_merged"


def is_hf(spec: str) -> bool:
    return spec.startswith(PREFIX)


def dim_name(optimum_name: str) -> str:
    """Optimum's axis name (possibly a sum such as 'past_sequence_length + sequence_length') in our words."""
    return " + ".join(_DIM_WORDS.get(w.strip(), w.strip()) for w in optimum_name.split("+"))


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise BackendUnavailableError(f"hf: models need transformers ({first_line(exc)}); install it with: "
                                      "pip install '.[hf]'") from None
    return transformers


def optimum_problem() -> str | None:
    """Why Optimum's ONNX exporter cannot be used here (None: it can): not installed, or not importable with the
    installed transformers (e.g. a transformers newer than optimum-onnx supports)."""
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager  # noqa: F401
    except ImportError as exc:
        from importlib.metadata import PackageNotFoundError, version

        def ver(pkg: str) -> str:
            try:
                return version(pkg)
            except PackageNotFoundError:
                return "not installed"
        return (f"optimum-onnx {ver('optimum-onnx')} cannot be used with transformers {ver('transformers')} "
                f"({first_line(exc)})")
    return None


def _tasks() -> Any:
    if (why := optimum_problem()) is not None:
        raise BackendUnavailableError(f"hf: {why}; install the versions in pyproject's [hf] extra")
    # optimum_problem imported (registered) its ONNX configs
    from optimum.exporters.tasks import TasksManager

    return TasksManager


def _folder(spec: str) -> Path:
    folder = Path(spec[len(PREFIX):])
    if not (folder / "config.json").is_file():
        raise InputError(f"{spec}: {folder} is not a Hugging Face model folder (no config.json there); save one "
                         "with model.save_pretrained(folder)")
    return folder


def _config(folder: Path) -> Any:
    try:
        return _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise InputError(f"{folder}/config.json cannot be read by transformers: {first_line(exc)}") from None


def _arch_class(folder: Path, config: Any) -> Any:
    arch = (config.architectures or [None])[0]
    return getattr(_transformers(), arch, None) if arch else None


def _tasks_of_class(tasks: Any, cls: Any) -> list[str]:
    """Every task whose model loader (an Auto class) maps to ``cls``, in Optimum's task order."""
    found = []
    for task, loaders in tasks._TRANSFORMERS_TASKS_TO_MODEL_LOADERS.items():
        for loader in loaders if isinstance(loaders, tuple) else (loaders,):
            auto = getattr(_transformers(), loader, None)
            mapping = getattr(auto, "_model_mapping", None)
            try:
                classes = list(mapping.values()) if mapping is not None else []
            except Exception:  # a lazy mapping entry that cannot be imported here
                classes = []
            if any(c is cls or (isinstance(c, tuple) and cls in c) for c in classes):
                found.append(task)
    return found


def infer_task(folder: Path, task: str | None) -> str:
    """``--task`` as given (checked against what Optimum exports for this architecture), else Optimum's choice for
    the folder's ``architectures`` class: its inferred task (or, when Optimum does not export that one for this
    model type, the first exportable task whose model class is that class), with ``-with-past`` where Optimum
    exports it (as Optimum's own exporter defaults to)."""
    config = _config(folder)
    tasks = _tasks()
    try:
        supported = list(tasks.get_supported_tasks_for_model_type(config.model_type, "onnx",
                                                                  library_name="transformers"))
    except KeyError:
        raise InputError(f"Optimum has no ONNX export config for model type {config.model_type!r}") from None
    if task is None:
        cls = _arch_class(folder, config)
        if cls is None:
            raise InputError(f"{folder}: config.json names no known architecture; pass --task, one of {supported}")
        try:
            task = str(tasks._infer_task_from_model_or_model_class(model_class=cls))
        except Exception:
            task = None
        if task not in supported:
            task = next((t for t in _tasks_of_class(tasks, cls) if t in supported), task)
        if task is None:
            raise InputError(f"{folder}: Optimum cannot tell the task of {cls.__name__}; pass --task, one of "
                             f"{supported}")
        if f"{task}-with-past" in supported:
            task = f"{task}-with-past"
    else:
        task = tasks.map_from_synonym(task)
    if task not in supported:
        raise InputError(f"--task {task!r} is not exportable for {config.model_type!r}; choose one of {supported}")
    return str(task)


@dataclass
class HFModel:
    """A Hugging Face model as Optimum exports it: the loaded model, its task, the main ONNX config and the
    components (file stem -> (submodel, ONNX config)), in export order."""

    model: Any
    task: str
    onnx_config: Any
    components: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def single(self) -> bool:
        return list(self.components) == [SINGLE]


def load_hf_model(spec: str, task: str | None) -> HFModel:
    """``hf:folder`` -> the model and Optimum's components for ``task`` (inferred when None)."""
    folder = _folder(spec)
    task = infer_task(folder, task)
    tasks = _tasks()
    from optimum.exporters.onnx.utils import _get_submodels_and_onnx_configs

    try:
        # eager attention: the MatMul/Softmax pattern ONNX Runtime's transformer optimizer fuses into Attention
        # (SDPA exports as a pattern it does not match); the same numbers either way
        model = tasks.get_model_from_task(task, str(folder), framework="pt", library_name="transformers",
                                          local_files_only=True, attn_implementation="eager")
        tasks.standardize_model_attributes(model)
        main, parts = _get_submodels_and_onnx_configs(
            model=model.eval(), task=task, monolith=False, custom_onnx_configs={}, custom_architecture=False,
            _variant="default", library_name="transformers", float_dtype="fp32")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{spec}: loading it as {task!r} failed: {type(exc).__name__}: {first_line(exc)}") from None
    return HFModel(model=model, task=task, onnx_config=main, components=dict(parts))


# -- the eager module of a component ------------------------------------------------------------------------------
def _leaves(obj: Any) -> Iterator[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _leaves(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _leaves(x)


def _replace(obj: Any, values: dict[int, Any]) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return values.get(id(obj), obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace(x, values) for x in obj)
    if isinstance(obj, dict):
        return {k: _replace(v, values) for k, v in obj.items()}
    return obj


def _flat_onnx(config: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Optimum's flattening of a (nested) input or output dict into ONNX names, as its own validation does."""
    import torch

    flat: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (str, int)):
            flat.update(config.flatten_output_collection_property(name, value))
        elif isinstance(value, dict):
            flat.update(value)
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    return flat


def dummy_inputs(config: Any, onnx_inputs: list[str], batch: int, shapes: dict[str, int] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the reference model's inputs, nested as its forward() takes them; the ONNX inputs by name, holding the same
    tensors) from Optimum's dummy-input generators at ``batch`` and Optimum's ``shapes`` (e.g. sequence_length)."""
    from optimum.utils import DEFAULT_DUMMY_SHAPES

    kw = {**DEFAULT_DUMMY_SHAPES, "sequence_length": SAMPLE_SEQUENCE, **(shapes or {}), "batch_size": batch}
    ref = config.generate_dummy_inputs(framework="pt", **kw)
    onnx = _flat_onnx(config, config.generate_dummy_inputs_for_validation(dict(ref), onnx_inputs))
    return ref, {n: onnx[n] for n in onnx_inputs if n in onnx}


def dummy_feed(config: Any, onnx_inputs: list[str], batch: int, shapes: dict[str, int] | None = None
               ) -> dict[str, np.ndarray]:
    """ONNX inputs by name (NumPy) from Optimum's dummy-input generators: values the model accepts."""
    _, onnx = dummy_inputs(config, onnx_inputs, batch, shapes)
    missing = [n for n in onnx_inputs if n not in onnx]
    if missing:
        raise InputError(f"Optimum's dummy inputs for {type(config).__name__} have no {missing}")
    return {n: onnx[n].detach().cpu().numpy() for n in onnx_inputs}


def sample_inputs(spec: str, hf: HFModel) -> tuple[dict[str, np.ndarray], dict[str, dict[int, str]]]:
    """The first component's dummy inputs (Optimum's generators) and its dynamic axes in our dim names, for the
    IOSpec before export (what --input-shape binds). The channel axis is not dynamic; a dim Optimum names alike in
    two inputs but generates at two values (speech_to_text's input_features and attention_mask) gets a name of its
    own in the second: the exported graph's own names and values replace these after the export."""
    config = next(iter(hf.components.values()))[1]
    names = list(config.inputs)
    try:
        samples = dummy_feed(config, names, 2)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{spec}: Optimum cannot make dummy inputs for {hf.model.config.model_type} ({hf.task}): "
                         f"{type(exc).__name__}: {first_line(exc)} (a preprocessor config it needs missing from the "
                         "folder?)") from None
    seen: dict[str, int] = {}
    axes: dict[str, dict[int, str]] = {}
    for n, dims in {**config.inputs, **config.outputs}.items():
        axes[n] = {}
        for i, d in dims.items():
            if d == "num_channels":
                continue
            name = dim_name(d)
            if n in samples and int(i) < samples[n].ndim:
                value = int(samples[n].shape[int(i)])
                if seen.setdefault(name, value) != value:
                    name = f"{n}_{name}"
            axes[n][int(i)] = name
    return samples, axes


def component_module(submodel: Any, config: Any, onnx_inputs: list[str], onnx_outputs: list[str]) -> Any:
    """The component as a module taking the ONNX inputs positionally (in ``onnx_inputs`` order) and returning the
    ONNX outputs as a tuple in ``onnx_outputs`` order: the submodel under Optimum's model patcher (its KV-cache
    and output handling), with the ONNX names mapped back to the nested inputs forward() takes the way Optimum's
    validation flattens them. Its signature names the inputs."""
    import torch

    onnx_to_torch = {v: k for k, v in config.torch_to_onnx_output_map.items()}

    class HFComponent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = submodel
            # Optimum's dummy inputs by (batch, shapes): the nested structure each call's tensors are placed in,
            # generated once per shape, not inside every timed call
            self._templates: dict[tuple[int, tuple[tuple[str, int], ...]], tuple[dict[str, Any], dict[str, Any]]] = {}

        def forward(self, *args: Any) -> tuple[Any, ...]:
            feed = dict(zip(onnx_inputs, args, strict=True))
            batch = int(next(iter(feed.values())).shape[0]) if feed and next(iter(feed.values())).ndim else 1
            shapes = _shapes_of(feed, config, onnx_inputs)
            key = (batch, tuple(sorted(shapes.items())))
            if key not in self._templates:
                self._templates[key] = dummy_inputs(config, onnx_inputs, batch, shapes)
            ref, onnx = self._templates[key]
            by_id = {id(t): feed[n] for n, t in onnx.items()}
            kwargs = config.rename_ambiguous_inputs(copy.copy(_replace(ref, by_id)))
            with config.patch_model_for_export(self.model), torch.inference_mode():
                out = self.model(**kwargs)
            flat: dict[str, Any] = {}
            for name, value in dict(out).items():
                name = "present" if name == "past_key_values" else name
                if isinstance(value, (list, tuple)):
                    flat.update(config.flatten_output_collection_property(
                        config.torch_to_onnx_output_map.get(name, name), value))
                else:
                    flat[name] = value
            return tuple(flat[onnx_to_torch.get(n, n)] if onnx_to_torch.get(n, n) in flat else flat[n]
                         for n in onnx_outputs)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n.replace(".", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in onnx_inputs]
    HFComponent.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return HFComponent().eval()


#: The ONNX dims whose value is Optimum's ``sequence_length`` argument, by priority (a feed's dims give the shapes of
#: the reference inputs no ONNX input carries, e.g. a decoder-with-past's encoder outputs).
_SEQUENCE_DIMS = ("encoder_sequence_length", "sequence_length")


def _shapes_of(feed: dict[str, Any], config: Any, onnx_inputs: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for name, dims in config.inputs.items():
        if name in feed:
            for axis, dim in dims.items():
                if dim in _SEQUENCE_DIMS and int(axis) < feed[name].ndim:
                    found.setdefault(dim, int(feed[name].shape[int(axis)]))
    return next(({"sequence_length": found[d]} for d in _SEQUENCE_DIMS if d in found), {})


def onnx_names(path: Path) -> tuple[list[str], list[str]]:
    """The input and output names of an ONNX file, in graph order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits], [o.name for o in graph.output]


def load_component(spec: str, task: str | None, component: str, onnx_inputs: list[str], onnx_outputs: list[str],
                   state_dict_path: Path | None = None) -> Any:
    """The eager module of one exported component (bench's eager backend rebuilds it from the folder and the
    weights convert saved, ``state_dict_path``)."""
    hf = load_hf_model(spec, task)
    if state_dict_path is not None:
        import torch

        state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
        hf.model.load_state_dict(state, strict=True)
    if component not in hf.components and component == MERGED and "decoder_model" in hf.components:
        hf.components[MERGED] = merged_decoder(hf)
    if component not in hf.components:
        raise InputError(f"{hf.task} has no component {component!r}; it has {sorted(hf.components)}")
    submodel, config = hf.components[component]
    return component_module(submodel, config, onnx_inputs, onnx_outputs)


def merged_decoder(hf: HFModel) -> tuple[Any, Any]:
    """The merged decoder's submodel and config, checked and run in its no-cache branch (its IOSpec feeds
    use_cache_branch=False): the decoder's config flagged as Optimum's post-processing flags it (is_merged,
    use_cache_branch False, past in the inputs). Its cache branch is the decoder-with-past's graph."""
    submodel, config = hf.components["decoder_model"]
    config = copy.deepcopy(config)
    config.is_merged, config.use_cache_branch, config.use_past_in_inputs = True, False, True
    return submodel, config


def id2label(spec: str) -> list[str] | None:
    """The class names of a classification head (config.json's id2label), when it has real ones."""
    config = _config(_folder(spec))
    labels = [str(config.id2label[i]) for i in sorted(config.id2label)] if config.id2label else []
    return None if not labels or labels == [f"LABEL_{i}" for i in range(len(labels))] else labels


#: Hugging Face image processors' file, beside config.json (save_pretrained of an image processor writes it)
PROCESSOR_FILE = "preprocessor_config.json"


def _edge(value: Any) -> int | None:
    """A processor's size: an int, or a dict with ``shortest_edge`` or ``height`` (and ``width``, not read)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for k in ("shortest_edge", "height"):
            if isinstance(value.get(k), int):
                return int(value[k])
    return None


def image_preprocessing(spec: str) -> Preprocessing | None:
    """How the folder's image processor (``preprocessor_config.json``) prepares an image, as the resize (shorter
    side), center crop and mean/std that image calibration applies; None without a processor file or its numbers.
    A processor that resizes straight to the model's size without a crop (ViT's) becomes resize = crop = that size:
    a non-square photo is then center-cropped where the processor would squash it (the recorded source says so)."""
    import json

    from core.manifest import Preprocessing

    path = _folder(spec) / PROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{spec}: cannot read {PROCESSOR_FILE}: {first_line(exc)}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{spec}: {PROCESSOR_FILE} is not a JSON object")
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    size = _edge(cfg.get("size"))
    if not (isinstance(mean, list) and isinstance(std, list) and size):
        return None
    if cfg.get("do_normalize") is False:
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    kind = cfg.get("image_processor_type", "image processor")
    crop = _edge(cfg.get("crop_size")) if cfg.get("do_center_crop") else None
    if crop:  # resize the shorter side, then crop (CLIP, BEiT, ...)
        resize, how = size, f"resize {size}, center crop {crop}"
    elif isinstance(cfg.get("crop_pct"), (int, float)) and cfg["crop_pct"] > 0 and size < 384:  # ConvNeXt
        crop, resize = size, round(size / float(cfg["crop_pct"]))
        how = f"resize {resize} (size / crop_pct {cfg['crop_pct']}), center crop {crop}"
    else:  # resize straight to the model's size (ViT, DeiT, Swin)
        crop, resize = size, size
        how = f"resize to {size}x{size} (here: shorter side {size} and a center crop, where it squashes)"
    return Preprocessing(resize=resize, crop=crop, mean=[float(v) for v in mean], std=[float(v) for v in std],
                         source=f"{PROCESSOR_FILE} ({kind}): {how}")


# -- without Optimum: the architecture's own inputs, for torch.onnx's dynamo exporter ---------------------------------
def load_plain(spec: str, task: str | None) -> tuple[Any, str, dict[str, np.ndarray], dict[str, dict[int, str]]]:
    """(module taking the main inputs positionally and returning its first output, a task label, sample inputs,
    dynamic axes) from the folder's architecture class alone: what the dynamo exporter exports where Optimum
    cannot be used. Text models take input_ids and attention_mask, vision models pixel_values."""
    import torch

    folder = _folder(spec)
    config = _config(folder)
    cls = _arch_class(folder, config)
    if cls is None:
        raise InputError(f"{folder}: config.json names no known architecture class")
    if task is not None and task.endswith("-with-past"):
        raise InputError(f"--task {task} needs Optimum's exporter, which cannot be used here")
    model = cls.from_pretrained(str(folder), local_files_only=True).eval()
    main = getattr(model, "main_input_name", "input_ids")
    rng = np.random.default_rng(0)
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 100) or 100)
        samples = {"input_ids": rng.integers(0, vocab, (2, SAMPLE_SEQUENCE)).astype(np.int64),
                   "attention_mask": np.ones((2, SAMPLE_SEQUENCE), np.int64)}
        axes = {n: {0: "batch", 1: "sequence"} for n in samples}
    elif main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        samples = {"pixel_values": rng.standard_normal((2, int(getattr(config, "num_channels", 3)), size, size))
                   .astype(np.float32)}
        axes = {"pixel_values": {0: "batch"}}
    else:
        raise InputError(f"{cls.__name__} takes {main!r}: without Optimum's exporter only text (input_ids) and "
                         "vision (pixel_values) models are exported")
    names = list(samples)

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            out = self.model(**dict(zip(names, args, strict=True)), return_dict=True)
            return out[0]

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    Plain.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return Plain().eval(), task or cls.__name__, samples, axes
