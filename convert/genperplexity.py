"""Convert's perplexity gate for a decoder with a KV cache (``convert --eval-text FILE|stdlib``).

Greedy token agreement (``convert.genvalidate``) says whether a variant decodes as FP32 does on seeded prompts; it
cannot say how much worse the variant models text. With held-out text given, each variant's perplexity on it is
measured beside the reference's (the FP32 ONNX model, on the same windows, the same runtime) and gated: a variant
whose perplexity is more than ``max_perplexity_increase`` (default 0.05: 5%) above FP32's fails its gate (marked
failed, exit 5, as for the agreement gate). The numbers go to each artifact's ``metrics.generation.perplexity``
(:class:`core.records.PerplexityCheck`) beside the agreement numbers.

The text is ``calibration.text.heldout_text`` (``stdlib``: the held-out standard library files, never a source of
calibration or training; or a UTF-8 file), tokenized by the model's own tokenizer where its Hugging Face folder has
one, else as bytes; windows of at most ``calibration.text.PPL_WINDOW`` tokens within the model's positions, the
formula ``runtimes.generation.perplexity`` (the generation benchmark's). Random-init weights model no language: the
gate then compares the variants with FP32 (their relative change is still a change in the model's function), and the
record says so.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from convert.config import GenerationGate
from core.errors import InputError, first_line
from core.manifest import Artifact, Manifest
from core.records import GateResult, PerplexityCheck

BASIS = "perplexity on held-out text against FP32"
#: opens the loaded runner a variant is measured on (``convert.genvalidate.variant_runner``)
RunnerFor = Callable[[Manifest, Path, Artifact], AbstractContextManager[Any]]


def perplexity_gate(ppl: float, ref: float, gate: GenerationGate, basis: str) -> tuple[PerplexityCheck, str | None]:
    """The record of a variant's perplexity ``ppl`` against the reference's ``ref``, and why it fails (None: it
    passes)."""
    increase = ppl / ref - 1.0
    check = PerplexityCheck(perplexity=round(ppl, 6), fp32_perplexity=round(ref, 6), increase=round(increase, 6),
                            max_increase=gate.max_perplexity_increase, basis=basis)
    if increase > gate.max_perplexity_increase + 1e-12:
        return check, (f"perplexity {ppl:.4g} is {100 * increase:.2f}% above FP32's {ref:.4g} (budget "
                       f"{100 * gate.max_perplexity_increase:g}%)")
    return check, None


def _fail(art: Any, why: str) -> None:
    """Fail ``art``'s gate with ``why`` (added to an agreement gate's own reason when that failed too)."""
    gate = art.metrics.gate
    if gate is None:
        art.metrics.gate = GateResult(drop_points=None, basis=BASIS, budget_points=None, passed=False, samples=0,
                                      reason=why)
    else:
        reason = "; ".join([gate.reason, why] if gate.passed is False and gate.reason else [why])
        art.metrics.gate = gate.model_copy(update={"passed": False, "reason": reason})
    art.status = "failed"


def grade_perplexity(manifest: Manifest, base: Path, reference: str, variants: list[str], gate: GenerationGate,
                     seed: int, runner_for: RunnerFor, log: Any = print) -> None:
    """Measure the reference's and each of ``variants``' perplexity on ``gate.text`` and gate each variant (see the
    module docstring), each on the runner ``runner_for`` opens for it (the agreement check's,
    ``convert.genvalidate.variant_runner``). Runs after the agreement check (``grade_generation``): a variant it could
    not decode (no ``metrics.generation``) is left as it failed."""
    from runtimes.decoding import RunnerDecoder
    from runtimes.generation import held_out, perplexity
    from runtimes.session import is_generation_artifact, is_seq2seq

    if gate.text is None:
        return
    if not is_generation_artifact(manifest) or is_seq2seq(manifest):
        raise InputError("--eval-text: perplexity is gated on a decoder-only model exported with its KV cache "
                         "(--task text-generation-with-past)")
    windows, basis, _ = held_out(manifest, gate.text, seed)
    log(f"perplexity gate: {basis}; variants within +{100 * gate.max_perplexity_increase:g}% of {reference}'s")

    def measure(name: str) -> float:
        with runner_for(manifest, base, manifest.artifacts[name]) as runner:
            return perplexity(RunnerDecoder(runner), windows)

    ref = measure(reference)
    ref_art = manifest.artifacts[reference]
    if ref_art.metrics.generation is not None:
        ref_art.metrics.generation.perplexity = PerplexityCheck(perplexity=round(ref, 6), basis=basis)
    log(f"  {reference}: perplexity {ref:.4g}")
    for name in variants:
        art = manifest.artifacts[name]
        if art.metrics.generation is None:  # its greedy decoding failed: already failed, with that reason
            continue
        try:
            ppl = measure(name)
        except Exception as exc:  # a variant the runtime cannot run on the text fails its gate, the others go on
            failure = f"perplexity not measured: {first_line(exc, with_type=True)}"
            _fail(art, failure)
            log(f"  {name}: {failure}")
            continue
        check, why = perplexity_gate(ppl, ref, gate, basis)
        art.metrics.generation.perplexity = check
        text = f"perplexity {ppl:.4g} ({100 * (check.increase or 0.0):+.2f}% vs FP32)"
        if why is not None:
            _fail(art, why)
            text += f", gate FAILED: {why}"
        art.metrics.summary = f"{art.metrics.summary}; {text}" if art.metrics.summary else text
        log(f"  {name}: {text}")
