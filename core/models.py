"""Resolve the MODEL argument into an ``nn.Module`` (or an ONNX file) plus what we know about it."""

from __future__ import annotations

import difflib
import importlib.util
import signal
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError, first_line
from core.manifest import Preprocessing, SourceInfo


@dataclass
class LoadedModel:
    """A model ready to export (``module``) or an ONNX file taken as is (``onnx_path``)."""

    source: SourceInfo
    module: Any = None  # torch.nn.Module | torch.jit.ScriptModule
    onnx_path: Path | None = None
    default_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)
    #: Sample inputs by name (NumPy, in forward() order) from a factory returning (module, example_inputs, ...)
    example_inputs: dict[str, Any] | None = None
    #: torch.onnx ``dynamic_axes`` from a factory returning (module, example_inputs, dynamic_axes)
    dynamic_axes: dict[str, dict[int, str]] | None = None
    #: A Hugging Face model Optimum exports (``core.hf.HFModel``): convert.hf_export writes its file(s)
    hf: Any = None
    #: The exporter this model must take, whatever --exporter says (None: --exporter)
    exporter: str | None = None
    #: Why the batch is fixed at the example inputs' whatever --dynamic-batch says (a torchvision detector takes
    #: a list of images); None: the batch follows --dynamic-batch
    fixed_batch: str | None = None


def torchvision_classifiers() -> list[str]:
    """The torchvision classification builders (``core.tvzoo.builders()``: every family)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    return path


def _preprocessing_from_weights(weights: Any) -> Preprocessing | None:
    try:
        t = weights.transforms()
        return Preprocessing(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=list(t.mean),
                             std=list(t.std), source=f"torchvision {weights}")
    except Exception:
        return None


def _check_onnx_readable(path: Path) -> None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path} is not a readable ONNX model (corrupt or truncated?): {first_line(exc)}") from None
    if not model.graph.input or not model.graph.output:  # an empty file parses as an empty model
        raise InputError(f"{path} is not an ONNX model: it has no graph inputs or outputs (empty or truncated?)")


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """Read a state dict (plain, or under 'state_dict'/'model', with DataParallel prefixes removed)."""
    import torch

    _check_file(path, "weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"weights file {path} is not a readable PyTorch state dict: {first_line(exc)}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise InputError(f"weights file {path} does not hold a state dict (name -> tensor)")
    out: Any = OrderedDict((k.removeprefix("module."), v) for k, v in obj.items())
    # The per-module versions torch.save keeps beside the tensors: some modules (e.g. torchvision's MNASNet)
    # refuse to load without them.
    if (meta := getattr(obj, "_metadata", None)) is not None:
        out._metadata = OrderedDict((k.removeprefix("module.") if k != "module" else "", v) for k, v in meta.items())
    return out


def apply_state_dict(module: Any, state: dict[str, Any], origin: str) -> None:
    """Load ``state`` strictly; on mismatch, say which keys and shapes disagree."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise InputError(f"weights {origin} do not match the architecture: " + ", ".join(parts))
    module.load_state_dict(state, strict=True)


