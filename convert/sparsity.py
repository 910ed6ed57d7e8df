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
reference), and compared with the FP32 model on held-out inputs (given ``.npz`` with labels, or random).
No fine-tuning is done: accuracy drops, and the manifest says by how much.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError, ToolkitError, ValidationError

if TYPE_CHECKING:
    from convert.pipeline import ConvertContext
    from core.manifest import Artifact
    from runtimes.harness import InputPool

SparsityPattern = Literal["2:4"]
CPU_24_NOTE = ("2:4 sparsity keeps every weight tensor's shape: the file is not smaller and ONNX Runtime "
               "on CPU is not faster (dense kernels multiply the zeros too). Only TensorRT's sparse "
               "tensor-core kernels on Ampere or newer GPUs use the pattern (params.sparsity = '2:4').")


class SparsityConfig(BaseModel):
    """Which sparse/pruned variants to make, and how to measure them."""

    model_config = ConfigDict(extra="forbid")

    pattern: SparsityPattern | None = Field(default=None, description="Semi-structured pattern: only '2:4'")
    prune_channels: float | None = Field(default=None, gt=0, lt=1,
                                         description="Fraction of channels to remove per prunable layer")
    round_to: int | None = Field(default=None, ge=1,
                                 description="Keep pruned channel counts a multiple of this (e.g. 8 for GPUs)")
    eval_data: str | None = Field(default=None, description="Held-out inputs for the accuracy change (--eval-data: "
                                                            "image folder, .npy/.npz with optional 'labels')")
    eval_samples: int = Field(default=64, ge=1, description="Random held-out inputs when there is no eval_data")
    latency_warmup: int = Field(default=5, ge=0, description="ONNX Runtime warm-up runs before timing")
    latency_iters: int = Field(default=30, ge=1, description="Timed ONNX Runtime runs at batch 1")

    @property
    def enabled(self) -> bool:
        return self.pattern is not None or self.prune_channels is not None


def parse_sparsity_pattern(text: str) -> SparsityPattern:
    """The ``--sparsity`` value, or one clear InputError."""
    if text.strip().replace(" ", "") == "2:4":
        return "2:4"
    raise InputError(f"unsupported --sparsity {text!r}: only 2:4 is supported (2 non-zero weights in every "
                     "group of 4 input channels, the pattern TensorRT's sparse kernels use)")


