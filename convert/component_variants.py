"""FP16 and dynamic INT8 of a model exported as several files (Optimum's encoder, decoder, decoder with past, merged
decoder): each component converted or quantized on its own, as Optimum's ``ORTQuantizer`` does file by file, and
graded against its own FP32 component on held-out inputs made for that component.

A variant is one artifact (``fp16``, ``int8_dynamic``) with the same components as its FP32 parent, each with its
file, hash, accuracy statistics and gate; the artifact's gate passes when every component's does, and its summary
names the worst component. The held-out inputs of a component are seeded random inputs of its own IOSpec (token ids
inside the vocabulary, masks of ones, a past of random values): the components take each other's outputs (the
encoder's hidden states, the decoder's cache), which user data (``--eval-data``, ``--calib``) cannot give file by
file, so those flags are refused for these models (:func:`convert.hf_export.components_only`). Static INT8 needs
calibration inputs per component for the same reason and is refused there too.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.cpu import CpuFeatures, cpu_features
from calibration.sources import DEFAULT_SYNTHETIC_SIZE
from convert.config import QuantConfig
from convert.context import ConvertContext, attempt_variant
from convert.gates import gate_verdict, summary_line
from convert.heldout import HeldOutEvaluator
from convert.ort_quant import preprocess_for_quantization, quantize_dynamic_file
from convert.precision import FP16_CONVERTER, convert_fp16
from convert.validate import structural_checks
from core.hf import MERGED
from core.iospec import IOSpec
from core.manifest import Component, Precision
from core.models import is_random_init
from core.onnxfile import copy_onnx
from core.records import ArtifactMetrics, DynamicQuantParams, Fp16Params, GateResult, StepParams


class SpecFeeds:
    """Held-out inputs of one component: seeded feeds of its IOSpec (:meth:`IOSpec.random_feed`), a batch at a time,
    so that an input without a batch axis (the merged decoder's ``use_cache_branch``) keeps its shape and a derived
    dim (``past_sequence + sequence``) follows its parts."""

    kind = "synthetic"

    def __init__(self, spec: IOSpec, size: int, seed: int, what: str) -> None:
        self.spec, self.size, self.seed, self.what = spec, size, seed, what

    def iter_labelled(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], None]]:
        for i, start in enumerate(range(0, self.size, batch_size)):
            yield self.spec.random_feed(min(batch_size, self.size - start), seed=self.seed * 1000 + i), None

    def describe(self) -> str:
        return self.what

    def manifest_record(self) -> dict[str, Any]:
        h = hashlib.sha256(self.spec.model_dump_json().encode())
        h.update(f"{self.seed}/{self.size}".encode())
        return {"source": self.what, "kind": self.kind, "sha256": h.hexdigest(), "num_samples": self.size,
                "skipped": 0, "labels": False, "warnings": []}


#: the components Optimum's merged decoder is made of (its If's two branches)
MERGED_FROM = ("decoder_model", "decoder_with_past_model")
#: builds one component's variant file (source, target) and returns nothing; raises when the library fails
Build = Callable[[Path, Path], object]


@dataclass
class ComponentState:
    """What the variants of one multi-file model share: the reference (``opt`` or ``fp32``), each component's
    held-out evaluator with the reference component's outputs, the CPU."""

    cfg: QuantConfig
    work: Path
    cpu: CpuFeatures
    reference: str
    evaluators: dict[str, HeldOutEvaluator]
    random_init: bool

    @property
    def reduce_range(self) -> bool:
        return self.cpu.needs_reduce_range if self.cfg.reduce_range is None else self.cfg.reduce_range


@dataclass(frozen=True)
class PerComponent:
    """How a row of the variant table (``convert.variants.VARIANTS``, its ``per_component``) is made for a model
    exported as several files: each component's file built on its own, graded against its own FP32 component; the
    merged decoder merged from the variant's two decoders. A row without one is refused for these models."""

    step: str  # the step a failure is recorded under (as the one-file row's attempt)
    describe: Callable[[ComponentState], str]  # the log line before the components are built
    build: Callable[[ComponentState, Path, Path], Any]  # one component: (source, target) -> what ``params`` reads
    params: Callable[[ComponentState, list[Any]], StepParams]  # the artifact's record, from every build's result
    advice: Callable[[CpuFeatures], str | None]  # this CPU's advice about the variant (logged and noted), if any


def run_component_variants(ctx: ConvertContext, cfg: QuantConfig, rows: list[tuple[str, Precision, PerComponent]]
                           ) -> None:
    """Each (name, precision, recipe) of the table's rows asked for, in order, each an optional variant (a failure
    leaves it out with its reason, as for one file). Work files go to a folder under the output folder, removed when
    the steps end."""
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=ctx.out) as work:
        state = _setup(ctx, cfg, Path(work))
        for name, precision, recipe in rows:
            _attempt(ctx, state, name, precision, recipe)