def _torchvision(name: str, weights: str | None, seed: int) -> LoadedModel:
    """A torchvision builder by name, any family (core.tvzoo: its sample input, wrapper and builder arguments)."""
    import torch
    import torchvision

    from core import tvzoo

    names = tvzoo.builders()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise InputError(f"unknown model {name!r}: not a torchvision model builder, a .py:factory, "
                         f"a TorchScript .pt or an .onnx file{hint}")
    fam = tvzoo.family(name)
    enum = tvzoo.weights_enum(name)
    default_w = getattr(enum, "DEFAULT", None)
    pre = _preprocessing_for(name, default_w)
    num_classes = len(default_w.meta.get("categories") or []) or None if default_w is not None else None
    source = SourceInfo(model=name, kind="torchvision", weights=weights, num_classes=num_classes, preprocessing=pre)
    torch.manual_seed(seed)
    notes: list[str] = []
    if weights is None:
        module, inputs = tvzoo.build(name, None, seed)
        source.weights_note = f"random init (seed {seed})" + _random_init_fixes(name, module, inputs, seed) + \
            "; pass --weights to use trained weights"
    elif Path(weights).suffix in {".pt", ".pth", ".bin", ".ckpt"} or Path(weights).exists():
        module, inputs = tvzoo.build(name, None, seed)
        state = load_state_dict_file(Path(weights))
        apply_state_dict(tvzoo.state_target(module, state), state, str(weights))
        source.weights_note = f"local state dict {weights}"
    else:
        try:
            w = enum[weights] if weights in enum.__members__ else torchvision.models.get_weight(weights)
        except (KeyError, ValueError, AttributeError):
            options = [f"{name}:{m}" for m in enum.__members__] + ["a local state-dict file"]
            raise InputError(f"unknown weights {weights!r} for {name}; available: {', '.join(options)}") from None
        try:
            module, inputs = tvzoo.build(name, w, seed)
        except Exception as exc:
            raise InputError(f"could not fetch weights {w} (no internet here?): {first_line(exc)}; "
                             "download them elsewhere and pass the state-dict file with --weights PATH") from None
        source.weights = str(w)
        source.weights_note = f"torchvision weights {w}"
        source.preprocessing = _preprocessing_for(name, w) or pre
    if fam == "detection":
        source.weights_note += "; " + tvzoo.detections_note(name, module)
    if weights is None:
        notes.append(source.weights_note)
    return LoadedModel(source=source, module=module.eval(), default_shape=inputs.default_shape,
                       example_inputs=inputs.example_inputs, dynamic_axes=inputs.dynamic_axes,
                       fixed_batch=inputs.fixed_batch, notes=[*inputs.notes, *notes])


def _preprocessing_for(name: str, weights: Any) -> Preprocessing | None:
    """How images become the input: the weights' transforms (a classifier's resize and crop; a segmentation
    model's resize, which is also its input size); a detector normalises and resizes inside (0..1 images, any
    size); none for video clips and image pairs."""
    from core import tvzoo

    fam = tvzoo.family(name)
    if weights is None or fam in {"video", "optical_flow", "detection"}:
        return None
    if fam == "segmentation":
        size = tvzoo.crop_of(weights, fam)
        t = weights.transforms()
        return Preprocessing(resize=size, crop=size, mean=list(t.mean), std=list(t.std),
                             source=f"torchvision {weights}") if size else None
    return _preprocessing_from_weights(weights)


def _random_init_fixes(name: str, module: Any, inputs: Any, seed: int) -> str:
    """What a random init needed so that the model's outputs depend on its input (each in the weights note):
    a zero-initialised head, a constant output, a detector's tied scores."""
    from core import tvzoo

    norms = "".join(f"; {n}" for n in [tvzoo.calibrate_norms(name, module, inputs, seed)] if n)
    if tvzoo.family(name) == "detection":
        return norms + "; " + tvzoo.spread_scores(name, module, inputs.example_inputs["images"])
    if inputs.default_shape is None:  # RAFT: its flow varies with the images at its own init
        return norms
    redone = reinit_zero_head(module, seed)
    reset = reinit_if_constant(module, seed, (2, *inputs.default_shape[1:]))
    return norms + (f"; zero-initialised head {_head_name(redone)} re-initialised (seeded)" if redone else "") + \
        (f"; {reset}" if reset else "")


def reinit_zero_head(module: Any, seed: int) -> list[str]:
    """Give the final output layer's all-zero parameters a seeded init, when its weight is all zero; the names of
    the parameters re-initialised (none when the weight is not all zero).

    torchvision zero-initialises some heads (the ViT family's ``heads.head``, weight and bias): trained weights
    replace them, but at random init such a model outputs 0 for every input, so parity and every accuracy check
    would compare zeros with zeros. The final layer is the last module holding parameters of its own (in
    registration order); its zero parameters get ``nn.Linear``'s default scale, uniform in +-1/sqrt(fan_in),
    drawn from a generator seeded with ``seed`` (the same model for the same seed, whatever ran before)."""
    import math

    import torch

    leaves = [(n, m) for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not leaves:
        return []
    name, head = leaves[-1]
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2 or bool(torch.any(weight)):
        return []
    bound = 1.0 / math.sqrt(max(1, weight[0].numel()))
    gen = torch.Generator().manual_seed(seed)
    redone = []
    with torch.no_grad():
        for pname, p in head.named_parameters(recurse=False):
            if p.numel() and not bool(torch.any(p)):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * (2 * bound) - bound)
                redone.append(f"{name}.{pname}" if name else pname)
    return redone


