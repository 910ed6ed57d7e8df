"""Generation-aware validation of a decoder exported with its KV cache: greedy decoding, not one forward pass.

From the same seeded prompts (token ids inside the vocabulary, one batch), each model decodes greedily: a prefill on
the prompt, then one token per step through ONNX Runtime's :class:`runtimes.session.KVCacheSession` (the past fed back
each step). The decoding, the teacher-forced and no-cache logits and the cosine are the generation benchmark's own
(:mod:`runtimes.decoding`: ``greedy``, ``forced_logits``, ``no_cache_logits``, ``cosines``); this module adds the
records and the gate. Models are compared step by step *along the reference's tokens* (each step is fed the token the reference
chose, so every step's logits answer the same question): the share of steps whose greedy token equals the
reference's (token agreement) and the logits cosine of every step (the worst is kept). Each model's own free-running
continuation is also compared (how much of the reference's it reproduces before the first difference).

- The FP32 ONNX model (the variants' reference, ``opt`` or ``fp32``) against eager PyTorch: transformers'
  ``AutoModelForCausalLM`` loaded from the ``hf:`` folder, decoding with its own cache.
- Every variant (``fp16``, ``int8_dynamic``, ``int8_static_*``, ``int4``) against the FP32 ONNX model: its gate
  (:class:`convert.config.GenerationGate`: smallest token agreement, smallest step cosine) replaces the held-out gate
  of one forward pass on random inputs (whose random past values no decoding produces); outside it the variant is
  marked failed and convert exits non-zero, as for any gate.
- Each model's KV-cache path against its no-cache path: one forward over the whole sequence (prompt and the chosen
  tokens) with an empty past gives the logits of every position the cached steps produced.

Random-init weights get agreement and cosine only (no perplexity: there is no text they model), and the record says
so. Results are ``ArtifactMetrics.generation`` (:class:`core.records.GenerationCheck`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.config import GenerationGate
from convert.context import ConvertContext
from core.errors import BackendUnavailableError, InputError, first_line
from core.hf import PREFIX
from core.iospec import IOSpec
from core.manifest import Artifact, Manifest
from core.records import CacheCheck, GateResult, GenerationCheck, GenerationCompare
from runtimes.decoding import (
    Decoder,
    RunnerDecoder,
    TorchDecoder,
    cosines,
    forced_logits,
    greedy,
    no_cache_logits,
)
from runtimes.session import has_kv_cache, is_seq2seq

#: the basis the gate records
BASIS = "greedy token agreement with FP32 (teacher-forced steps)"


@dataclass
class Decoded:
    """A greedy decoding: the tokens chosen (prompts x steps) and each step's last-position logits (steps x prompts x
    vocab); step 0 is the prefill's."""

    tokens: np.ndarray
    logits: np.ndarray


def seeded_prompts(spec: IOSpec, gate: GenerationGate, seed: int) -> np.ndarray:
    """``gate.prompts`` prompts of ``gate.prompt_length`` token ids inside the vocabulary (the IOSpec's range of
    ``input_ids``, read from the embedding table), from ``seed``."""
    ids = spec.input("input_ids")
    low, high = ids.int_range or (0, 100)
    return np.random.default_rng(seed).integers(low, high, size=(gate.prompts, gate.prompt_length)).astype(ids.dtype)


# -- decoding: runtimes.decoding's greedy loop (the generation benchmark's) --------------------------------------------
@contextmanager
def ort_runner(manifest: Manifest, base: Path, art: Artifact) -> Iterator[Any]:
    """A loaded ONNX Runtime runner over ``art`` (one thread: small decode steps on a shared CPU)."""
    from runtimes.base import RunnerOptions
    from runtimes.ort import OrtRunner

    with OrtRunner(manifest, base, art, RunnerOptions(threads=1, ort_spinning=False)) as runner:
        yield runner


