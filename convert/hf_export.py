"""Hugging Face models exported by Optimum's own ONNX exporter (its model patchers, its ``*-with-past`` tasks and
its multi-file exports), then validated by the toolkit against the same submodels in eager PyTorch.

A task Optimum exports as one file (``model.onnx``, a decoder with its KV cache included) is the ``fp32`` artifact
as for every other model: optimized, fused, quantized and benchmarked as today. A task Optimum exports as several
files (an encoder, a decoder, a decoder with past and their merged decoder) is one ``fp32`` artifact whose manifest
names each component with its file, hash, IOSpec and parity; each component is validated against its own submodel.

Dim names are ours (``batch``, ``sequence``, ``past_sequence + sequence``); the channel axis Optimum marks dynamic is
fixed to the model's channel count (a 3-channel model does not take 4), and parity's second value of each dim is
what Optimum's dummy-input generators give at a longer sequence: a dim they never vary (a ViT's image size) is not
varied.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convert.config import ConvertConfig
from convert.context import ConvertContext, parity_batches
from convert.export import ExportError, complete_output_spec
from convert.validate import Tolerance, torch_reference, validate_onnx
from core.errors import InputError, ToolkitError, first_line
from core.hf import (
    MERGED,
    SECOND_SEQUENCE,
    SINGLE,
    HFModel,
    component_module,
    dim_name,
    dummy_feed,
    merged_decoder,
    onnx_names,
)
from core.iospec import BATCH, IOSpec, is_derived, spec_from_onnx
from core.manifest import Component
from core.quiet import quiet_loggers
from core.records import ExportParams

EXPORTER = "optimum"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optimum's and torch.onnx's warnings and prints (TracerWarnings, 'accelerate' hints) stay out of our log."""
    with quiet_loggers("optimum", "transformers", "torch.onnx"), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export(hf: HFModel, folder: Path, opset: int) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """Optimum's export of every component into ``folder`` and its post-processing (the merged decoder); the
    components as validated (file stem -> (submodel, ONNX config)) and the files written, by stem."""
    from optimum.exporters.onnx.convert import export_models
    from optimum.utils import DEFAULT_DUMMY_SHAPES

    parts = hf.components
    names = [f"{k}.onnx" for k in parts]
    before = {k: (m, copy.deepcopy(c)) for k, (m, c) in parts.items()}  # post-processing re-flags the decoders
    hf_before = HFModel(model=hf.model, task=hf.task, onnx_config=hf.onnx_config, components=before)
    try:
        with _quiet():
            export_models(models_and_onnx_configs=parts, output_dir=folder, opset=opset, output_names=names,
                          device="cpu", input_shapes=dict(DEFAULT_DUMMY_SHAPES), dtype="fp32")
            hf.onnx_config.post_process_exported_models(folder, parts, names)
    except ToolkitError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export (Optimum's exporter, opset {opset}) failed: {type(exc).__name__}: "
                          f"{first_line(exc)}") from exc
    components = dict(before)
    if (folder / f"{MERGED}.onnx").is_file():  # checked in its no-cache branch (what bench's eager runs too)
        components[MERGED] = merged_decoder(hf_before)
    files = [k for k in components if (folder / f"{k}.onnx").is_file()]
    return {k: components[k] for k in files}, files


def _rename_dims(path: Path, channels: int | None) -> Any:
    """The exported graph with our dim names, and its channel axis fixed to ``channels`` (Optimum marks it
    dynamic; the model takes only its own count)."""
    import onnx

    model = onnx.load(str(path))
    for v in [*model.graph.input, *model.graph.output]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                if d.dim_param == "num_channels" and channels:
                    d.dim_value = channels
                else:
                    d.dim_param = dim_name(d.dim_param)
    return model


