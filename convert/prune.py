"""The mechanics of sparsity and pruning: 2:4 masks on PyTorch weights and their check in an ONNX file,
and structured channel pruning with ``torch-pruning``.

* 2:4: in every group of 4 consecutive weights along the input-channel dimension at most 2 are
  non-zero (the pattern TensorRT's sparse tensor-core kernels use); :func:`check_2of4_onnx` reads the
  weights stored in the exported file, not the PyTorch module.
* Channel pruning: dependency graph, L2 group magnitude, one ratio for every prunable layer; the
  output layer is never pruned, so the outputs keep their shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError, ToolkitError
from core.records import SkippedLayer, SparsityInfo


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


def apply_2of4(module: Any) -> tuple[list[str], list[SkippedLayer]]:
    """Prune every Conv/Linear weight whose input-channel dim is a multiple of 4, in place; return the
    layers pruned and those skipped (and why)."""
    import torch
    from torch import nn

    pruned: list[str] = []
    skipped: list[SkippedLayer] = []
    with torch.no_grad():
        for name, m in module.named_modules():
            if not isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                continue
            cin = m.weight.shape[1]
            if cin % 4:
                skipped.append(SkippedLayer(layer=name, reason=f"{cin} input channel(s) per group is not a multiple of 4"))
                continue
            m.weight.copy_(mask_2of4(m.weight))
            pruned.append(name)
    if not pruned:
        raise InputError("--sparsity 2:4: no Conv/Linear layer has a multiple of 4 input channels; nothing to prune")
    return pruned, skipped


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


def check_2of4_onnx(path: Path) -> SparsityInfo:
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
    return SparsityInfo(checked_in=path.name, fraction_groups_2of4=groups_ok / groups_all if groups_all else 0.0,
                        fraction_weights_2of4=weights_ok / weights_all if weights_all else 0.0, groups=groups_all,
                        weights=weights_all, zero_fraction=zeros / weights_all if weights_all else 0.0,
                        ineligible_weights=ineligible, violating_weights=violating)


# -- channel pruning ---------------------------------------------------------------------------------
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


def ops_and_params(module: Any, example: tuple[Any, ...]) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example)
    return int(macs), int(params)


def prune_channels(module: Any, example: tuple[Any, ...], ratio: float, round_to: int | None) -> list[str]:
    """Remove ``ratio`` of the channels of every prunable layer of ``module`` in place (torch-pruning);
    return the layers left whole (the output layer)."""
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
    return [names.get(m, "?") for m in ignored]


def _as_list(out: Any) -> list[Any]:
    from core.models import output_list

    return output_list(out)