def reinit_if_constant(module: Any, seed: int, shape: tuple[int, ...]) -> str | None:
    """Random-init weights whose output does not depend on the input get PyTorch's default layer init (seeded): a
    note saying so, or None when the output varies. torchvision's googlenet draws its weights from a normal of std
    0.01, which shrinks the features about 10x per block (1e-11 before its classifier), so every input gives the fc
    bias exactly and every check of the model would compare a constant with a constant. ``shape``: two inputs."""
    import torch

    from core.metrics import constant_reference

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def constant() -> bool:
        with torch.no_grad():
            outs = [o for o in output_list(module.eval()(x)) if isinstance(o, torch.Tensor)]
        return bool(outs) and all(constant_reference(o.float().numpy(), shape[0]) is not None for o in outs)

    try:
        if not constant():
            return None
    except Exception:  # not at this shape (vit_h_14 at random init takes 224, its weights' crop is 518):
        return None  # the export at the user's --input-shape says what is wrong, in its own words
    torch.manual_seed(seed)
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    for m in layers:
        m.reset_parameters()
    if constant():
        return "its random-init output is the same for every input, also with PyTorch's default layer init"
    return (f"random-init output was the same for every input: its {len(layers)} Conv2d/Linear layers re-initialised "
            "with PyTorch's default init (seeded)")


def _head_name(params: list[str]) -> str:
    """``['heads.head.weight', 'heads.head.bias']`` -> 'heads.head'."""
    return ", ".join(dict.fromkeys(p.rpartition(".")[0] or p for p in params))


def factory_parts(spec: str) -> tuple[str, str] | None:
    """``path/to/file.py:build`` -> ("path/to/file.py", "build"); None when ``spec`` is not a factory."""
    file_part, sep, attr = spec.rpartition(":")
    return (file_part, attr) if sep and file_part.endswith(".py") else None


def _factory(spec: str, weights: str | None, seed: int) -> LoadedModel:
    import torch

    parts = factory_parts(spec)
    if parts is None:
        raise InputError(f"{spec!r} is not path/to/file.py:factory")
    file_part, attr = parts
    path = _check_file(Path(file_part), "model file")
    mod_name = f"_onnxkit_user_{abs(hash(path.resolve()))}"
    try:
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        if mspec is None or mspec.loader is None:
            raise InputError(f"{path} cannot be imported as a Python module")
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = mod
        mspec.loader.exec_module(mod)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            raise
        raise InputError(f"importing {path} called sys.exit({exc.code!r}): a model file must define the factory, "
                         "not run a script") from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        found = [n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")]
        raise InputError(f"{path} has no callable {attr!r}; callables there: {found[:10]}")
    torch.manual_seed(seed)
    try:
        result = factory()
    except Exception as exc:
        raise InputError(f"{spec}() raised {type(exc).__name__}: {exc}") from None
    except SystemExit as exc:  # not SIGTERM's (core.transaction): the factory itself exited, with nothing to export
        if exc.code == 128 + signal.SIGTERM:
            raise
        raise InputError(f"{spec}() called sys.exit({exc.code!r}) instead of returning the model") from None
    module, examples, axes = _factory_result(spec, result)
    source = SourceInfo(model=spec, kind="factory", weights=weights)
    if weights:
        apply_state_dict(module, load_state_dict_file(Path(weights)), weights)
        source.weights_note = f"local state dict {weights}"
    else:
        source.weights_note = f"as returned by the factory (seed {seed})"
    shape = getattr(mod, "INPUT_SHAPE", None)
    return LoadedModel(source=source, module=module.eval(), default_shape=tuple(shape) if shape else None,
                       example_inputs=examples, dynamic_axes=axes)


def _factory_result(spec: str, result: Any) -> tuple[Any, dict[str, Any] | None, dict[str, dict[int, str]] | None]:
    """``module``, ``(module, example_inputs)`` or ``(module, example_inputs, dynamic_axes)`` -> the three parts;
    example inputs become NumPy arrays by name (a tuple is named after forward()'s parameters)."""
    import torch

    parts = result if isinstance(result, tuple) else (result,)
    module = parts[0] if parts else None
    if not isinstance(module, torch.nn.Module) or len(parts) > 3:
        raise InputError(f"{spec}() returned {_describe(result)}, not a torch.nn.Module, (module, example_inputs) "
                         "or (module, example_inputs, dynamic_axes)")
    if len(parts) == 1:
        return module, None, None
    examples = _named_examples(spec, module, parts[1])
    axes = _axes(spec, parts[2], list(examples)) if len(parts) == 3 and parts[2] is not None else None
    return module, examples, axes


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(type(v).__name__ for v in value) + ")"
    return type(value).__name__


def _named_examples(spec: str, module: Any, examples: Any) -> dict[str, Any]:
    import inspect

    import torch

    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    if isinstance(examples, (tuple, list)):
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) < len(examples):
            raise InputError(f"{spec}(): {len(examples)} example inputs but forward() takes {params}")
        examples = dict(zip(params, examples, strict=False))
    if not isinstance(examples, dict) or not examples or \
            not all(isinstance(v, torch.Tensor) for v in examples.values()):
        raise InputError(f"{spec}(): example_inputs must be a dict name -> tensor or a tuple of tensors, got "
                         f"{_describe(examples)}")
    return {str(k): v.detach().cpu().numpy() for k, v in examples.items()}