def _attempt(ctx: ConvertContext, state: ComponentState, name: str, precision: Precision,
             recipe: PerComponent) -> None:
    ctx.log(recipe.describe(state))
    results: list[Any] = []
    attempt_variant(ctx, name, recipe.step,
                    lambda: _make(ctx, state, name, precision, lambda: recipe.params(state, results),
                                  lambda src, out: results.append(recipe.build(state, src, out)),
                                  recipe.advice(state.cpu)), parent=state.reference)


#: ``fp16`` per component: ONNX Runtime's float16 converter on each file
FP16_PER_COMPONENT = PerComponent(
    step="fp16",
    describe=lambda state: "FP16 conversion of each component (ONNX Runtime's float16 converter, FP32 "
                           "inputs/outputs kept)",
    build=lambda state, src, out: convert_fp16(src, out).casts_added,
    params=lambda state, casts: Fp16Params(converter=FP16_CONVERTER, keep_io_types=True, casts_added=sum(casts),
                                           cpu=state.cpu.summary),
    advice=lambda cpu: cpu.fp16_advice())


def _int8_dynamic(state: ComponentState, src: Path, out: Path) -> None:
    prepped = out.with_suffix(".prepped.onnx")
    preprocess_for_quantization(src, prepped)
    quantize_dynamic_file(prepped, out, state.cfg, state.reduce_range)


#: ``int8_dynamic`` per component: ONNX Runtime's quantize_dynamic on each pre-processed file
INT8_DYNAMIC_PER_COMPONENT = PerComponent(
    step="quantize_dynamic",
    describe=lambda state: f"dynamic INT8 of each component (ONNX Runtime quantize_dynamic, weights "
                           f"{state.cfg.weight_type}, per-channel {state.cfg.per_channel}, reduce_range "
                           f"{state.reduce_range})",
    build=_int8_dynamic,
    params=lambda state, _: DynamicQuantParams(
        weight_type=state.cfg.weight_type, activation_type="uint8 (at run time)", per_channel=state.cfg.per_channel,
        reduce_range=state.reduce_range, exclude_nodes=[], exclude_op_types=state.cfg.exclude_op_types,
        cpu=state.cpu.summary),
    advice=lambda cpu: cpu.int8_advice(dynamic=True))


def _setup(ctx: ConvertContext, cfg: QuantConfig, work: Path) -> ComponentState:
    reference = ctx.best_fp32()
    art = ctx.manifest.artifacts[reference]
    size = min(cfg.gate.eval_size, DEFAULT_SYNTHETIC_SIZE)
    evaluators: dict[str, HeldOutEvaluator] = {}
    for stem, comp in art.components.items():
        data = SpecFeeds(comp.iospec, size, cfg.calib.seed + 1, f"{stem}: {size} seeded random inputs of its IOSpec")
        ev = HeldOutEvaluator(data, cfg.gate.eval_batch, comp.iospec.fixed_batch())
        ev.set_reference(ctx.out / comp.file.path, f"{reference}/{stem}")
        evaluators[stem] = ev
    ctx.log(f"held-out reference: {reference} (FP32), each of its {len(evaluators)} components on {size} seeded "
            "random inputs of its own (token ids inside the vocabulary, masks of ones): the components take each "
            "other's outputs, which no user data gives file by file")
    return ComponentState(cfg=cfg, work=work, cpu=cpu_features(), reference=reference, evaluators=evaluators,
                          random_init=is_random_init(ctx.manifest.source))