def _spec(model: Any, config: Any, onnx_inputs: list[str], dims: dict[str, int]) -> IOSpec:
    """The component's IOSpec from its graph (inputs in graph order), the dims bound to Optimum's dummy inputs'
    values, each with its second parity value from Optimum's dummy inputs at a longer sequence (a dim those do not
    vary keeps its value: it is not varied); a merged decoder's use_cache_branch is fed False (the branch whose every
    output its reference computes)."""
    spec = complete_output_spec(spec_from_onnx(model), model)
    base = _dims_of(spec, dummy_feed(config, onnx_inputs, 2))
    second = _dims_of(spec, dummy_feed(config, onnx_inputs, 2, {"sequence_length": SECOND_SEQUENCE}))
    inputs = [t.model_copy(update={"fill": "zeros"}) if t.name == "use_cache_branch" else t for t in spec.inputs]
    spec = spec.model_copy(update={"inputs": inputs})
    spec = spec.with_dims({**base, **{d: v for d, v in dims.items() if d in base}})
    return spec.model_copy(update={"parity_values": {d: second.get(d, v) for d, v in spec.dims.items()}})


def _dims_of(spec: IOSpec, feed: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in spec.inputs:
        if t.name not in feed:
            continue
        for d, n in zip(t.shape, feed[t.name].shape, strict=False):
            if isinstance(d, str) and d != BATCH and not is_derived(d):
                out.setdefault(d, int(n))
    return out


def _channels(hf: HFModel) -> int | None:
    value = getattr(hf.model.config, "num_channels", None)
    return int(value) if isinstance(value, int) else None


def step_export_hf(ctx: ConvertContext) -> None:
    """model.onnx (or one file per component) by Optimum's exporter, + weights.pt; each file validated against its
    eager submodel. A single file is the ``fp32`` artifact; several are the ``fp32`` artifact's components."""
    import onnx

    from core import onnxfile

    hf = ctx.loaded.hf
    assert hf is not None  # the pipeline calls this step for hf: models only
    e = ctx.cfg.export
    if not e.dynamic_batch:
        raise InputError("--no-dynamic-batch: Optimum's exporter keeps the batch dynamic in every file (its dynamic "
                         "axes); bind the batch at run time instead (bench --batch-sizes)")
    opset = max(e.opset, int(getattr(hf.onnx_config, "DEFAULT_ONNX_OPSET", e.opset)))
    if opset != e.opset:
        ctx.log(f"opset {e.opset} raised to {opset}: Optimum's minimum for {hf.model.config.model_type}")
    ctx.log(f"exporting to ONNX with Optimum's exporter ({hf.task}, opset {opset}): "
            + ", ".join(f"{k}.onnx" for k in hf.components))
    with tempfile.TemporaryDirectory(dir=ctx.out, prefix=".hf-export-") as d:
        parts, files = _export(hf, Path(d), opset)
        specs: dict[str, IOSpec] = {}
        for stem in files:
            model = _rename_dims(Path(d) / f"{stem}.onnx", _channels(hf))
            target = ctx.path("model.onnx" if hf.single else f"{stem}.onnx")
            onnxfile.save_onnx(model, target)
            ins, _ = onnx_names(target)
            specs[stem] = _spec(onnx.load(str(target), load_external_data=False), parts[stem][1], ins,
                                ctx.spec.dims)
    ctx.manifest.opset, ctx.manifest.exporter = opset, EXPORTER
    params = ExportParams(exporter=EXPORTER, opset=opset, dynamic_batch=e.dynamic_batch)
    first = files[0]
    ctx.manifest.iospec = specs[SINGLE] if hf.single else specs[first]
    modules = {stem: component_module(parts[stem][0], parts[stem][1], specs[stem].input_names,
                                      specs[stem].output_names) for stem in files}
    ctx.loaded.module = modules[first]
    ctx.reference = torch_reference(modules[first], ctx.spec)
    if hf.single:
        ctx.manifest.record(ctx.out, ctx.path("model.onnx"), name="fp32", kind="onnx", params=params)
    else:
        art = ctx.manifest.record(ctx.out, ctx.path(f"{first}.onnx"), name="fp32", kind="onnx", params=params)
        art.components = {stem: Component(file=ctx.manifest.file_record(ctx.out, ctx.path(f"{stem}.onnx")),
                                          iospec=specs[stem]) for stem in files}
        art.notes.append(f"{len(files)} components: {', '.join(files)} (Optimum's files); the artifact's file is "
                         f"the first")
        ctx.component_references = {stem: torch_reference(modules[stem], specs[stem]) for stem in files}
        _validate_components(ctx, "fp32")
    _save_weights(ctx, hf)


def _validate_components(ctx: ConvertContext, name: str) -> None:
    """Each component of artifact ``name``: checker, shape inference and parity with its own submodel (a failure
    raises one ValidationError naming the file)."""
    art = ctx.manifest.artifacts[name]
    for stem, comp in art.components.items():
        ctx.log(f"validating {comp.file.path}: checker, shape inference, parity at batch {parity_batches(ctx)}")
        comp.metrics.update(validate_onnx(ctx.out / comp.file.path, comp.iospec, ctx.component_references[stem],
                                          batches=parity_batches(ctx), tol=Tolerance.fp32(), what=comp.file.path))
    art.metrics.checker = "ok"
    art.metrics.shape_inference = "ok"
    art.metrics.summary = f"{len(art.components)} components, each validated against its submodel"


def optimize_components(ctx: ConvertContext) -> None:
    """``opt`` of a multi-file model: each component optimized as a single file is (onnxslim + ONNX Runtime basic
    offline optimizations) and validated against its submodel; one ``opt`` artifact with the same components."""
    from convert.optimize import optimize_onnx
    from core.records import OptimizeParams

    fp32 = ctx.manifest.artifacts["fp32"]
    ctx.log("optimizing each component (onnxslim + ONNX Runtime basic offline optimizations)")
    made: dict[str, Component] = {}
    infos = []
    for stem, comp in fp32.components.items():
        target = ctx.path(f"{stem}.opt.onnx")
        infos.append(optimize_onnx(ctx.out / comp.file.path, target))
        made[stem] = Component(file=ctx.manifest.file_record(ctx.out, target), iospec=comp.iospec)
    first = next(iter(made.values()))
    info = infos[0].model_copy(update={"nodes_before": sum(i.nodes_before for i in infos),
                                       "nodes_after_slim": sum(i.nodes_after_slim for i in infos),
                                       "nodes_after": sum(i.nodes_after for i in infos)})  # over the components
    art = ctx.manifest.record(ctx.out, ctx.out / first.file.path, name="opt", kind="onnx", parent="fp32",
                              params=OptimizeParams(**info.model_dump()))
    art.components = made
    _validate_components(ctx, "opt")


def _save_weights(ctx: ConvertContext, hf: HFModel) -> None:
    """weights.pt: the model's state dict (bench's eager backend rebuilds each component from the folder and
    these weights)."""
    import torch

    from core.fsutil import atomic_path
    from core.records import WeightsParams

    pt = ctx.path("weights.pt")
    with atomic_path(pt) as tmp:
        torch.save(hf.model.state_dict(), str(tmp))
    ctx.manifest.record(ctx.out, pt, name="torch", kind="state_dict",
                        params=WeightsParams(weights=ctx.loaded.source.weights_note))


def components_only(cfg: ConvertConfig, hf: HFModel, log: Any) -> ConvertConfig:
    """A model Optimum exports as several files gets its components exported, validated, optimized, converted to FP16
    and dynamically quantized, each on its own (:mod:`convert.component_variants`). What needs one input set for the
    whole model (static INT8's calibration, held-out or node names from the user) or a PyTorch module per variant
    (sparsity, distillation) or an engine is refused before the export, in one line naming the flag."""
    q = cfg.quant
    asked = [flag for flag, on in (
        ("--int8 (static INT8)", q is not None and q.int8_static),
        ("--calib", q is not None and bool(q.calib.data)),
        ("--eval-data", q is not None and bool(q.gate.eval_data)),
        ("--exclude-nodes", q is not None and bool(q.exclude_nodes)),
        ("--sparsity/--prune", cfg.sparsity.enabled), ("--distill-into", cfg.distill is not None),
        ("--trt", cfg.engine is not None)) if on]
    parts = ", ".join(hf.components)
    if asked:
        from convert.variants import per_component_flags  # the table's rows that say how, per component

        raise InputError(f"{asked[0]}: {hf.task} exports as several files ({parts}), which take each other's outputs; "
                         f"a multi-file model gets {per_component_flags()} per component (graded on inputs made for "
                         "each file), not this: drop it, or pick a task Optimum exports as one file (e.g. without "
                         "-with-past)")
    return cfg
