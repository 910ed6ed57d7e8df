"""Getting the accuracy back: the fine-tuned variants of ``--recover distill`` and the student of
``--distill-into``, each exported, validated, gated and recorded like every other variant.

* ``<variant>_recovered`` (``sparse24_recovered``, ``pruned_<F>_recovered``): the pruned PyTorch module
  of :mod:`convert.sparsity`, fine-tuned with the FP32 model as teacher (:mod:`convert.distill`); the
  2:4 mask is held fixed and checked again in the exported file. The unrecovered variant stays beside
  it (its parent) so the accuracy that recovery bought is visible; its failed gate, once a recovered
  child exists, no longer fails the run (:func:`convert.gates.check_gates`).
* ``distilled`` (``model.distilled.onnx``): a smaller architecture (torchvision name or
  ``file.py:factory``) trained from its seeded init to mimic the FP32 model.

Both are gated against the FP32 artifact on the held-out inputs of ``--eval-data`` (which must not be
the training data), timed interleaved with it, and sized. Their gate is the default top-1 budget
(accuracy with labels, agreement without); the output-cosine half is not applied to them
(:func:`trained_budget`): a trained model is a new function whose logits are free to differ in scale
(on the digits CNN a recovered variant above FP32's accuracy has a logit cosine of about 0.97), and
the cosine is still recorded. Without ``--eval-data`` the held-out inputs are random: top-1 agreement on noise
measures nothing, so the drop is 100 x (1 - centered output cosine), as bench grades random inputs, which a
retrained model (a new function) rarely keeps within the budget: give labelled held-out data.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from calibration.pools import InputPool
from convert.config import Budget, TrainConfig
from convert.context import ConvertContext, attempt_variant, skip_variant
from convert.distill import (
    Progress,
    TrainSet,
    check_student_output,
    read_train_data,
    teacher_set,
    train_to_mimic,
)
from convert.heldout import HeldOutEvaluator
from convert.sparsity import (
    acc_line,
    check_24_and_compare,
    compare_with_fp32,
    example_inputs,
    export_variant,
    fp32_evaluator,
)
from core.errors import InputError
from core.manifest import Artifact
from core.records import DistillParams, PruneParams, SparsityParams

RECOVERED = "_recovered"


def trained_budget(budget: Budget) -> Budget:
    """The gate of a trained (recovered or distilled) variant: the top-1 budget alone; see the module doc."""
    return budget.model_copy(update={"min_cosine": -1.0})


def _same_data(a: str | None, b: str) -> bool:
    return a is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _check_data(ctx: ConvertContext, train: TrainConfig, flag: str) -> None:
    """Training data readable, labelled where labels are asked for, and apart from the held-out data."""
    read_train_data(train, ctx.spec, ctx.manifest.source, flag)
    if _same_data(ctx.cfg.sparsity.eval_data, train.data):
        raise InputError(f"--eval-data and --train-data are the same ({train.data}): the gate would grade the "
                         "variant on the data it was trained on; give held-out data apart from the training data")


def check_recover_inputs(ctx: ConvertContext) -> None:
    """Before the export: the training data (see :func:`_check_data`)."""
    if ctx.cfg.sparsity.recover is not None:
        _check_data(ctx, ctx.cfg.sparsity.recover, "--recover distill")


def _student(ctx: ConvertContext) -> Any:
    from torch import nn

    from core.models import resolve_model

    d = ctx.cfg.distill
    if d is None:
        raise RuntimeError("no --distill-into")
    module = resolve_model(d.student, None, d.train.seed).module
    if not isinstance(module, nn.Module) or module.__class__.__name__ == "RecursiveScriptModule":
        raise InputError(f"--distill-into {d.student}: the student must be a PyTorch model to train (a torchvision "
                         "name or path/to/file.py:factory)")
    return module


def check_distill_inputs(ctx: ConvertContext) -> None:
    """Before the export: the student builds, its output is shaped like the teacher's (when the teacher
    is a PyTorch module; else checked against the FP32 ONNX outputs before training), the data reads."""
    import torch

    d = ctx.cfg.distill
    if d is None:
        return
    student = _student(ctx)
    teacher = ctx.loaded.module
    if isinstance(teacher, torch.nn.Module):
        example = example_inputs(ctx)
        with torch.inference_mode():
            out = teacher.eval()(*example)
        check_student_output(student, (out[0] if isinstance(out, tuple | list) else out).numpy(), example,
                             f"--distill-into {d.student}")
    _check_data(ctx, d.train, "--distill-into")


def _progress(ctx: ConvertContext, what: str) -> Progress:
    def tick(epoch: int, epochs: int, loss: float, agree: float) -> None:
        if ctx.progress is not None:
            ctx.progress(what, epoch, epochs, loss, agree)
        else:
            ctx.log(f"{what}: epoch {epoch}/{epochs}, loss {loss:.4f}, held-out agreement {agree:.2%}")
    return tick


def _train_set(ctx: ConvertContext, train: TrainConfig, flag: str) -> TrainSet:
    pool = read_train_data(train, ctx.spec, ctx.manifest.source, flag)
    teacher = ctx.manifest.artifacts[ctx.best_fp32()]
    data = teacher_set(pool, ctx.out / teacher.file.path, train, ctx.spec.fixed_batch())
    ctx.log(f"training data: {data.source}; {len(data.train_idx)} to train on, {len(data.held_idx)} held out for "
            f"early stopping; teacher {teacher.name} ({'with' if data.labels is not None else 'no'} labels)")
    return data


def step_recover(ctx: ConvertContext) -> None:
    """``--recover distill``: a fine-tuned ``<variant>_recovered`` next to each sparse/pruned variant."""
    train = ctx.cfg.sparsity.recover
    if train is None:
        return
    # a sparse/pruned variant that failed has nothing to fine-tune: its *_recovered is skipped, with the reason
    for failed in [f for f in ctx.manifest.failed_variants if f.step in ("sparsity", "prune_channels")]:
        skip_variant(ctx, failed.name + RECOVERED, failed.step, failed.name)
    if not ctx.variant_modules:
        return
    data = _train_set(ctx, train, "--recover distill")
    ev, pool = fp32_evaluator(ctx, ctx.cfg.sparsity)
    for name, (module, layers) in list(ctx.variant_modules.items()):
        src = ctx.manifest.artifacts[name]
        attempt_variant(ctx, name + RECOVERED, src.step, partial(_recover_one, ctx, src, module, layers, data, ev, pool),
                        parent=name)


def _recover_one(ctx: ConvertContext, src: Artifact, module: Any, layers: list[str], data: TrainSet,
                 ev: HeldOutEvaluator, pool: InputPool) -> None:
    """``<src>_recovered``: ``module`` (src's PyTorch module) fine-tuned, exported, validated and compared."""
    train, name = ctx.cfg.sparsity.recover, src.name
    if train is None:
        raise RuntimeError("no --recover")
    masks = {f"{layer}.weight": (dict(module.named_parameters())[f"{layer}.weight"] != 0).float()
             for layer in layers}
    ctx.log(f"{name}: fine-tuning with {src.parent} as teacher (distillation"
            + (", the 2:4 mask held fixed)" if masks else ")"))
    record = train_to_mimic(module, data, train, names=ctx.spec.input_names, teacher=ctx.best_fp32(),
                            masks=masks, progress=_progress(ctx, f"{name} recovery"))
    params = src.params
    if not isinstance(params, SparsityParams | PruneParams):
        raise RuntimeError(f"{name} is not a sparse/pruned variant")
    art = export_variant(ctx, module, name + RECOVERED, parent=name,
                         params=params.model_copy(update={"fine_tuned": True, "training": record}),
                         notes=[f"{name} fine-tuned by distillation from {record.teacher}: {record.epochs_run} "
                                f"epoch(s), weights of epoch {record.best_epoch} kept ({record.stopped_by})"])
    budget = trained_budget(ctx.cfg.sparsity.budget)
    if masks:
        check_24_and_compare(ctx, art, ev, pool, budget)
    else:
        art.metrics.pruning = src.metrics.pruning
        compare_with_fp32(ctx, art, ev, pool, ctx.cfg.sparsity, budget)
        ctx.log(f"{art.name}: {acc_line(art.metrics.accuracy_vs_fp32)}")


def step_distill(ctx: ConvertContext) -> None:
    """``--distill-into``: the student trained to mimic the FP32 model, written as ``model.distilled.onnx``."""
    if ctx.cfg.distill is None:
        return
    attempt_variant(ctx, "distilled", "distill", lambda: _distill(ctx), parent=ctx.best_fp32())


def _distill(ctx: ConvertContext) -> None:
    d = ctx.cfg.distill
    if d is None:
        raise RuntimeError("no --distill-into")
    student = _student(ctx)
    data = _train_set(ctx, d.train, "--distill-into")
    example = example_inputs(ctx)
    check_student_output(student, data.teacher, example, f"--distill-into {d.student}")
    p_teacher, p_student = _n_params(ctx.loaded.module), _n_params(student) or 0
    ctx.log(f"distilling {ctx.best_fp32()} into {d.student} ({p_student:,} parameters)")
    record = train_to_mimic(student, data, d.train, names=ctx.spec.input_names, teacher=ctx.best_fp32(),
                            progress=_progress(ctx, "distillation"))
    e = ctx.cfg.export
    params = DistillParams(exporter=e.exporter, opset=e.opset, student=d.student, params_teacher=p_teacher,
                           params_student=p_student, fine_tuned=True, training=record)
    art = export_variant(ctx, student, "distilled", params=params, notes=[
        f"student {d.student} trained by distillation from {record.teacher}: {record.epochs_run} epoch(s), "
        f"weights of epoch {record.best_epoch} kept ({record.stopped_by})"])
    ev, pool = fp32_evaluator(ctx, ctx.cfg.sparsity)
    compare_with_fp32(ctx, art, ev, pool, ctx.cfg.sparsity, trained_budget(ctx.cfg.sparsity.budget))
    ctx.log(f"distilled: {acc_line(art.metrics.accuracy_vs_fp32)}")


def _n_params(module: Any) -> int | None:
    import torch

    if not isinstance(module, torch.nn.Module):
        return None
    return sum(int(p.numel()) for p in module.parameters())