@contextmanager
def variant_runner(manifest: Manifest, base: Path, art: Artifact) -> Iterator[Any]:
    """The runner a variant is graded on: ONNX Runtime, or OpenVINO for an OpenVINO IR (``--int4-ov``; one thread)."""
    if art.kind != "openvino_ir":
        with ort_runner(manifest, base, art) as runner:
            yield runner
        return
    from runtimes.base import RunnerOptions
    from runtimes.openvino import OpenVinoRunner

    with OpenVinoRunner(manifest, base, art, RunnerOptions(threads=1)) as runner:
        yield runner


def decode(decoder: Decoder, prompt: np.ndarray, steps: int) -> Decoded:
    """The decoder's own greedy decoding (prefill + ``steps`` steps) through its KV-cache session."""
    trace = greedy(decoder, prompt, steps, keep_logits=True)
    return Decoded(tokens=trace.tokens, logits=np.stack(trace.logits).astype(np.float32))


def eager_decoder(manifest: Manifest, base: Path) -> TorchDecoder:
    """Eager PyTorch from the ``hf:`` folder (its own weights, nothing downloaded), loaded."""
    source = manifest.source.model
    decoder = TorchDecoder(manifest, base, Path(source.removeprefix(PREFIX)), compiled=False, threads=None,
                           saved_weights=False)
    try:
        decoder.load()
    except BackendUnavailableError as exc:
        raise InputError(f"generation check: {exc}") from None
    return decoder


# -- comparisons ----------------------------------------------------------------------------------------------------
def compare(reference: str, ref: Decoded, along: np.ndarray, own: Decoded | None = None) -> GenerationCompare:
    """A model's logits along ``ref``'s tokens (``along``) against ``ref``; ``own``: its free-running decoding."""
    agree = along.argmax(-1) == ref.tokens.T  # steps x prompts
    cos = cosines(along, ref.logits)
    per_step = cos.min(axis=1)
    free = None
    if own is not None:
        same = own.tokens == ref.tokens
        first_diff = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
        free = round(float(np.mean(first_diff / same.shape[1])), 4)
    return GenerationCompare(reference=reference, steps=int(ref.tokens.shape[1]),
                             token_agreement=round(float(agree.mean()), 4), min_cosine=round(float(cos.min()), 6),
                             mean_cosine=round(float(cos.mean()), 6),
                             step_cosines=[round(float(c), 6) for c in per_step], free_run_match=free)


def cache_check(cached: np.ndarray, no_cache: np.ndarray) -> CacheCheck:
    return CacheCheck(positions=int(cached.shape[0]), max_abs_diff=float(np.abs(cached - no_cache).max()),
                      min_cosine=round(float(cosines(cached, no_cache).min()), 6))


def undecodable(art: Artifact, name: str, exc: Exception, log: Any) -> None:
    """A variant its runtime could not decode: its gate fails with the first line of why."""
    why = f"greedy decoding failed: {first_line(exc, with_type=True)}"
    art.metrics.gate = GateResult(drop_points=None, basis=BASIS, budget_points=None, passed=False, samples=0,
                                  reason=why)
    art.metrics.summary, art.status = f"gate FAILED: {why}", "failed"
    log(f"  {name}: {why}")


def generation_gate(cmp: GenerationCompare, gate: GenerationGate) -> GateResult:
    """The gate of a variant from its comparison with FP32: agreement (in points) and the worst step cosine."""
    drop = 100.0 * (1.0 - cmp.token_agreement)
    budget = 100.0 * (1.0 - gate.min_token_agreement)
    why = []
    if cmp.token_agreement < gate.min_token_agreement - 1e-9:
        why.append(f"greedy token agreement with FP32 {100 * cmp.token_agreement:.1f}% < "
                   f"{100 * gate.min_token_agreement:g}%")
    if cmp.min_cosine < gate.min_cosine:
        why.append(f"logits cosine {cmp.min_cosine:.4f} < {gate.min_cosine:g} at a decode step")
    return GateResult(drop_points=round(drop, 4), basis=BASIS, budget_points=round(budget, 4), passed=not why,
                      samples=cmp.steps * gate.prompts, cosine=cmp.min_cosine, min_cosine=gate.min_cosine,
                      reason="; ".join(why) or None)