def _make(ctx: ConvertContext, state: ComponentState, name: str, precision: Precision,
          params: Callable[[], StepParams], build: Build, advice: str | None) -> None:
    """Variant ``name``: every component of the reference built by ``build``, copied into the output folder as
    ``STEM.NAME.onnx`` and graded on its own held-out inputs; one artifact holding them."""
    ref = ctx.manifest.artifacts[state.reference]
    made: dict[str, Component] = {}
    gates: dict[str, GateResult] = {}
    for stem, comp in ref.components.items():
        built = state.work / f"{stem}.{name}.onnx"
        if stem == MERGED and all(s in made for s in MERGED_FROM):
            _merge(state.work / f"{MERGED_FROM[0]}.{name}.onnx", state.work / f"{MERGED_FROM[1]}.{name}.onnx", built)
        else:
            build(ctx.out / comp.file.path, built)
        target = ctx.path(f"{stem}.{name}.onnx")
        copy_onnx(built, target)
        _, failures = structural_checks(target)
        ev = state.evaluators[stem]
        stats = ev.evaluate(target)
        gate = gate_verdict(stats, state.cfg.gate, state.random_init)
        if failures:
            gate = gate.model_copy(update={"passed": False, "reason": "; ".join(failures)})
        gates[stem] = gate
        made[stem] = Component(file=ctx.manifest.file_record(ctx.out, target), iospec=comp.iospec,
                               metrics=ArtifactMetrics(accuracy=stats, gate=gate, summary=summary_line(stats, gate),
                                                       checker="ok" if not failures else "failed",
                                                       held_out=ev.record()))
        ctx.log(f"  {name}/{stem}: {made[stem].metrics.summary}")
    worst = _worst(made)
    wm = made[worst].metrics
    passed = all(g.passed is not False for g in gates.values())
    failed = [s for s, g in gates.items() if g.passed is False]
    verdict = wm.gate.model_copy(update={"passed": passed,
                                         "reason": None if passed else "; ".join(f"{s}: {gates[s].reason}"
                                                                                 for s in failed)}) \
        if wm.gate is not None else None
    summary = f"{len(made)} components, worst {worst}: {wm.summary}"
    notes = [f"{len(made)} components, each {name} of its {state.reference} component, graded on its own held-out "
             "inputs (seeded random inputs of its IOSpec)"]
    if advice:
        ctx.log(f"[yellow]warning:[/] {advice}")
        notes.append(advice)
    first = next(iter(made.values()))
    art = ctx.manifest.record(ctx.out, ctx.out / first.file.path, name=name, kind="onnx", precision=precision,
                              parent=state.reference, params=params(), notes=notes,
                              metrics=ArtifactMetrics(accuracy=wm.accuracy, gate=verdict, summary=summary,
                                                      checker="ok" if all(c.metrics.checker == "ok"
                                                                          for c in made.values()) else "failed",
                                                      held_out=wm.held_out))
    art.components = made
    if not passed:
        art.status = "failed"
    ctx.log(f"{name}: {summary}")


def _merge(decoder: Path, with_past: Path, out: Path) -> None:
    """The merged decoder of a variant as Optimum makes its own (``optimum.onnx.merge_decoders``, ``strict=False``:
    the decoder with past does not output the encoder's cross-attention cache): from the variant's decoder and decoder
    with past, one If on ``use_cache_branch``. Converting or quantizing the merged file itself puts casts outside the
    If that read values inside its branches (FP16), a graph ONNX Runtime refuses."""
    from optimum.onnx import merge_decoders

    merge_decoders(decoder=decoder, decoder_with_past=with_past, save_path=out, strict=False)


def _worst(made: dict[str, Component]) -> str:
    """The component whose gate failed, else the one with the lowest output cosine."""
    def key(stem: str) -> tuple[bool, float]:
        m = made[stem].metrics
        cos = m.accuracy.cosine if m.accuracy is not None else 1.0
        return (not (m.gate is not None and m.gate.passed is False), cos)
    return min(made, key=key)