def _axes(spec: str, axes: Any, inputs: list[str]) -> dict[str, dict[int, str]]:
    """torch.onnx's dynamic_axes (name -> {axis: dim name} or [axes]) with every dim named; axis 0 is the batch."""
    if not isinstance(axes, dict):
        raise InputError(f"{spec}(): dynamic_axes must be a dict (torch.onnx's form), got {_describe(axes)}")
    out: dict[str, dict[int, str]] = {}
    for name, dims in axes.items():
        if isinstance(dims, (list, tuple)):
            dims = {int(i): ("batch" if int(i) == 0 else f"{name}_dim{i}") for i in dims}
        if not isinstance(dims, dict):
            raise InputError(f"{spec}(): dynamic_axes[{name!r}] must be a dict or a list of axes")
        out[str(name)] = {int(i): str(d) for i, d in dims.items()}
    return out


def _torchscript(path: Path, weights: str | None) -> LoadedModel:
    import torch

    _check_file(path, "TorchScript file")
    if weights:
        raise InputError("--weights cannot be combined with a TorchScript file: its weights are inside it")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise InputError(f"{path} is not a loadable TorchScript file ({first_line(exc)}); for a state dict use "
                         "MODEL=<torchvision name> --weights FILE") from None
    source = SourceInfo(model=str(path), kind="torchscript", weights_note="weights inside the TorchScript file")
    return LoadedModel(source=source, module=module.eval())


def _hf(spec: str, weights: str | None, task: str | None, seed: int) -> LoadedModel:
    """Optimum's export of the folder's model (its components, patchers and dummy inputs); where optimum-onnx cannot
    be used with the installed transformers, torch.onnx's dynamo exporter on the architecture's own inputs."""
    import torch

    from core import hf

    if weights:
        raise InputError("--weights cannot be combined with an hf: model: its weights are in the folder")
    torch.manual_seed(seed)
    pre = hf.image_preprocessing(spec)  # its image processor's, for image calibration
    if (why := hf.optimum_problem()) is not None:
        module, task, samples, axes = hf.load_plain(spec, task)
        source = SourceInfo(model=spec, kind="hf", task=task, weights_note="weights in the Hugging Face folder",
                            preprocessing=pre)
        return LoadedModel(source=source, module=module, example_inputs=samples, dynamic_axes=axes, exporter="dynamo",
                           notes=[f"{why}: exporting with torch.onnx's dynamo exporter from the architecture's own "
                                  "inputs instead (no *-with-past tasks, no multi-file exports)"])
    model = hf.load_hf_model(spec, task)
    samples, axes = hf.sample_inputs(spec, model)
    source = SourceInfo(model=spec, kind="hf", task=model.task, weights_note="weights in the Hugging Face folder",
                        preprocessing=pre)
    parts = ", ".join(model.components)
    return LoadedModel(source=source, example_inputs=samples, dynamic_axes=axes, hf=model,
                       notes=[f"Hugging Face {model.task} model, exported by Optimum's exporter "
                              f"({'one file' if model.single else 'components ' + parts})"])