def parse_prune_ratio(text: str) -> float:
    """The ``--prune-channels`` value: a fraction strictly between 0 and 1, or one clear InputError."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise InputError(f"--prune-channels must be a fraction strictly between 0 and 1 (e.g. 0.3 removes 30% of "
                         f"the channels of every prunable layer), got {text!r}")
    return value


# -- 2:4 pattern -------------------------------------------------------------------------------------
def _groups_of_4(weight: np.ndarray, axis: int) -> np.ndarray | None:
    """``weight`` as rows of 4 consecutive values along ``axis``; None when that dim is not a multiple of 4."""
    if weight.ndim < 2 or weight.shape[axis] % 4:
        return None
    return np.moveaxis(weight, axis, -1).reshape(-1, 4)


def mask_2of4(weight: Any) -> Any:
    """Keep the 2 largest-magnitude weights of every 4 consecutive input channels (dim 1); zero the rest."""
    import torch

    moved = weight.detach().movedim(1, -1)
    groups = moved.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return (groups * keep).reshape(moved.shape).movedim(-1, 1).contiguous()


def apply_2of4(module: Any) -> dict[str, Any]:
    """Prune every Conv/Linear weight whose input-channel dim is a multiple of 4, in place."""
    import torch
    from torch import nn

    pruned: list[str] = []
    skipped: list[dict[str, str]] = []
    with torch.no_grad():
        for name, m in module.named_modules():
            if not isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                continue
            cin = m.weight.shape[1]
            if cin % 4:
                skipped.append({"layer": name, "reason": f"{cin} input channel(s) per group is not a multiple of 4"})
                continue
            m.weight.copy_(mask_2of4(m.weight))
            pruned.append(name)
    if not pruned:
        raise InputError("--sparsity 2:4: no Conv/Linear layer has a multiple of 4 input channels; nothing to prune")
    return {"layers_pruned": len(pruned), "layers_skipped": skipped}


def _weight_tensors(model: Any) -> list[tuple[str, str, np.ndarray, int]]:
    """(node, op, weight, input-channel axis) of every Conv / Gemm / MatMul whose weight is a constant."""
    from onnx import numpy_helper

    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    transposed = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Transpose" and n.input[0] in consts}
    out: list[tuple[str, str, np.ndarray, int]] = []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        name, flip = n.input[1], False
        if name in transposed:  # weight.T computed in the graph: the stored tensor has the other layout
            name, flip = transposed[name], True
        if name not in consts or consts[name].ndim < 2:
            continue
        w = consts[name]
        if n.op_type == "Conv":
            axis = 1
        else:  # Gemm/MatMul compute A @ B: input channels are B's rows, or its columns when B is transposed
            trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            axis = 1 if trans_b != flip else 0
            if w.ndim != 2:
                continue
        out.append((n.name or n.output[0], n.op_type, w, axis))
    return out


def check_2of4_onnx(path: Path) -> dict[str, Any]:
    """How well the weights stored in the ONNX file satisfy 2:4 along their input-channel dimension.

    ``fraction_groups_2of4``: groups with at most 2 non-zeros / all groups, over the weights that can hold
    the pattern (input dim a multiple of 4). ``fraction_weights_2of4``: weights lying in such a group / all
    Conv/Gemm/MatMul weights, ineligible layers included (the share of the model TensorRT can sparsify).
    """
    import onnx

    groups_ok = groups_all = weights_ok = weights_all = zeros = 0
    ineligible: list[str] = []
    violating: list[str] = []
    for node, op, w, axis in _weight_tensors(onnx.load(str(path))):
        weights_all += w.size
        zeros += int((w == 0).sum())
        groups = _groups_of_4(w, axis)
        if groups is None:
            ineligible.append(f"{node} ({op}, input dim {w.shape[axis]})")
            continue
        ok = (groups != 0).sum(axis=1) <= 2
        groups_ok += int(ok.sum())
        groups_all += len(ok)
        weights_ok += 4 * int(ok.sum())
        if not ok.all():
            violating.append(node)
    return {"pattern": "2:4", "checked_in": path.name, "fraction_groups_2of4": groups_ok / groups_all if groups_all
            else 0.0, "fraction_weights_2of4": weights_ok / weights_all if weights_all else 0.0,
            "groups": groups_all, "weights": weights_all, "zero_fraction": zeros / weights_all if weights_all else 0.0,
            "ineligible_weights": ineligible, "violating_weights": violating}


# -- channel pruning ---------------------------------------------------------------------------------
def _example_inputs(ctx: ConvertContext) -> tuple[Any, ...]:
    import torch

    feed = ctx.spec.random_feed(ctx.spec.fixed_batch() or 1, seed=ctx.cfg.export.seed)
    return tuple(torch.from_numpy(feed[n]) for n in ctx.spec.input_names)


def _output_layers(module: Any, example: tuple[Any, ...]) -> list[Any]:
    """The last Conv/Linear to run: the classifier head, whose outputs must keep their size."""
    import torch
    from torch import nn

    order: list[Any] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for m in module.modules()
             if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)]
    try:
        with torch.inference_mode():
            module(*example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def _ops_and_params(module: Any, example: tuple[Any, ...]) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example)
    return int(macs), int(params)


def prune_channels(module: Any, example: tuple[Any, ...], ratio: float, round_to: int | None) -> dict[str, Any]:
    """Remove ``ratio`` of the channels of every prunable layer of ``module`` in place (torch-pruning)."""
    import torch
    import torch_pruning as tp

    names = {m: n for n, m in module.named_modules()}
    ignored = _output_layers(module, example)
    with torch.inference_mode():
        before = [o.shape for o in _as_list(module(*example))]
    try:
        pruner = tp.pruner.BasePruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
        pruner.step()
    except Exception as exc:
        raise ToolkitError(f"torch-pruning could not prune this model: {type(exc).__name__}: {exc}") from exc
    with torch.inference_mode():
        after = [o.shape for o in _as_list(module(*example))]
    if after != before:
        raise ToolkitError(f"channel pruning changed the output shapes {before} -> {after}; not exporting it")
    return {"ignored_layers": [names.get(m, "?") for m in ignored]}


def _as_list(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple | list) else [out]


# -- held-out evaluation and timing ------------------------------------------------------------------
def held_out_pool(spec: str, ctx: ConvertContext, size: int | None = None) -> InputPool:
    """Held-out inputs from ``--eval-data`` (image folder, .npy/.npz with optional 'labels', or a built-in
    set), read through the same calibration/ sources as the INT8 accuracy gates."""
    from calibration.sources import open_source, resolve_preprocessing
    from runtimes.harness import InputPool

    try:
        pre = resolve_preprocessing(ctx.spec, ctx.manifest.source.preprocessing)
    except InputError:
        pre = None  # not an image model: only tensor files apply, and open_source says so
    source = open_source(spec, ctx.spec, pre, size=size, seed=ctx.cfg.export.seed)
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    for feed, lab in source.iter_labelled(64):
        feeds.append(feed)
        if lab is not None:
            labels.append(lab)
    arrays = {n: np.ascontiguousarray(np.concatenate([f[n] for f in feeds])) for n in ctx.spec.input_names}
    return InputPool(arrays=arrays, labels=np.concatenate(labels) if labels else None, source=source.describe())


def eval_pool(ctx: ConvertContext, cfg: SparsityConfig) -> InputPool:
    if cfg.eval_data is not None:
        return held_out_pool(cfg.eval_data, ctx)
    from runtimes.harness import BenchConfig, build_pool

    # A seed of its own: never the inputs the parity checks used.
    bc = BenchConfig(artifact_dir=ctx.out, seed=ctx.cfg.export.seed + 9001)
    return build_pool(ctx.manifest, bc, cfg.eval_samples, ctx.log)


def pool_outputs(ctx: ConvertContext, art: Artifact, pool: InputPool) -> np.ndarray:
    """The first output on the whole held-out pool, with the bench harness' ONNX Runtime CPU runner."""
    from runtimes.base import RunnerOptions
    from runtimes.harness import run_pool
    from runtimes.ort import OrtRunner

    with OrtRunner(ctx.manifest, ctx.out, art, RunnerOptions(device="cpu")) as runner:
        return run_pool(runner, pool, ctx.spec.fixed_batch() or 64)


