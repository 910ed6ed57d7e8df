"""What the model's inputs look like, decided once before the export: the IOSpec and the export's sample
inputs, from (first that applies) ``--sample-inputs``, a factory's example inputs, the ONNX file's own
inputs, or ``--input-shape`` / the model's default image shape; then ``--input-shape`` binds the symbolic
dims. An unbound dim, an unknown input, a rank or dtype mismatch: one clear line each.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convert.config import ExportConfig
from core.errors import InputError, first_line
from core.iospec import IOSpec, spec_from_examples, spec_from_onnx
from core.models import LoadedModel, output_list
from core.resources import check_feed_memory
from core.shapes import bind_shapes


def load_sample_inputs(path: str) -> dict[str, np.ndarray]:
    """``--sample-inputs``: a .npz with one array per input name."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--sample-inputs {path} does not exist or is not a file")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:
        raise InputError(f"--sample-inputs {path} is not a readable .npz (one array per input name): "
                         f"{first_line(exc)}") from None
    if not arrays:
        raise InputError(f"--sample-inputs {path} holds no arrays")
    for name, arr in arrays.items():
        if arr.size == 0:
            raise InputError(f"--sample-inputs {path}: {name!r} holds no sample (shape {list(arr.shape)}); give at "
                             "least one, with the batch as the first dim")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise InputError(f"--sample-inputs {path}: {name!r} holds NaN or infinite values; the export traces and "
                             "the parity check runs on these samples, so give finite ones")
    return arrays


def _shapes(cfg: ExportConfig) -> dict[str | None, tuple[int, ...]]:
    if cfg.input_shape is None:
        return {}
    if isinstance(cfg.input_shape, dict):
        return {str(k): tuple(v) for k, v in cfg.input_shape.items()}
    return {None: tuple(cfg.input_shape)}


def _output_names(loaded: LoadedModel, examples: dict[str, np.ndarray]) -> list[str]:
    """Outputs named in the factory's dynamic_axes, else ``output`` / ``output_<i>`` by count (one run)."""
    named = [n for n in (loaded.dynamic_axes or {}) if n not in examples]
    if named:
        return named
    import torch

    try:
        with torch.inference_mode():
            out = loaded.module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in examples.values()])
    except Exception as exc:
        raise InputError(f"{loaded.source.model}: forward() failed on the example inputs "
                         f"({', '.join(f'{n} {list(a.shape)} {a.dtype}' for n, a in examples.items())}): "
                         f"{first_line(exc, with_type=True)}") from None
    if isinstance(out, Mapping):  # outputs named by key, in the dict's order
        return [str(k) for k in out]
    count = len(output_list(out))
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def input_spec(cfg: ExportConfig, loaded: LoadedModel) -> tuple[IOSpec, dict[str, np.ndarray] | None]:
    """(IOSpec with its dims bound, sample inputs or None): the values the export traces (a torch source) and the
    first parity point runs on (see ``convert.validate.validate_onnx``). A dim the samples give another value than
    ``--input-shape`` binds is checked at both: the samples' value is its ``parity_values`` entry."""
    samples = load_sample_inputs(cfg.sample_inputs) if cfg.sample_inputs else None
    shapes = _shapes(cfg)
    if loaded.onnx_path is not None:
        import onnx

        spec = spec_from_onnx(onnx.load(str(loaded.onnx_path), load_external_data=False))
        if samples is not None:
            spec.check_feed(samples)  # names, ranks, fixed dims, int vs float
            shapes = {**{n: a.shape for n, a in samples.items()}, **shapes}
        examples = samples
    else:
        examples = samples if samples is not None else loaded.example_inputs
        if samples is not None and loaded.example_inputs is None:
            _check_image_samples(cfg, loaded, samples)
        if examples is not None:
            if samples is not None and loaded.example_inputs is not None:
                _example_spec(cfg, loaded, loaded.example_inputs).check_feed(samples)
            spec = _example_spec(cfg, loaded, examples)
        else:
            spec = _image_spec(cfg, loaded, shapes)
            shapes = {}
    if shapes:
        _, dims = bind_shapes(spec, shapes)
        spec = spec.with_dims(dims)
    if samples is not None:
        _, given = bind_shapes(spec, {n: a.shape for n, a in samples.items() if n in spec.input_names})
        other = {d: v for d, v in given.items() if d in spec.dims and spec.dims[d] != v}
        spec = spec.model_copy(update={"parity_values": {**spec.parity_values, **other}})
    spec.input_shapes(spec.fixed_batch() or 1)  # an unbound dim: one line naming it and the flag
    check_feed_memory(spec, 2 if spec.dynamic_batch else (spec.fixed_batch() or 1),
                      "--input-shape" if cfg.input_shape is not None else "the export's sample inputs")
    return spec, examples