def resolve_model(spec: str, weights: str | None = None, seed: int = 0, task: str | None = None) -> LoadedModel:
    """MODEL -> LoadedModel. Every failure is an ``InputError`` with one clear line. ``task``: a Hugging Face
    model's task (``hf:`` models only; inferred from the folder when None)."""
    from core.hf import is_hf

    spec = spec.strip()
    if not spec:
        raise InputError("MODEL is empty")
    if is_hf(spec):
        return _hf(spec, weights, task, seed)
    if task is not None:
        raise InputError("--task is for Hugging Face models (MODEL = hf:path/to/folder)")
    if spec.lower().endswith(".onnx"):
        path = _check_file(Path(spec), "ONNX file")
        _check_onnx_readable(path)
        if weights:
            raise InputError("--weights cannot be combined with an .onnx model: its weights are inside it")
        return LoadedModel(source=SourceInfo(model=spec, kind="onnx", weights_note="weights inside the ONNX file"),
                           onnx_path=path)
    if spec.lower().endswith((".pt", ".pth", ".ts", ".jit")):
        return _torchscript(Path(spec), weights)
    if factory_parts(spec) is not None:
        return _factory(spec, weights, seed)
    return _torchvision(spec, weights, seed)


def is_random_init(source: SourceInfo) -> bool:
    """Whether the weights are known to be random: a torchvision model converted without --weights."""
    return source.kind == "torchvision" and source.weights is None


def categories_for(source: SourceInfo) -> list[str] | None:
    """The class names of a torchvision classifier (image or video, from its weights' metadata; no download), or of a Hugging
    Face classification head (its config's id2label)."""
    if source.kind == "hf":
        from core.hf import id2label

        return id2label(source.model)
    if source.kind != "torchvision":
        return None
    from core import tvzoo

    # the labels of an image folder are the classes of one image: not what a detector's, a segmentation model's
    # or RAFT's outputs are indexed by
    if source.model not in tvzoo.builders() or \
            tvzoo.family(source.model) not in {"classification", "quantization", "video"}:
        return None
    try:
        default = tvzoo.weights_enum(source.model).DEFAULT
    except (ValueError, AttributeError):
        return None
    cats = default.meta.get("categories")
    return list(cats) if cats else None


def rebuild_module(source: SourceInfo, state_dict_path: Path | None, seed: int = 0,
                   component: tuple[str, list[str], list[str]] | None = None) -> Any:
    """Rebuild the PyTorch module an artifact folder was exported from (for the eager/TorchScript runners).
    ``component``: a Hugging Face model's component (file stem, ONNX input names, ONNX output names)."""
    if source.kind == "hf" and component is not None:
        from core.hf import load_component

        return load_component(source.model, source.task, *component, state_dict_path)
    if source.kind == "onnx":
        raise InputError("this artifact folder was made from an .onnx file: there is no PyTorch model to run")
    if source.kind == "torchvision" and state_dict_path is not None:  # built with its weights: no random init, so
        return resolve_model(source.model, str(state_dict_path), seed).module  # none of its checks (a forward pass)
    loaded = resolve_model(source.model, None, seed, task=source.task)
    if state_dict_path is not None and source.kind != "torchscript":
        apply_state_dict(loaded.module, load_state_dict_file(state_dict_path), str(state_dict_path))
    return loaded.module


def output_list(out: Any) -> list[Any]:
    """A ``forward()`` result as its list of outputs: one tensor, a tuple/list of them, or a dict of them (in the
    dict's order, which is also the order of the ONNX outputs, named by the keys)."""
    if isinstance(out, Mapping):
        return list(out.values())
    return list(out) if isinstance(out, (tuple, list)) else [out]
