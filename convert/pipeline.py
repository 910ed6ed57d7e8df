"""The convert pipeline: a list of plain step functions over one ``ConvertContext``.

resolve -> export (model.onnx) + PyTorch weights -> validate -> optimize (model.opt.onnx) -> validate
-> optional variant steps (FP16, INT8, sparsity, TensorRT) added by their modules.
Every file is written atomically and recorded in ``manifest.json`` with its hash.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from convert.engine import EngineConfig, preflight, step_engine, with_source_variants
from convert.export import Exporter, complete_output_spec, export_onnx
from convert.gates import check_gates
from convert.models import LoadedModel, resolve_model
from convert.optimize import optimize_onnx
from convert.quantize import QuantConfig, quant_steps
from convert.sparsity import SparsityConfig, check_sparsity_inputs, step_sparsity
from convert.validate import Reference, Tolerance, ort_reference, torch_reference, validate_onnx
from core.errors import InputError, ValidationError
from core.fsutil import atomic_path, ensure_writable_dir
from core.iospec import IOSpec, spec_from_onnx
from core.manifest import Manifest

DEFAULT_OPSET = 18


class ExportConfig(BaseModel):
    """What to export and how."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="torchvision name, path/to/file.py:factory, TorchScript .pt, or .onnx")
    weights: str | None = Field(default=None, description="torchvision weights name or local state-dict file")
    input_shape: tuple[int, ...] | None = Field(default=None, description="e.g. (1, 3, 224, 224)")
    opset: int = Field(default=DEFAULT_OPSET, ge=7, le=23, description="ONNX opset")
    exporter: Exporter = Field(default="torchscript", description="torch.onnx exporter")
    dynamic_batch: bool = Field(default=True, description="Symbolic batch dimension")
    optimize: bool = Field(default=True, description="Write model.opt.onnx (onnxslim + ORT basic)")
    seed: int = Field(default=0, description="Seed for random init and test inputs")
    parity_batches: list[int] = Field(default=[1, 2], description="Batch sizes for the parity check")


class ConvertConfig(BaseModel):
    """A full conversion request."""

    model_config = ConfigDict(extra="forbid")

    export: ExportConfig
    out: Path | None = Field(default=None, description="Output folder; default artifacts/<model name>")
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig,
                                     description="2:4 sparse and channel-pruned variants (convert/sparsity.py)")
    quant: QuantConfig | None = Field(default=None, description="FP16 / dynamic INT8 / static INT8 variants and their "
                                                              "accuracy gates (convert/quantize.py); None = none")
    engine: EngineConfig | None = Field(default=None, description="Also build a TensorRT engine (convert/engine.py); "
                                                                  "None = no engine")


@dataclass
class ConvertContext:
    """State shared by the steps of one conversion."""

    cfg: ConvertConfig
    out: Path
    loaded: LoadedModel
    manifest: Manifest
    reference: Reference | None = None
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> IOSpec:
        return self.manifest.iospec

    def path(self, name: str) -> Path:
        return self.out / name

    def best_fp32(self) -> str:
        """The artifact variants derive from: the optimized model when present."""
        return "opt" if "opt" in self.manifest.artifacts else "fp32"


def default_out(model: str) -> Path:
    file_part, _, attr = model.rpartition(":")
    stem = attr if file_part.endswith(".py") else Path(model).stem
    return Path("artifacts") / (stem or "model")


def _input_spec(cfg: ExportConfig, loaded: LoadedModel) -> IOSpec:
    shape = cfg.input_shape or loaded.default_shape
    if shape is None:
        raise InputError(f"{cfg.model}: the input shape is unknown; pass --input-shape, e.g. 1x3x224x224")
    return IOSpec.for_image_model(shape, dynamic_batch=cfg.dynamic_batch)