def accuracy_change(got: np.ndarray, ref: np.ndarray, pool: InputPool, ref_name: str) -> dict[str, Any]:
    """The bench harness' accuracy statistics vs the FP32 model, plus the drop in points."""
    from runtimes.harness import accuracy_stats

    stats = accuracy_stats(got, ref, pool.labels, f"ort:{ref_name}:fp32:cpu")
    out: dict[str, Any] = {"inputs": pool.source, **stats.model_dump(exclude_none=True)}
    if stats.top1_agreement is not None:
        out["agreement_drop_points"] = round(100.0 * (1.0 - stats.top1_agreement), 4)
    if stats.top1_acc is not None and stats.ref_top1_acc is not None:
        out["accuracy_drop_points"] = round(100.0 * (stats.ref_top1_acc - stats.top1_acc), 4)
    return out


def latency_change(ctx: ConvertContext, art: Artifact, ref_name: str, pool: InputPool,
                   cfg: SparsityConfig) -> dict[str, Any]:
    """p50 of ``art`` and of the FP32 artifact, timed in turn at batch 1 (or the fixed batch)."""
    from runtimes.harness import interleaved_latency

    batch = ctx.spec.fixed_batch() or 1
    before, after = interleaved_latency(ctx.manifest, ctx.out, [ctx.manifest.artifacts[ref_name], art],
                                        pool.feed(0, batch), warmup=cfg.latency_warmup, iters=cfg.latency_iters)
    return {"backend": "ort", "device": "cpu", "batch_size": batch, "baseline": ref_name, "timing": "interleaved",
            "p50_ms_before": before.p50, "p50_ms_after": after.p50, "speedup_p50": before.p50 / after.p50,
            "before": before.model_dump(), "after": after.model_dump()}


