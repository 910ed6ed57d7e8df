"""The convert pipeline: a list of plain step functions over one ``ConvertContext``.

resolve -> export (model.onnx) + PyTorch weights -> validate -> optimize (model.opt.onnx) -> validate
-> optional variant steps (FP16, INT8, sparsity, TensorRT) added by their modules.
Every file is written atomically and recorded in ``manifest.json`` with its hash.

A run is transactional: the steps write into a staging folder beside the output folder, the manifest is
written last, and the staged set replaces the folder's artifacts only when every step has succeeded. A
failure, SIGINT or SIGTERM leaves the folder byte-identical (a new folder is not created at all). What the
folder holds besides the old manifest's artifacts (``bench/``, ``profile/``, calibration and timing caches,
the user's own files) is kept; the old artifacts the new manifest does not list are removed with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from convert.config import ConvertConfig
from convert.context import ConvertContext, Step, attempt_variant, parity_batches
from convert.engine import preflight, step_engine, with_source_variants
from convert.export import complete_output_spec, export_onnx
from convert.fusion import step_fuse
from convert.gates import check_gates
from convert.hf_export import components_only, optimize_components, step_export_hf
from convert.inputs import export_args, input_spec
from convert.optimize import optimize_onnx
from convert.recover import check_distill_inputs, check_recover_inputs, step_distill, step_recover
from convert.sparsity import check_sparsity_inputs, step_sparsity
from convert.validate import Tolerance, ort_reference, parity_spec, torch_reference, validate_onnx
from convert.variants import check_quant_inputs, run_quant
from core.errors import ToolkitError, ValidationError, first_line
from core.fsutil import atomic_path
from core.iospec import onnx_opset
from core.manifest import MANIFEST_NAME, Manifest, Precision
from core.models import factory_parts, resolve_model
from core.onnxfile import copy_onnx
from core.records import (
    CopyParams,
    DistillParams,
    EngineParams,
    ExportParams,
    OptimizeParams,
    PruneParams,
    Record,
    SparsityParams,
    WeightsParams,
)
from core.transaction import staged_folder


def default_out(model: str) -> Path:
    parts = factory_parts(model)
    stem = parts[1] if parts else Path(model.removeprefix("hf:")).stem
    return Path("artifacts") / (stem or "model")


def _copy_onnx(ctx: ConvertContext, onnx_path: Path) -> None:
    """An ONNX input: copied as is (with its external data) once ONNX Runtime has loaded the input itself;
    its own IOSpec and opset; ONNX Runtime on it is the parity reference."""
    import onnx

    ctx.reference = ort_reference(onnx_path)  # a model ONNX Runtime refuses is never copied
    target = ctx.path("model.onnx")
    copy_onnx(onnx_path, target)
    model = onnx.load(str(target), load_external_data=False)  # its IOSpec (dims bound) is ctx.spec already
    ctx.manifest.opset = onnx_opset(model)
    ctx.manifest.exporter = "none (ONNX input)"
    ctx.log("ONNX input taken as is; parity reference is ONNX Runtime on the input file")
    ctx.manifest.record(ctx.out, target, name="fp32", kind="onnx", params=CopyParams(copied_from=str(onnx_path)))


def _save_torch(ctx: ConvertContext) -> None:
    """The PyTorch runners (eager, TorchScript) rebuild the model from these exact weights."""
    import torch

    src = ctx.loaded
    params = WeightsParams(weights=src.source.weights_note)
    if src.source.kind == "torchscript":
        pt = ctx.path("model.ts")
        with atomic_path(pt) as tmp:
            torch.jit.save(src.module, str(tmp))
        ctx.manifest.record(ctx.out, pt, name="torch", kind="torchscript", params=params)
    else:
        pt = ctx.path("weights.pt")
        with atomic_path(pt) as tmp:
            torch.save(src.module.state_dict(), str(tmp))
        ctx.manifest.record(ctx.out, pt, name="torch", kind="state_dict", params=params)


def step_export(ctx: ConvertContext) -> None:
    """model.onnx (+ weights.pt / model.ts for the PyTorch runners), validated against PyTorch."""
    import onnx

    e = ctx.cfg.export
    if ctx.loaded.onnx_path is not None:
        _copy_onnx(ctx, ctx.loaded.onnx_path)
        return
    if ctx.loaded.hf is not None:  # Optimum's exporter: one file, or one per component (each validated there)
        step_export_hf(ctx)
        return
    if ctx.loaded.exporter is not None and ctx.loaded.exporter != e.exporter:
        e = e.model_copy(update={"exporter": ctx.loaded.exporter})
    target = ctx.path("model.onnx")
    ctx.log(f"exporting to ONNX ({e.exporter} exporter, opset {e.opset}, "
            f"{'dynamic' if ctx.spec.dynamic_batch else 'static'} batch)")  # a detector's is fixed whatever the flag
    export_onnx(ctx.loaded.module, ctx.spec, target, opset=e.opset, exporter=e.exporter,
                sample=export_args(ctx.spec, ctx.examples))
    ctx.manifest.iospec = complete_output_spec(ctx.spec, onnx.load(str(target), load_external_data=False))
    ctx.manifest.opset, ctx.manifest.exporter = e.opset, e.exporter
    ctx.reference = torch_reference(ctx.loaded.module, ctx.spec)
    ctx.manifest.record(ctx.out, target, name="fp32", kind="onnx",
                        params=ExportParams(exporter=e.exporter, opset=e.opset, dynamic_batch=e.dynamic_batch))
    _save_torch(ctx)


def step_validate(name: str) -> Callable[[ConvertContext], None]:
    def run(ctx: ConvertContext) -> None:
        art = ctx.manifest.artifacts[name]
        if art.components:  # validated per component by the export step
            return
        # An ONNX input is its own reference: parity with itself would be a check that cannot fail. It is still
        # loaded and run by ONNX Runtime (the reference does that), checked and shape-inferred.
        itself = isinstance(art.params, CopyParams)
        ctx.log(f"validating {art.file.path}: checker, shape inference"
                + ("" if itself else f", parity at batch {parity_batches(ctx)}"))
        if ctx.reference is not None:  # once, recorded: each dim's second value is one the source runs at
            ctx.manifest.iospec = parity_spec(ctx.spec, ctx.reference, parity_batches(ctx)[0], ctx.examples, ctx.log)
        # A failure ends the run: the staged files are dropped and the output folder keeps its old set.
        art.metrics.update(validate_onnx(ctx.out / art.file.path, ctx.spec, None if itself else ctx.reference,
                                         batches=parity_batches(ctx), tol=Tolerance.fp32(), what=art.file.path,
                                         sample=ctx.examples))
        if itself:
            _run_reference(ctx)
            art.metrics.summary = "reference: the input file as given (every variant is compared with it)"
    run.__name__ = f"validate_{name}"
    return run


def _run_reference(ctx: ConvertContext) -> None:
    """The reference runs at every parity batch (ONNX Runtime on the input file): a model that loads but
    cannot run fails here, before any variant is made from it."""
    if ctx.reference is None:
        raise ValidationError("validation of model.onnx", ["no reference was set for the ONNX input"])
    for b in parity_batches(ctx):
        try:
            ctx.reference(ctx.spec.random_feed(b, seed=1234 + b))
        except Exception as exc:
            raise ValidationError("validation of model.onnx", [f"ONNX Runtime run at batch {b}: {first_line(exc)}"]) \
                from None


def step_optimize(ctx: ConvertContext) -> None:
    """``opt``, an optional variant: when it fails, the run goes on and every variant derives from ``fp32``."""
    if not ctx.cfg.export.optimize:
        return
    make = (lambda: optimize_components(ctx)) if ctx.manifest.artifacts["fp32"].components else (lambda: _optimize(ctx))
    if not attempt_variant(ctx, "opt", "optimize", make, parent="fp32"):
        ctx.log("variants derive from fp32 (model.onnx) instead of opt")


def _optimize(ctx: ConvertContext) -> None:
    target = ctx.path("model.opt.onnx")
    ctx.log("optimizing the graph (onnxslim + ONNX Runtime basic offline optimizations)")
    info = optimize_onnx(ctx.out / ctx.manifest.artifacts["fp32"].file.path, target)
    for step, why in info.skipped.items():
        ctx.log(f"  {step} skipped: {why}")
    ctx.manifest.record(ctx.out, target, name="opt", kind="onnx", parent="fp32",
                        params=OptimizeParams(**info.model_dump()))
    step_validate("opt")(ctx)


@dataclass(frozen=True)
class PipelineVariant:
    """A row of the pipeline's variant steps: one pipeline step of its own that makes variants, the section of the
    config that asks for it, the checks it runs before the export, the records its artifacts carry and their
    precision. The rows of ``convert.variants.VARIANTS`` share one state (held-out data, calibration) and run inside
    the ``quant`` row; these rows each hold their own (a PyTorch module to prune or train, an engine builder)."""

    name: str
    section: Literal["sparsity", "distill", "quant", "engine"]  # the ConvertConfig section it reads
    field: str | None  # the section's field (or property) that asks for it; None: the section being set
    step: Step  # after the FP32 model exists
    params: tuple[type[Record], ...]  # the records its artifacts carry (the quant row: its rows' own)
    precision: Precision | None  # None: each artifact's own (the quant rows'; an engine's source's)
    checks: Step | None = None  # before the export: what can fail without the slow work
    # before the model is even loaded: what the row adds to the config, and what it needs of the machine
    prepare: Callable[[ConvertConfig], ConvertConfig] | None = None

    def asked(self, cfg: ConvertConfig) -> bool:
        section = getattr(cfg, self.section)
        return section is not None and (self.field is None or getattr(section, self.field) not in (None, False))


def _quantize(ctx: ConvertContext) -> None:
    if ctx.cfg.quant is not None:
        run_quant(ctx, ctx.cfg.quant)


def _check_quant(ctx: ConvertContext) -> None:
    if ctx.cfg.quant is not None:
        check_quant_inputs(ctx, ctx.cfg.quant)


def _prepare_engine(cfg: ConvertConfig) -> ConvertConfig:
    """The engines' ONNX sources (fp16, int8_trt) are variants too; then, before any work, one clear line where
    TensorRT or the GPU is missing."""
    if (engine := cfg.engine) is None:
        return cfg
    cfg = cfg.model_copy(update={"quant": with_source_variants(engine, cfg.quant)})
    preflight(engine)
    return cfg


#: The variant steps after the FP32 model, in the order they run (each may build from those before it: recovery
#: fine-tunes what sparsity made, an engine builds from any ONNX variant). Their checks run before the export, the
#: last row's first (the quant flags before a student, training or pruning data).
PIPELINE_VARIANTS: dict[str, PipelineVariant] = {
    "sparsity": PipelineVariant(name="sparsity", section="sparsity", field="enabled", step=step_sparsity,
                                params=(SparsityParams, PruneParams), precision="fp32",
                                checks=check_sparsity_inputs),  # sparse24, pruned_<F>
    "recover": PipelineVariant(name="recover", section="sparsity", field="recover", step=step_recover,
                               params=(SparsityParams, PruneParams), precision="fp32",
                               checks=check_recover_inputs),  # <variant>_recovered
    "distill": PipelineVariant(name="distill", section="distill", field=None, step=step_distill,
                               params=(DistillParams,), precision="fp32", checks=check_distill_inputs),  # distilled
    "quant": PipelineVariant(name="quant", section="quant", field=None, step=_quantize, params=(), precision=None,
                             checks=_check_quant),  # the rows of convert.variants.VARIANTS
    "engine": PipelineVariant(name="engine", section="engine", field=None, step=step_engine, params=(EngineParams,),
                              precision=None, prepare=_prepare_engine),  # last: it builds from any ONNX variant
}


def build_steps(cfg: ConvertConfig) -> list[Step]:
    """The ordered list of steps for ``cfg``: the export, then every row of ``PIPELINE_VARIANTS`` it asks for, their
    checks first (ahead of the slow export)."""
    steps: list[Step] = [step_export, step_validate("fp32"), step_optimize]
    if cfg.export.optimize:
        steps.append(step_fuse)  # transformers only: ONNX Runtime's attention/LayerNorm/GELU fusion
    rows = [row for row in PIPELINE_VARIANTS.values() if row.asked(cfg)]
    before = [row.checks for row in reversed(rows) if row.checks is not None]
    return [*before, *steps, *(row.step for row in rows)]


def run_convert(cfg: ConvertConfig, log: Callable[[str], None] = print,
                progress: Callable[[str, int, int, float, float], None] | None = None) -> tuple[Manifest, Path]:
    """Run the pipeline; return the manifest and the output folder.

    The steps write into a staging folder that replaces the output folder's artifacts only when every
    step has succeeded (manifest last); a failure of a required step (the export of model.onnx and its
    validation) or a signal leaves the folder as it was. A failed accuracy gate is a verdict, not a failure:
    the set is swapped in with the variant marked failed. An optional variant that cannot be made is left out
    (``Manifest.failed_variants`` says why, ``convert.context.attempt_variant``) and the rest is swapped in;
    both then exit non-zero (``check_gates``).
    ``progress`` gets each training epoch (--recover, --distill-into); None: a log line per epoch.
    """
    e = cfg.export
    for row in PIPELINE_VARIANTS.values():
        if row.prepare is not None and row.asked(cfg):
            cfg = row.prepare(cfg)  # the engine's: its ONNX sources asked for, TensorRT and the GPU checked
    loaded = resolve_model(e.model, e.weights, e.seed, task=e.task)
    out = Path(cfg.out) if cfg.out else default_out(e.model)
    for note in loaded.notes:
        log(note)
    if loaded.hf is not None and not loaded.hf.single:
        cfg = components_only(cfg, loaded.hf, log)
    spec, examples = input_spec(e, loaded)
    manifest = Manifest(source=loaded.source, iospec=spec)
    with staged_folder(out, carry=kept_content(out)) as stage:
        ctx = ConvertContext(cfg=cfg, out=stage, final=out, loaded=loaded, manifest=manifest, log=log,
                             examples=examples, progress=progress)
        for step in build_steps(cfg):
            step(ctx)
        manifest.save(stage)  # the last file written: it lists exactly the staged set
    check_gates(manifest)  # every variant is built and recorded first; then a failed gate or variant exits non-zero
    return manifest, out


def kept_content(out: Path) -> Callable[[str], bool]:
    """Which files of an existing output folder a new run keeps: all but the old manifest, the artifacts it
    lists and temporary files left by a killed process."""
    owned = {MANIFEST_NAME}
    # An unreadable manifest: its own file is replaced, every other file is kept.
    with contextlib.suppress(ToolkitError):
        owned |= Manifest.load(out).owned_paths() if (out / MANIFEST_NAME).is_file() else set()

    def keep(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return rel not in owned and not (name.startswith(".") and ".tmp" in name)
    return keep