def step_export(ctx: ConvertContext) -> None:
    """model.onnx (+ weights.pt / model.ts for the PyTorch runners), validated against PyTorch."""
    e = ctx.cfg.export
    src = ctx.loaded
    target = ctx.path("model.onnx")
    if src.onnx_path is not None:
        import onnx

        with atomic_path(target) as tmp:
            shutil.copyfile(src.onnx_path, tmp)
        model = onnx.load(str(target))
        ctx.manifest.iospec = spec_from_onnx(model)
        ctx.manifest.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        ctx.manifest.exporter = "none (ONNX input)"
        ctx.reference = ort_reference(target)
        ctx.log("ONNX input taken as is; parity reference is ONNX Runtime on the input file")
        ctx.manifest.record(ctx.out, target, name="fp32", kind="onnx", step="copy", params={"from": str(src.onnx_path)})
        return
    import torch

    ctx.log(f"exporting to ONNX ({e.exporter} exporter, opset {e.opset}, "
            f"{'dynamic' if e.dynamic_batch else 'static'} batch)")
    export_onnx(src.module, ctx.spec, target, opset=e.opset, exporter=e.exporter)
    import onnx

    ctx.manifest.iospec = complete_output_spec(ctx.spec, onnx.load(str(target), load_external_data=False))
    ctx.manifest.opset, ctx.manifest.exporter = e.opset, e.exporter
    ctx.reference = torch_reference(src.module, ctx.spec)
    ctx.manifest.record(ctx.out, target, name="fp32", kind="onnx", step="export",
                        params={"exporter": e.exporter, "opset": e.opset, "dynamic_batch": e.dynamic_batch})
    # The PyTorch runners (eager, TorchScript) rebuild the model from these exact weights.
    if src.source.kind == "torchscript":
        pt = ctx.path("model.ts")
        with atomic_path(pt) as tmp:
            torch.jit.save(src.module, str(tmp))
        ctx.manifest.record(ctx.out, pt, name="torch", kind="torchscript", step="export")
    else:
        pt = ctx.path("weights.pt")
        with atomic_path(pt) as tmp:
            torch.save(src.module.state_dict(), str(tmp))
        ctx.manifest.record(ctx.out, pt, name="torch", kind="state_dict", step="export",
                            params={"weights": src.source.weights_note})


def _batches(ctx: ConvertContext) -> list[int]:
    fixed = ctx.spec.fixed_batch()
    return [fixed] if fixed else list(ctx.cfg.export.parity_batches)


def step_validate(name: str) -> Callable[[ConvertContext], None]:
    def run(ctx: ConvertContext) -> None:
        art = ctx.manifest.artifacts[name]
        ctx.log(f"validating {art.file.path}: checker, shape inference, parity at batch {_batches(ctx)}")
        try:
            art.metrics.update(validate_onnx(ctx.out / art.file.path, ctx.spec, ctx.reference,
                                             batches=_batches(ctx), tol=Tolerance.fp32(), what=art.file.path))
        except ValidationError as exc:
            # The file stays (it is complete), but the manifest says it failed and why.
            art.status = "failed"
            art.notes.extend(exc.failures)
            ctx.manifest.save(ctx.out)
            raise
    run.__name__ = f"validate_{name}"
    return run


def step_optimize(ctx: ConvertContext) -> None:
    if not ctx.cfg.export.optimize:
        return
    target = ctx.path("model.opt.onnx")
    ctx.log("optimizing the graph (onnxslim + ONNX Runtime basic offline optimizations)")
    info = optimize_onnx(ctx.out / ctx.manifest.artifacts["fp32"].file.path, target)
    ctx.manifest.record(ctx.out, target, name="opt", kind="onnx", step="optimize", parent="fp32", params=info)
    step_validate("opt")(ctx)


Step = Callable[[ConvertContext], Any]


def build_steps(cfg: ConvertConfig) -> list[Step]:
    """The ordered list of steps for ``cfg``: variant modules append theirs here."""
    steps: list[Step] = [step_export, step_validate("fp32"), step_optimize]
    if cfg.sparsity.enabled:  # the preflight: wrong source or eval data fail before the slow export
        steps = [check_sparsity_inputs, *steps, step_sparsity]
    if cfg.quant is not None:
        before, after = quant_steps(cfg.quant)  # before: flag/data checks ahead of the slow export
        steps = [*before, *steps, *after]
    if cfg.engine is not None:
        steps.append(step_engine)  # last: it may build from any ONNX variant above
    return steps


def run_convert(cfg: ConvertConfig, log: Callable[[str], None] = print) -> tuple[Manifest, Path]:
    """Run the pipeline; return the manifest and the output folder.

    The manifest is saved after every step, so a failure later keeps the artifacts already made,
    and no file is ever left half-written.
    """
    e = cfg.export
    if (engine := cfg.engine) is not None:
        # The engines' ONNX sources (fp16, int8_trt) are variants too; then, before any work, one
        # clear line where TensorRT or the GPU is missing.
        cfg = cfg.model_copy(update={"quant": with_source_variants(engine, cfg.quant)})
        preflight(engine)
    loaded = resolve_model(e.model, e.weights, e.seed)
    out = ensure_writable_dir(Path(cfg.out) if cfg.out else default_out(e.model))
    for note in loaded.notes:
        log(note)
    spec = (IOSpec.for_image_model(e.input_shape or (1, 1)) if loaded.onnx_path is not None
            else _input_spec(e, loaded))
    manifest = Manifest(source=loaded.source, iospec=spec)
    ctx = ConvertContext(cfg=cfg, out=out, loaded=loaded, manifest=manifest, log=log)
    for step in build_steps(cfg):
        step(ctx)
        manifest.save(out)
    check_gates(manifest)  # every variant is built and recorded first; then a failed gate exits non-zero
    return manifest, out
