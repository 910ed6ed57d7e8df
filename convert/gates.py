"""Accuracy gates: every variant is checked against the FP32 model on held-out inputs.

- :class:`convert.heldout.HeldOutEvaluator` runs the FP32 ONNX model once on the held-out inputs (never
  the calibration samples), then each variant on the same inputs: top-1 agreement, max/mean abs error,
  cosine (plain, and centered: :func:`core.metrics.centered_cosine`) and, with labels, accuracy
  (:func:`core.metrics.accuracy_stats`, the statistics ``bench`` reports).
- :func:`gate_verdict` applies ``--max-accuracy-drop`` (top-1 points; agreement where there are no labels);
  a constant or all-zero FP32 output fails it as "not measurable".
- :func:`rank_nodes` ranks quantized nodes by the error each one *adds* (relative error of its output
  minus that of its inputs, FP32 vs QDQ, on calibration samples); :func:`auto_search` uses it for
  ``--auto``: try the calibration methods, then keep the worst nodes in FP32 until within budget.
- :func:`check_gates` turns failed gates, and optional variants that could not be made
  (``Manifest.failed_variants``), into one ``AccuracyGateError`` after everything else was written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convert.config import Budget, CalibMethod
from core.errors import AccuracyGateError
from core.manifest import Manifest
from core.metrics import AccuracyStats, accuracy_drop, unmeasured_drop
from core.records import AutoRecord, GateResult, NodeRank, PruneParams, SparsityParams, TrialRecord
from runtimes.ort import ort_session


def gate_verdict(stats: AccuracyStats, budget: Budget, random_init: bool = False) -> GateResult:
    """The gate record kept in the manifest: the drop (and its basis, see ``core.metrics.accuracy_drop``)
    against the points budget, the worst output cosine against the smallest allowed, passed, and the reason
    when it failed. A constant or all-zero FP32 output that the drop rests on fails the gate with that one line
    (nothing was measured: zeros against zeros is no pass)."""
    if (unmeasured := unmeasured_drop(stats, random_init, "held-out inputs")) is not None:
        return GateResult(drop_points=None, basis="not measurable", budget_points=budget.max_accuracy_drop,
                          passed=False, samples=stats.samples, cosine=stats.cosine, min_cosine=budget.min_cosine,
                          reason=unmeasured)
    drop, basis = accuracy_drop(stats, random_init)
    why = []
    if drop > budget.max_accuracy_drop + 1e-9:
        why.append(f"lost {drop:.2f} points of {basis} (budget {budget.max_accuracy_drop:g})")
    if stats.cosine < budget.min_cosine:
        why.append(f"output cosine {stats.cosine:.4f} < {budget.min_cosine:g}")
    return GateResult(drop_points=round(drop, 4), basis=basis, budget_points=budget.max_accuracy_drop,
                      passed=not why, samples=stats.samples, cosine=stats.cosine, min_cosine=budget.min_cosine,
                      reason="; ".join(why) or None)


def summary_line(stats: AccuracyStats, gate: GateResult) -> str:
    parts = []
    if stats.top1_agreement is not None:
        parts.append(f"top-1 agree {100 * stats.top1_agreement:.1f}%")
    if stats.top1_acc is not None and stats.ref_top1_acc is not None:
        parts.append(f"acc {100 * stats.top1_acc:.1f}% (fp32 {100 * stats.ref_top1_acc:.1f}%)")
    parts.append(f"cos {stats.cosine:.4f}" + ("" if stats.centered_cosine is None else
                                                f" (centered {stats.centered_cosine:.4f})"))
    if gate.passed is not None:
        parts.append("gate ok" if gate.passed else f"gate FAILED: {gate.reason}")
    return ", ".join(parts) + f" on {stats.samples} held-out"


def check_gates(manifest: Manifest) -> None:
    """Raise one AccuracyGateError naming every variant that failed its gate or onnx.checker (they stay in the
    manifest, marked failed, so ``bench`` leaves them out unless named) and every optional variant that could not be
    made (``Manifest.failed_variants``: no file, so nothing lists it as a candidate). A variant that ``--recover``
    fine-tuned into a ``*_recovered`` child is that child's starting point: its own gate is recorded, the child's
    counts."""
    failed: list[str] = []
    widen: list[str] = []  # the flags that set the budgets the failed variants missed
    # an unrecovered variant whose fine-tuned child (--recover) exists: kept for comparison, not a failure
    superseded = {a.parent for a in manifest.artifacts.values()
                  if isinstance(a.params, SparsityParams | PruneParams) and a.params.training is not None}
    for a in manifest.artifacts.values():
        if a.name in superseded and a.metrics.checker != "failed":
            continue
        if a.metrics.gate is not None and a.metrics.gate.passed is False:
            reason = a.metrics.gate.reason or "is outside its budget"
            failed.append(f"{a.name} {reason}")
            flags = (["--max-accuracy-drop", "--min-cosine"] if a.metrics.generation is None else
                     [f for word, f in (("agreement", "--min-token-agreement"), ("cosine", "--min-cosine"),
                                        ("perplexity", "--max-perplexity-increase")) if word in reason])
            widen += [f for f in flags if f not in widen]
        elif a.status == "failed" and a.metrics.checker == "failed":
            failed.append(f"{a.name} fails onnx.checker")
    parts = []
    if failed:
        parts.append("variant gate failed: " + "; ".join(failed)
                     + " -> marked failed in manifest.json; bench leaves it out unless --variants names it (widen the "
                       f"gate with {' / '.join(widen or ['--max-accuracy-drop', '--min-cosine'])}; for INT8 try --auto "
                       "or another --calib-method)")
    if not_made := [f for f in manifest.failed_variants if f.status == "failed"]:
        skipped = [f.name for f in manifest.failed_variants if f.status == "skipped"]
        parts.append("variant not made: " + "; ".join(f"{f.name}: {f.reason}" for f in not_made)
                     + (f" (so not made either: {', '.join(skipped)})" if skipped else "")
                     + " -> listed in manifest.json's failed_variants; everything else was written")
    if parts:
        raise AccuracyGateError(" | ".join(parts))


# -- node sensitivity ------------------------------------------------------------------------------

@dataclass
class NodeScore:
    node: str
    op_type: str
    added_error: float  # relative L2 error of the output minus the worst of its inputs


def _float_tensor_types(model: Any) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _with_outputs(model: Any, names: Iterable[str]) -> bytes:
    """The model serialised with ``names`` (float tensors) added as graph outputs."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for n in names:
        if n not in present:
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
            present.add(n)
    return m.SerializeToString()