def _check_image_samples(cfg: ExportConfig, loaded: LoadedModel, samples: dict[str, np.ndarray]) -> None:
    """A model without example inputs takes one float image, named ``input`` (or as forward() names it): integer
    or boolean samples cannot be its input, and a name that is neither would silently rename the input."""
    names = {"input", *_forward_params(loaded.module)}
    if len(samples) == 1 and (key := next(iter(samples))) not in names:
        raise InputError(f"--sample-inputs {cfg.sample_inputs}: no input named {key!r}; {cfg.model} takes one image "
                         f"input: name its array {' or '.join(repr(n) for n in sorted(names))}")
    wrong = {n: a.dtype for n, a in samples.items() if a.dtype.kind != "f"}
    if wrong:
        name, dtype = next(iter(wrong.items()))
        raise InputError(f"--sample-inputs {cfg.sample_inputs}: {name!r} is {dtype} but {cfg.model} takes a float "
                         "image (float32); save float arrays, or make the factory return example inputs of other dtypes")


def _forward_params(module: Any) -> list[str]:
    """forward()'s positional parameter names (none when its signature cannot be read: TorchScript, C++)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _example_spec(cfg: ExportConfig, loaded: LoadedModel, examples: dict[str, np.ndarray]) -> IOSpec:
    return spec_from_examples(examples, loaded.dynamic_axes, _output_names(loaded, examples),
                              dynamic_batch=cfg.dynamic_batch and loaded.fixed_batch is None)


def _image_spec(cfg: ExportConfig, loaded: LoadedModel, shapes: dict[str | None, tuple[int, ...]]) -> IOSpec:
    if any(k is not None for k in shapes):
        raise InputError(f"{cfg.model} takes one image input: give --input-shape as 1x3x224x224, without a name "
                         "(or make the factory return example inputs to name them)")
    given, default = shapes.get(None), loaded.default_shape
    if given is not None and default is not None and len(given) != len(default):  # before the export fails on it
        raise InputError(f"--input-shape {'x'.join(map(str, given))} has rank {len(given)} but {cfg.model} takes a "
                         f"rank-{len(default)} input, e.g. {'x'.join(map(str, default))}")
    shape = given or default
    if shape is None:
        raise InputError(f"{cfg.model}: the input shape is unknown; pass --input-shape, e.g. 1x3x224x224")
    return IOSpec.for_image_model(shape, dynamic_batch=cfg.dynamic_batch)


def export_args(spec: IOSpec, examples: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The export's sample inputs by name: the given examples (repeated to batch 2 when the batch is dynamic,
    so that no exporter specialises on a batch of 1), else seeded random ones."""
    batch = 2 if spec.dynamic_batch else (spec.fixed_batch() or 1)
    if examples is None:
        return dict(spec.random_feed(batch, seed=0))
    out: dict[str, Any] = {}
    for t in spec.inputs:
        arr = np.asarray(examples[t.name]).astype(t.dtype, copy=False)
        if spec.dynamic_batch and arr.shape[0] < batch:
            arr = np.concatenate([arr] * -(-batch // arr.shape[0]))[:batch]
        out[t.name] = np.ascontiguousarray(arr)
    return out