def summary(check: GenerationCheck, gate: GateResult | None) -> str:
    parts = []
    for cmp in (check.vs_fp32, check.vs_eager):
        if cmp is not None:
            parts.append(f"greedy vs {cmp.reference}: agree {100 * cmp.token_agreement:.1f}%, min cos "
                         f"{cmp.min_cosine:.4f}")
    parts.append(f"cache vs no-cache cos {check.cache.min_cosine:.6f}")
    if gate is not None and gate.passed is not None:
        parts.append("gate ok" if gate.passed else f"gate FAILED: {gate.reason}")
    return ", ".join(parts) + f" ({check.prompts}x{check.new_tokens} tokens)"


# -- the step over an artifact folder -------------------------------------------------------------------------------
@dataclass
class GenerationRun:
    """What every model's check shares: the prompts, the FP32 reference's decoding and the eager one."""

    gate: GenerationGate
    seed: int
    prompt: np.ndarray
    reference: str
    ref: Decoded
    eager: Decoded | None
    random_init: bool

    def check(self, runner: Any, is_reference: bool) -> GenerationCheck:
        return self.check_decoder(RunnerDecoder(runner), is_reference)

    def check_decoder(self, decoder: Decoder, is_reference: bool) -> GenerationCheck:
        steps = self.gate.new_tokens
        own = self.ref if is_reference else decode(decoder, self.prompt, steps)
        along_ref = self.ref.logits if is_reference else forced_logits(decoder, self.prompt, self.ref.tokens)
        vs_fp32 = None if is_reference else compare(self.reference, self.ref, along_ref, own)
        vs_eager = None
        if self.eager is not None:
            vs_eager = compare("eager", self.eager, forced_logits(decoder, self.prompt, self.eager.tokens), own)
        cache = cache_check(along_ref, no_cache_logits(decoder, self.prompt, self.ref.tokens))
        note = ("random-init weights: token agreement and logits cosine only (no perplexity: they model no text)"
                if self.random_init else
                "token agreement and logits cosine on seeded prompts; perplexity needs text (the generation benchmark)")
        if self.eager is None:
            note += "; no eager comparison (no hf: folder to load the PyTorch model from)"
        return GenerationCheck(prompts=self.gate.prompts, prompt_length=self.gate.prompt_length, new_tokens=steps,
                               seed=self.seed, vs_fp32=vs_fp32, vs_eager=vs_eager, cache=cache,
                               random_init=self.random_init, note=note)


def start(manifest: Manifest, base: Path, reference: str, gate: GenerationGate, seed: int,
          random_init: bool) -> GenerationRun:
    """The prompts, the FP32 reference's greedy decoding and (for an ``hf:`` model) eager PyTorch's."""
    prompt = seeded_prompts(manifest.iospec, gate, seed)
    with ort_runner(manifest, base, manifest.artifacts[reference]) as runner:
        ref = decode(RunnerDecoder(runner), prompt, gate.new_tokens)
    eager = None
    if manifest.source.kind == "hf":
        model = eager_decoder(manifest, base)
        try:
            eager = decode(model, prompt.astype(np.int64), gate.new_tokens)
        finally:
            model.close()
    return GenerationRun(gate=gate, seed=seed, prompt=prompt, reference=reference, ref=ref, eager=eager,
                         random_init=random_init)