def speed_note(lat: dict[str, Any]) -> str | None:
    if lat["speedup_p50"] >= 1.05:
        return None
    return (f"not faster with ONNX Runtime on this CPU at batch {lat['batch_size']}: p50 "
            f"{lat['p50_ms_after']:.3f} ms vs {lat['p50_ms_before']:.3f} ms for {lat['baseline']}")


# -- the pipeline step -------------------------------------------------------------------------------
def compare_with_fp32(ctx: ConvertContext, art: Artifact, ref_name: str, ref: np.ndarray, pool: InputPool,
                      cfg: SparsityConfig) -> None:
    """Accuracy change on the held-out pool, latency and file size of ``art`` vs the FP32 artifact,
    into its metrics; a note when it is not faster."""
    art.metrics["accuracy_vs_fp32"] = accuracy_change(pool_outputs(ctx, art, pool), ref, pool, ref_name)
    art.metrics["latency"] = latency_change(ctx, art, ref_name, pool, cfg)
    art.metrics["size_bytes_before"] = ctx.manifest.artifacts[ref_name].file.size_bytes
    art.metrics["size_bytes_after"] = art.file.size_bytes
    if note := speed_note(art.metrics["latency"]):
        art.notes.append(note)


def _pytorch_module(ctx: ConvertContext) -> Any:
    import torch

    module = ctx.loaded.module
    if module is None or isinstance(module, torch.jit.ScriptModule) or not isinstance(module, torch.nn.Module):
        raise InputError("--sparsity/--prune-channels need the PyTorch model (a torchvision name or a "
                         f"path/to/file.py:factory); {ctx.manifest.source.kind} inputs cannot be pruned")
    return module


def export_variant(ctx: ConvertContext, module: Any, name: str, *, step: str, params: dict[str, Any],
                   notes: list[str]) -> Artifact:
    """Export ``module`` like the FP32 model (optimized when that was), record it, validate it against
    ``module`` itself; a failed validation marks the artifact failed in the manifest and is raised."""
    from convert.export import export_onnx
    from convert.optimize import optimize_onnx
    from convert.pipeline import _batches
    from convert.validate import Tolerance, torch_reference, validate_onnx

    e = ctx.cfg.export
    target = ctx.path(f"model.{name}.onnx")
    info: dict[str, Any] = {}
    if e.optimize:
        with tempfile.TemporaryDirectory(dir=ctx.out, prefix=f".{name}.") as tmp:
            raw = Path(tmp) / "raw.onnx"
            export_onnx(module, ctx.spec, raw, opset=e.opset, exporter=e.exporter)
            info = optimize_onnx(raw, target)
    else:
        export_onnx(module, ctx.spec, target, opset=e.opset, exporter=e.exporter)
    art = ctx.manifest.record(ctx.out, target, name=name, kind="onnx", step=step, parent=ctx.best_fp32(),
                              params=params | {"exporter": e.exporter, "opset": e.opset, "optimize": info},
                              notes=notes)
    ctx.log(f"validating {target.name} against the {name} PyTorch module (parity at batch {_batches(ctx)})")
    try:
        art.metrics.update(validate_onnx(target, ctx.spec, torch_reference(module, ctx.spec), batches=_batches(ctx),
                                         tol=Tolerance.fp32(), what=target.name))
    except ValidationError as exc:
        art.status = "failed"
        art.notes.extend(exc.failures)
        ctx.manifest.save(ctx.out)
        raise
    return art


def check_sparsity_inputs(ctx: ConvertContext) -> None:
    """Before the export: the source must be a PyTorch module, and the eval data must fit the IOSpec."""
    _pytorch_module(ctx)
    if ctx.cfg.sparsity.eval_data is not None:
        held_out_pool(ctx.cfg.sparsity.eval_data, ctx, size=1)


