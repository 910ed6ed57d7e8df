"""Sparsity and pruning variants of a PyTorch model, each exported and validated like any other artifact.

* ``--sparsity 2:4``: magnitude 2:4 pruning of Conv/Linear weights, the pattern TensorRT's sparse
  tensor-core kernels use: in every group of 4 consecutive weights along the input-channel dimension
  at most 2 are non-zero. The shapes do not change, so the file is as large and, on CPU, ONNX Runtime
  is no faster (dense kernels multiply the zeros too); only TensorRT on Ampere or newer GPUs turns it
  into speed. The pattern is checked in the exported ONNX file itself, not only in PyTorch.
* ``--prune-channels F``: structured channel pruning with ``torch-pruning`` (dependency graph, L2
  magnitude): a fraction F of the channels of every prunable layer is removed, so the model really has
  fewer parameters, a smaller file and fewer MACs. The output layer is never pruned.

Each variant is exported with :func:`convert.export.export_onnx`, optimized like the FP32 model,
validated with :func:`convert.validate.validate_onnx` against the pruned PyTorch module itself (its own
reference), and compared with the FP32 model on held-out inputs (given ``.npz`` with labels, or random)
by :class:`convert.heldout.HeldOutEvaluator`, the evaluator of the quantization gates. The masks and
the pruning itself are in :mod:`convert.prune`. These variants are not fine-tuned: accuracy drops, and
the manifest says by how much; ``--recover distill`` (:mod:`convert.recover`) adds a fine-tuned
``<variant>_recovered`` next to each.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from calibration.pools import InputPool, random_pool, source_pool
from convert.config import Budget, SparsityConfig
from convert.config import parse_prune_ratio as parse_prune_ratio
from convert.config import parse_sparsity_pattern as parse_sparsity_pattern
from convert.context import ConvertContext, attempt_variant, parity_batches
from convert.export import export_onnx
from convert.gates import gate_verdict
from convert.heldout import HeldOutEvaluator, PoolData, keep_heldout
from convert.inputs import export_args
from convert.optimize import optimize_onnx
from convert.prune import apply_2of4, check_2of4_onnx, ops_and_params, prune_channels
from convert.validate import Tolerance, torch_reference, validate_onnx
from core.errors import InputError, ValidationError
from core.manifest import Artifact
from core.metrics import NOISE_RATIO
from core.models import is_random_init
from core.records import AccuracyChange, DistillParams, LatencyChange, PruneParams, PruneStats, SparsityParams

CPU_24_NOTE = ("2:4 sparsity keeps every weight tensor's shape: the file is not smaller and ONNX Runtime "
               "on CPU is not faster (dense kernels multiply the zeros too). Only TensorRT's sparse "
               "tensor-core kernels on Ampere or newer GPUs use the pattern (params.sparsity = '2:4').")

#: Held-out samples per ONNX Runtime run (a fixed-batch model runs its own batch).
EVAL_BATCH = 64


# -- held-out inputs and timing ----------------------------------------------------------------------
def eval_pool(ctx: ConvertContext, cfg: SparsityConfig, size: int | None = None) -> InputPool:
    """The held-out inputs: ``--eval-data`` (image folder, .npy/.npz with optional 'labels', or a built-in
    set, read through the same sources as the INT8 accuracy gates), else seeded random inputs."""
    if cfg.eval_data is not None:
        return source_pool(cfg.eval_data, ctx.spec, ctx.manifest.source, seed=ctx.cfg.export.seed, size=size)
    # A seed of its own: never the inputs the parity checks used.
    return random_pool(ctx.spec, size or cfg.eval_samples, ctx.cfg.export.seed + 9001)


def latency_change(ctx: ConvertContext, art: Artifact, ref_name: str, pool: InputPool,
                   cfg: SparsityConfig) -> LatencyChange:
    """p50 of ``art`` and of the FP32 artifact, timed in turn at batch 1 (or the fixed batch)."""
    from runtimes.timing import interleaved_latency

    batch = ctx.spec.fixed_batch() or 1
    before, after = interleaved_latency(ctx.manifest, ctx.out, [ctx.manifest.artifacts[ref_name], art],
                                        pool.feed(0, batch), warmup=cfg.latency_warmup, iters=cfg.latency_iters)
    return LatencyChange(backend="ort", device="cpu", batch_size=batch, baseline=ref_name, timing="interleaved",
                         p50_ms_before=before.p50, p50_ms_after=after.p50, speedup_p50=before.p50 / after.p50,
                         before=before, after=after)


def speed_note(lat: LatencyChange) -> str | None:
    if lat.speedup_p50 >= NOISE_RATIO:
        return None
    return (f"not faster with ONNX Runtime on this CPU at batch {lat.batch_size}: p50 "
            f"{lat.p50_ms_after:.3f} ms vs {lat.p50_ms_before:.3f} ms for {lat.baseline}")


def compare_with_fp32(ctx: ConvertContext, art: Artifact, ev: HeldOutEvaluator, pool: InputPool,
                      cfg: SparsityConfig, budget: Budget | None = None) -> LatencyChange:
    """Accuracy change on the held-out inputs, latency and file size of ``art`` vs the FP32 artifact
    (``ev``'s reference), into its metrics, gated by ``budget`` (default ``cfg.budget``); a note when it
    is not faster. Returns the latency change."""
    ref_name = ev.reference_name
    art.metrics.accuracy_vs_fp32 = change = ev.change(ctx.out / art.file.path)
    art.metrics.gate = gate = gate_verdict(change, budget or cfg.budget, is_random_init(ctx.manifest.source))
    if not gate.passed:
        art.status = "failed"  # convert exits non-zero once every variant is made (gates.check_gates)
        ctx.log(f"{art.name}: gate FAILED: {gate.reason}")
    art.metrics.latency = lat = latency_change(ctx, art, ref_name, pool, cfg)
    art.metrics.size_bytes_before = ctx.manifest.artifacts[ref_name].file.size_bytes
    art.metrics.size_bytes_after = art.file.size_bytes
    if note := speed_note(lat):
        art.notes.append(note)
    return lat


def fp32_evaluator(ctx: ConvertContext, cfg: SparsityConfig) -> tuple[HeldOutEvaluator, InputPool]:
    """The held-out inputs and the FP32 artifact's outputs on them, every variant's reference."""
    pool = eval_pool(ctx, cfg)
    ref_name = ctx.best_fp32()
    ctx.log(f"running {ref_name} with ONNX Runtime on the held-out inputs ({pool.source})")
    ev = HeldOutEvaluator(PoolData(pool), EVAL_BATCH, ctx.spec.fixed_batch())
    ev.set_reference(ctx.out / ctx.manifest.artifacts[ref_name].file.path, ref_name)
    keep_heldout(ctx, ev)
    return ev, pool


# -- the pipeline steps ------------------------------------------------------------------------------
def pytorch_module(ctx: ConvertContext) -> Any:
    import torch

    module = ctx.loaded.module
    if module is None or isinstance(module, torch.jit.ScriptModule) or not isinstance(module, torch.nn.Module):
        raise InputError("--sparsity/--prune-channels need the PyTorch model (a torchvision name or a "
                         f"path/to/file.py:factory); {ctx.manifest.source.kind} inputs cannot be pruned")
    return module


def example_inputs(ctx: ConvertContext) -> tuple[Any, ...]:
    import torch

    feed = ctx.spec.random_feed(ctx.spec.fixed_batch() or 1, seed=ctx.cfg.export.seed)
    return tuple(torch.from_numpy(feed[n]) for n in ctx.spec.input_names)


def export_variant(ctx: ConvertContext, module: Any, name: str, *,
                   params: SparsityParams | PruneParams | DistillParams, notes: list[str],
                   parent: str | None = None) -> Artifact:
    """Export ``module`` like the FP32 model (optimized when that was), record it, validate it against
    ``module`` itself; a failed validation is raised (the caller's ``attempt_variant`` leaves the variant out)."""
    e = ctx.cfg.export
    target = ctx.path(f"model.{name}.onnx")
    if e.optimize:
        with tempfile.TemporaryDirectory(dir=ctx.out, prefix=f".{name}.") as tmp:
            raw = Path(tmp) / "raw.onnx"
            export_onnx(module, ctx.spec, raw, opset=e.opset, exporter=e.exporter,
                        sample=export_args(ctx.spec, ctx.examples))
            params = params.model_copy(update={"optimize": optimize_onnx(raw, target)})
    else:
        export_onnx(module, ctx.spec, target, opset=e.opset, exporter=e.exporter,
                    sample=export_args(ctx.spec, ctx.examples))
    art = ctx.manifest.record(ctx.out, target, name=name, kind="onnx", parent=parent or ctx.best_fp32(),
                              params=params, notes=notes)
    ctx.log(f"validating {target.name} against the {name} PyTorch module (parity at batch {parity_batches(ctx)})")
    art.metrics.update(validate_onnx(target, ctx.spec, torch_reference(module, ctx.spec),
                                     batches=parity_batches(ctx), tol=Tolerance.fp32(), what=target.name))
    return art


def check_sparsity_inputs(ctx: ConvertContext) -> None:
    """Before the export: the source must be a PyTorch module, and the eval data must fit the IOSpec."""
    pytorch_module(ctx)
    if ctx.cfg.sparsity.eval_data is not None:
        eval_pool(ctx, ctx.cfg.sparsity, size=1)


def make_sparse24(ctx: ConvertContext, module: Any, ev: HeldOutEvaluator, pool: InputPool) -> None:
    """``sparse24``: 2:4 magnitude pruning, the pattern checked in the exported file, compared with FP32."""
    e = ctx.cfg.export
    ctx.log("2:4 magnitude pruning of Conv/Linear weights (groups of 4 input channels)")
    pruned, skipped = apply_2of4(module)
    params = SparsityParams(exporter=e.exporter, opset=e.opset, method="magnitude", group_axis="input channels",
                            layers_pruned=len(pruned), layers_skipped=skipped)
    art = export_variant(ctx, module, "sparse24", params=params, notes=[CPU_24_NOTE])
    ctx.variant_modules[art.name] = (module, pruned)
    check_24_and_compare(ctx, art, ev, pool)


def check_24_and_compare(ctx: ConvertContext, art: Artifact, ev: HeldOutEvaluator, pool: InputPool,
                         budget: Budget | None = None) -> None:
    """The 2:4 pattern checked in the exported file itself (a break fails the variant), then the comparison."""
    art.metrics.sparsity = sp = check_2of4_onnx(ctx.out / art.file.path)
    if sp.violating_weights:
        raise ValidationError(f"2:4 check of {art.file.path}", [f"{w} has a group of 4 with more than 2 "
                                                                "non-zero weights" for w in sp.violating_weights])
    compare_with_fp32(ctx, art, ev, pool, ctx.cfg.sparsity, budget)
    ctx.log(f"{art.name}: {sp.fraction_groups_2of4:.4f} of groups satisfy 2:4, "
            f"{sp.fraction_weights_2of4:.4f} of all Conv/Linear weights are in the pattern; "
            f"{acc_line(art.metrics.accuracy_vs_fp32)}")


def make_pruned(ctx: ConvertContext, module: Any, ratio: float, ev: HeldOutEvaluator, pool: InputPool) -> None:
    """``pruned_<ratio>``: channel pruning (torch-pruning), its parameters and MACs, compared with FP32."""
    e, cfg = ctx.cfg.export, ctx.cfg.sparsity
    name = pruned_name(ratio)
    example = example_inputs(ctx)
    macs0, params0 = ops_and_params(module, example)
    ctx.log(f"channel pruning {ratio:.0%} of every prunable layer (torch-pruning, L2 magnitude)")
    ignored = prune_channels(module, example, ratio, cfg.round_to)
    macs1, params1 = ops_and_params(module, example)
    params = PruneParams(exporter=e.exporter, opset=e.opset, pruning_ratio=ratio, round_to=cfg.round_to,
                         method="torch-pruning BasePruner, GroupMagnitudeImportance(p=2), per-layer ratio",
                         ignored_layers=ignored)
    art = export_variant(ctx, module, name, params=params, notes=[
        "no fine-tuning: the accuracy drop below is what pruning alone costs; --recover distill fine-tunes it"])
    ctx.variant_modules[name] = (module, [])
    art.metrics.pruning = PruneStats(params_before=params0, params_after=params1, macs_before=macs0,
                                     macs_after=macs1, flops_note="MACs at the batch of the example input, counted "
                                     "by torch_pruning.utils.count_ops_and_params (1 MAC = 2 FLOPs)")
    lat = compare_with_fp32(ctx, art, ev, pool, cfg)
    size0 = ctx.manifest.artifacts[ev.reference_name].file.size_bytes
    ctx.log(f"{name}: params {params0:,} -> {params1:,}, MACs {macs0:,} -> {macs1:,}, file "
            f"{size0 / 2**20:.2f} -> {art.file.size_bytes / 2**20:.2f} MB, p50 "
            f"{lat.p50_ms_before:.3f} -> {lat.p50_ms_after:.3f} ms; {acc_line(art.metrics.accuracy_vs_fp32)}")


def step_sparsity(ctx: ConvertContext) -> None:
    """Make the requested variants (2:4 sparse, channel-pruned) and measure each against the FP32 model."""
    cfg: SparsityConfig = ctx.cfg.sparsity
    if not cfg.enabled:
        return
    original = pytorch_module(ctx)
    ev, pool = fp32_evaluator(ctx, cfg)
    parent = ctx.best_fp32()
    # each optional: one that fails (export, validation, the 2:4 check, torch-pruning) is left out with its reason
    if cfg.pattern == "2:4":
        attempt_variant(ctx, "sparse24", "sparsity", lambda: make_sparse24(ctx, copy.deepcopy(original).eval(), ev,
                                                                           pool), parent=parent)
    if (ratio := cfg.prune_channels) is not None:
        attempt_variant(ctx, pruned_name(ratio), "prune_channels",
                        lambda: make_pruned(ctx, copy.deepcopy(original).eval(), ratio, ev, pool), parent=parent)


def pruned_name(ratio: float) -> str:
    return f"pruned_{ratio:g}"


def acc_line(acc: AccuracyChange | None) -> str:
    if acc is None:
        return "no accuracy change measured"
    if acc.accuracy_drop_points is not None and acc.top1_acc is not None and acc.ref_top1_acc is not None:
        return (f"top-1 accuracy {acc.ref_top1_acc:.4f} -> {acc.top1_acc:.4f} "
                f"({acc.accuracy_drop_points:.2f} points lower)")
    if acc.top1_agreement is not None:
        return f"top-1 agreement with FP32 {acc.top1_agreement:.4f} (no labels)"
    return f"cosine vs FP32 {acc.cosine:.5f}"