def grade_generation(manifest: Manifest, base: Path, reference: str, variants: list[str], gate: GenerationGate,
                     seed: int, random_init: bool, log: Any = print) -> None:
    """Check ``reference`` (against eager, and its cache against no cache) and grade each of ``variants`` against it
    by greedy decoding; each artifact's ``metrics.generation`` is set, each variant's gate is the generation gate
    (``status`` failed when it fails, or when onnx.checker failed)."""
    if is_seq2seq(manifest):  # an encoder-decoder's components: its own loop (runtimes.seq2seq)
        grade_seq2seq(manifest, base, reference, variants, gate, seed, random_init, log)
        return
    if not has_kv_cache(manifest.iospec) or manifest.artifacts[reference].components:
        return
    log(f"generation check: greedy decoding of {gate.prompts} seeded prompt(s) of {gate.prompt_length} tokens, "
        f"{gate.new_tokens} new tokens, KV-cache path vs no-cache path; variants gated against {reference} "
        f"(agreement >= {100 * gate.min_token_agreement:g}%, step cosine >= {gate.min_cosine:g})")
    run = start(manifest, base, reference, gate, seed, random_init)
    for name in [reference, *variants]:
        art = manifest.artifacts[name]
        try:
            with variant_runner(manifest, base, art) as runner:
                check = run.check(runner, is_reference=name == reference)
        except Exception as exc:  # a variant ONNX Runtime cannot decode with fails its gate, the others go on
            if name == reference:
                raise
            undecodable(art, name, exc, log)
            continue
        art.metrics.generation = check
        verdict = None
        if check.vs_fp32 is not None:
            verdict = generation_gate(check.vs_fp32, gate)
            art.metrics.gate = verdict
            art.metrics.summary = summary(check, verdict)
            art.status = "failed" if verdict.passed is False or art.metrics.checker == "failed" else "ok"
        log(f"  {name}: {summary(check, verdict)}")


# -- encoder-decoders: the components decoded together --------------------------------------------------------------
def _seq2seq_decoder(manifest: Manifest, base: Path, name: str, path: str | None = None) -> Decoder:
    """An ONNX variant's encoder and decoder (``path``: merged, split) on ONNX Runtime, one thread, loaded."""
    from runtimes.base import RunnerOptions
    from runtimes.seq2seq import Seq2SeqOnnxDecoder

    d = Seq2SeqOnnxDecoder(manifest, base, name, "ort", RunnerOptions(threads=1, ort_spinning=False), path=path)
    d.load()
    return d


def _seq2seq_paths(art: Artifact) -> list[str]:
    """The decoders with a cache a variant has: the merged one and/or the decoder with past (each is checked, so a
    broken one fails whichever path a runtime takes)."""
    from runtimes.seq2seq import DECODER, MERGED, WITH_PAST

    return [p for p, needs in (("merged", {MERGED}), ("split", {DECODER, WITH_PAST})) if needs <= set(art.components)]


def _worst(checks: dict[str, GenerationCheck]) -> tuple[str, GenerationCheck]:
    def key(item: tuple[str, GenerationCheck]) -> tuple[float, float]:
        cmp = item[1].vs_fp32 or item[1].vs_eager
        return (cmp.token_agreement, cmp.min_cosine) if cmp is not None else (1.0, item[1].cache.min_cosine)

    return min(checks.items(), key=key)