def step_sparsity(ctx: ConvertContext) -> None:
    """Make the requested variants (2:4 sparse, channel-pruned) and measure each against the FP32 model."""
    cfg: SparsityConfig = ctx.cfg.sparsity
    if not cfg.enabled:
        return
    original = _pytorch_module(ctx)
    pool = eval_pool(ctx, cfg)
    ref_name = ctx.best_fp32()
    ctx.log(f"running {ref_name} with ONNX Runtime on the held-out inputs ({pool.source})")
    ref = pool_outputs(ctx, ctx.manifest.artifacts[ref_name], pool)

    if cfg.pattern == "2:4":
        module = copy.deepcopy(original).eval()
        ctx.log("2:4 magnitude pruning of Conv/Linear weights (groups of 4 input channels)")
        report = apply_2of4(module)
        art = export_variant(ctx, module, "sparse24", step="sparsity", notes=[CPU_24_NOTE], params={
            "sparsity": "2:4", "method": "magnitude", "group_axis": "input channels", "fine_tuned": False,
            "layers_pruned": report["layers_pruned"], "layers_skipped": report["layers_skipped"]})
        art.metrics["sparsity"] = sp = check_2of4_onnx(ctx.out / art.file.path)
        if sp["violating_weights"]:
            art.status = "failed"
            art.notes.append(f"the exported file breaks 2:4 in {sp['violating_weights']}")
            ctx.manifest.save(ctx.out)
            raise ValidationError(f"2:4 check of {art.file.path}", [f"{w} has a group of 4 with more than 2 "
                                                                    "non-zero weights" for w in sp["violating_weights"]])
        compare_with_fp32(ctx, art, ref_name, ref, pool, cfg)
        ctx.log(f"sparse24: {sp['fraction_groups_2of4']:.4f} of groups satisfy 2:4, "
                f"{sp['fraction_weights_2of4']:.4f} of all Conv/Linear weights are in the pattern; "
                f"{_acc_line(art.metrics['accuracy_vs_fp32'])}")
        ctx.manifest.save(ctx.out)

    if cfg.prune_channels is not None:
        ratio = cfg.prune_channels
        name = f"pruned_{ratio:g}"
        module = copy.deepcopy(original).eval()
        example = _example_inputs(ctx)
        macs0, params0 = _ops_and_params(module, example)
        ctx.log(f"channel pruning {ratio:.0%} of every prunable layer (torch-pruning, L2 magnitude)")
        info = prune_channels(module, example, ratio, cfg.round_to)
        macs1, params1 = _ops_and_params(module, example)
        art = export_variant(ctx, module, name, step="prune_channels", notes=[
            "no fine-tuning: the accuracy drop below is what pruning alone costs; fine-tune the pruned model "
            "to recover it"], params={
            "method": "torch-pruning BasePruner, GroupMagnitudeImportance(p=2), per-layer ratio",
            "pruning_ratio": ratio, "round_to": cfg.round_to, "fine_tuned": False, **info})
        art.metrics.update({"params_before": params0, "params_after": params1, "macs_before": macs0,
                            "macs_after": macs1, "flops_note": "MACs at the batch of the example input, counted by "
                            "torch_pruning.utils.count_ops_and_params (1 MAC = 2 FLOPs)"})
        compare_with_fp32(ctx, art, ref_name, ref, pool, cfg)
        lat, size0 = art.metrics["latency"], art.metrics["size_bytes_before"]
        ctx.log(f"{name}: params {params0:,} -> {params1:,}, MACs {macs0:,} -> {macs1:,}, file "
                f"{size0 / 2**20:.2f} -> {art.file.size_bytes / 2**20:.2f} MB, p50 "
                f"{lat['p50_ms_before']:.3f} -> {lat['p50_ms_after']:.3f} ms; {_acc_line(art.metrics['accuracy_vs_fp32'])}")


def _acc_line(acc: dict[str, Any]) -> str:
    if "accuracy_drop_points" in acc:
        return (f"top-1 accuracy {acc['ref_top1_acc']:.4f} -> {acc['top1_acc']:.4f} "
                f"({acc['accuracy_drop_points']:.2f} points lower)")
    if "top1_agreement" in acc:
        return f"top-1 agreement with FP32 {acc['top1_agreement']:.4f} (no labels)"
    return f"cosine vs FP32 {acc['cosine']:.5f}"