def rank_nodes(float_path: Path, qdq_path: Path, batches: Iterable[dict[str, np.ndarray]]) -> list[NodeScore]:
    """Quantized nodes of ``qdq_path`` ranked by the relative error they add, worst first.

    A tensor's error is ||qdq - fp32|| / ||fp32|| of what its consumers see (the DequantizeLinear output
    in the QDQ model, against the same tensor of the FP32 model); what a node *adds* is its output's
    error minus the largest error among its quantized activation inputs, so a node is not blamed for
    what arrived from upstream. The QDQ graph is walked as written (the quantizer fuses Conv+Relu and
    renames graph outputs ``X_QuantizeLinear_Input``); node names are those ``nodes_to_exclude`` takes.
    """
    import onnx
    from onnx import TensorProto

    fmodel = onnx.load(str(float_path))
    qmodel = onnx.load(str(qdq_path))
    ftypes = _float_tensor_types(fmodel)
    q_in = {n.output[0]: n.input[0] for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    q_of = {n.input[0]: n.output[0] for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    dq_in = {n.output[0]: n.input[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}

    def float_name(t: str) -> str | None:
        for name in (t, t.removesuffix("_QuantizeLinear_Input")):
            if ftypes.get(name) == TensorProto.FLOAT:
                return name
        return None

    # (node, [(qdq tensor, fp32 tensor) of quantized activation inputs], [(qdq tensor, fp32 tensor) of outputs])
    candidates: list[tuple[Any, list[tuple[str, str]], list[tuple[str, str]]]] = []
    for node in qmodel.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not node.name:
            continue
        ins = [(i, f) for i in node.input if i in dq_in and dq_in[i] in q_in
               and (f := float_name(q_in[dq_in[i]])) is not None]
        if not ins:
            continue  # left in FP32 by the quantizer
        outs = [(dq_of.get(q_of.get(o, ""), o), f) for o in node.output if (f := float_name(o)) is not None]
        if outs:
            candidates.append((node, ins, outs))
    pairs = sorted({p for _, ins, outs in candidates for p in [*ins, *outs]})
    fsess = ort_session(_with_outputs(fmodel, {f for _, f in pairs}))
    qsess = ort_session(_with_outputs(qmodel, {q for q, _ in pairs}))
    fnames = [o.name for o in fsess.get_outputs()]
    qnames = [o.name for o in qsess.get_outputs()]
    err2 = dict.fromkeys(pairs, 0.0)
    ref2 = dict.fromkeys(pairs, 0.0)
    for feed in batches:  # accumulate over batches: one batch of activations in memory at a time
        fo = dict(zip(fnames, fsess.run(fnames, feed), strict=True))
        qo = dict(zip(qnames, qsess.run(qnames, feed), strict=True))
        for q, f in pairs:
            a, b = np.asarray(fo[f], np.float64), np.asarray(qo[q], np.float64)
            err2[(q, f)] += float(np.sum((a - b) ** 2))
            ref2[(q, f)] += float(np.sum(a * a))
    rel = {p: float(np.sqrt(err2[p] / max(ref2[p], 1e-30))) for p in pairs}
    scores = [NodeScore(node=n.name, op_type=n.op_type,
                        added_error=max(rel[o] for o in outs) - max(rel[i] for i in ins))
              for n, ins, outs in candidates]
    return sorted(scores, key=lambda s: s.added_error, reverse=True)


# -- --auto ----------------------------------------------------------------------------------------

@dataclass
class Trial:
    method: CalibMethod
    fp32_nodes: list[str]
    stats: AccuracyStats
    gate: GateResult
    path: Path

    def record(self) -> TrialRecord:
        return TrialRecord(method=self.method, fp32_nodes=len(self.fp32_nodes), drop_points=self.gate.drop_points,
                           passed=self.gate.passed, cosine=round(self.stats.cosine, 6))

    @property
    def drop(self) -> float:
        """The gate's drop in points (inf when nothing could be compared, so it is never preferred)."""
        return float("inf") if self.gate.drop_points is None else self.gate.drop_points


@dataclass
class AutoResult:
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    ranking: list[NodeScore] = field(default_factory=list)
    reason: str = ""

    def record(self) -> AutoRecord:
        kept = set(self.best.fp32_nodes)
        return AutoRecord(chosen_method=self.best.method, fp32_nodes=self.best.fp32_nodes, reason=self.reason,
                          trials=[t.record() for t in self.trials],
                          ranking_top=[NodeRank(node=s.node, op_type=s.op_type, added_error=round(s.added_error, 6),
                                                kept_fp32=s.node in kept) for s in self.ranking[:20]])


def auto_search(methods: list[CalibMethod], budget: float, build: Callable[[CalibMethod, list[str]], Trial],
                rank: Callable[[Trial], list[NodeScore]], log: Callable[[str], None]) -> AutoResult:
    """``--auto``: each calibration method in turn (stop at the first within budget); if none is, take the
    best method and keep its most error-adding nodes in FP32 — 1, 2, 4, ... of them — until within
    budget (or every quantized node is in FP32, which then fails the gate honestly)."""
    trials: list[Trial] = []
    for m in methods:
        t = build(m, [])
        trials.append(t)
        log(f"  --auto: {m}: drop {t.drop:.2f} points (budget {budget:g})")
        if t.gate.passed:
            return AutoResult(best=t, trials=trials, reason=f"{m} calibration is within budget with every "
                                                             "supported node quantized")
    best = min(trials, key=lambda t: (t.drop, -t.stats.cosine))
    ranking = rank(best)
    if not ranking:
        return AutoResult(best=best, trials=trials, reason="no method is within budget and no quantized node "
                                                           "could be ranked")
    k = 1
    current = best
    while True:
        k = min(k, len(ranking))
        keep = [s.node for s in ranking[:k]]
        t = build(best.method, keep)
        trials.append(t)
        log(f"  --auto: {best.method} with the {k} most error-adding node(s) in FP32: drop "
            f"{t.drop:.2f} points")
        current = t
        if t.gate.passed:
            return AutoResult(best=t, trials=trials, ranking=ranking,
                              reason=f"no calibration method alone was within budget; {best.method} was closest "
                                     f"({best.drop:.2f} points), and keeping its {k} most "
                                     "error-adding node(s) in FP32 brings it within budget")
        if k == len(ranking):
            return AutoResult(best=current, trials=trials, ranking=ranking,
                              reason="still over budget with every ranked node in FP32")
        k *= 2