def grade_seq2seq(manifest: Manifest, base: Path, reference: str, variants: list[str], gate: GenerationGate,
                  seed: int, random_init: bool, log: Any = print) -> None:
    """:func:`grade_generation` for an encoder-decoder (:mod:`runtimes.seq2seq`): seeded sources (token ids, or audio
    features), the encoder once, then greedy decoding from the decoder start token. The reference's merged decoder
    (else its split one) is the variants' reference; every cache path of every artifact (merged decoder, decoder with
    past) is decoded and compared: a variant against the reference (its gate), the reference against eager PyTorch
    (gated too: a component that breaks decoding fails convert), each against its no-cache path (``decoder_model``
    over the whole sequence). The artifact's ``metrics.generation`` is its worst path's."""
    from runtimes.decoding import hf_folder
    from runtimes.seq2seq import Seq2SeqTorchDecoder, audio_window, seeded_sources, start_token

    try:
        start_token(hf_folder(manifest), manifest)
    except InputError as exc:  # transformers' generate cannot decode it either: no generation check, said so
        log(f"generation check skipped: {exc}")
        return
    log(f"generation check (encoder-decoder): greedy decoding of {gate.prompts} seeded source(s), {gate.new_tokens} "
        f"new tokens, every decoder path with its cache vs its no-cache path; {reference} gated against eager "
        f"PyTorch, variants against {reference} (agreement >= {100 * gate.min_token_agreement:g}%, step cosine >= "
        f"{gate.min_cosine:g})")
    # token sources of gate.prompt_length; audio: the encoder's whole window
    prompt = seeded_sources(manifest, gate.prompts, gate.prompt_length if audio_window(manifest) is None else None, seed)
    ref_decoder = _seq2seq_decoder(manifest, base, reference)
    try:
        ref = decode(ref_decoder, prompt, gate.new_tokens)
    finally:
        ref_decoder.close()
    eager = None
    folder = hf_folder(manifest)
    if folder is not None:
        model = Seq2SeqTorchDecoder(manifest, base, folder, saved_weights=False)
        try:
            model.load()
        except BackendUnavailableError as exc:
            raise InputError(f"generation check: {exc}") from None
        try:
            eager = decode(model, prompt, gate.new_tokens)
        finally:
            model.close()
    run = GenerationRun(gate=gate, seed=seed, prompt=prompt, reference=reference, ref=ref, eager=eager,
                        random_init=random_init)
    for name in [reference, *variants]:
        art = manifest.artifacts[name]
        is_ref = name == reference
        checks: dict[str, GenerationCheck] = {}
        verdicts: dict[str, GateResult] = {}
        try:
            for path in _seq2seq_paths(art):
                decoder = _seq2seq_decoder(manifest, base, name, path)
                try:
                    checks[path] = run.check_decoder(decoder, is_reference=False)
                finally:
                    decoder.close()
                cmp = checks[path].vs_eager if is_ref else checks[path].vs_fp32
                if cmp is not None:
                    verdicts[path] = generation_gate(cmp, gate)
                if (cos := checks[path].cache.min_cosine) < gate.min_cosine:  # its decoder_model disagrees
                    v = verdicts.get(path) or GateResult(drop_points=None, basis=BASIS, budget_points=None,
                                                         passed=True, samples=0)
                    why = f"KV-cache path vs no-cache path (decoder_model) logits cosine {cos:.4f} < {gate.min_cosine:g}"
                    verdicts[path] = v.model_copy(update={"passed": False,
                                                          "reason": "; ".join(filter(None, [v.reason, why]))})
        except Exception as exc:  # a variant ONNX Runtime cannot decode fails its gate, the others go on
            if is_ref:
                raise
            undecodable(art, name, exc, log)
            continue
        path, check = _worst(checks)
        check.note += "; decoder paths checked: " + ", ".join(checks)
        if is_ref:
            check.vs_fp32 = None
        art.metrics.generation = check
        failed = [f"{p} decoder: {v.reason}" for p, v in verdicts.items() if v.passed is False]
        verdict = verdicts.get(path) or next(iter(verdicts.values()), None)
        if verdict is not None and failed:
            verdict = verdict.model_copy(update={"passed": False, "reason": "; ".join(failed)})
        if verdict is not None and (failed or not is_ref):
            art.metrics.gate = verdict if failed or art.metrics.gate is None or art.metrics.gate.passed else \
                art.metrics.gate
            if failed:
                art.status = "failed"
        text = summary(check, verdict)
        art.metrics.summary = text if not art.metrics.summary else f"{art.metrics.summary}; {text}"
        log(f"  {name} ({', '.join(checks)}): {text}")


def grade_new_variants(ctx: ConvertContext, gate: GenerationGate, reference: str, before: set[str],
                       random_init: bool) -> None:
    """After the variant steps of a one-file decoder with a KV cache: the generation check of ``reference`` and of
    every ONNX artifact made since ``before`` (the artifact names then)."""
    made = [n for n, a in ctx.manifest.artifacts.items() if n not in before and a.kind in ("onnx", "openvino_ir")]
    if made:
        grade_generation(ctx.manifest, ctx.out, reference, made, gate, ctx.cfg.export.seed, random_init, ctx.log)
        if gate.text is not None:  # --eval-text: each variant's perplexity against the reference's (its own module)
            from convert.genperplexity import grade_perplexity

            grade_perplexity(ctx.manifest, ctx.out, reference, made, gate, ctx.cfg.export.seed, variant_runner,
                             ctx.log)
