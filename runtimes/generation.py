"""The generation benchmark: a KV-cache decoder measured as a generation loop on every backend that can run it.

A decoder exported with its cache (``convert hf:FOLDER --task text-generation-with-past``) is judged by time to
first token (the prefill step over the prompt), time per output token (each decode step feeds one token and the
cache), tokens/s and memory (the KV cache grows with every token), not by one call. Each backend runs the same
greedy loop (:func:`greedy`) through a :class:`Decoder`:

- ``ort`` and ``openvino``: every ONNX variant of the artifact through its runner's ``open_session()``, a
  ``runtimes.session.KVCacheSession`` (present fed back as past);
- ``eager`` and ``compile``: transformers' own model for the artifact's Hugging Face source folder (the manifest
  records it) with the weights convert saved, ``use_cache=True`` and its ``past_key_values``; ``compile`` wraps it in
  ``torch.compile(dynamic=True)`` (its compile time recorded apart). Its no-cache forward (checks) is eager's.

A backend that cannot run the artifact is skipped with the reason (``GenerationResults.skipped``), the others are
measured. Every target gets the same seeded prompts (one per prompt length and batch, digest recorded); per point
all targets are timed as units (session opened, prefill, decode steps) in interleaved rounds with the order rotated
(``runtimes.timing.time_units``); the prefill and decode times of each timed unit give TTFT and TPOT with the
per-round p50 interval (``LatencyStats``). Before a point is timed one untimed unit per target runs under the RSS
sampler (never during timed units): the peak RSS delta, and the cache's own bytes.

The no-cache path (each new token a full forward over prompt + tokens so far, the same file with an empty cache)
is timed beside the KV-cache path at ``no_cache_tokens`` new tokens, interleaved, for the speedup the cache gives.

Checks (:func:`check_decoders`), against eager PyTorch where it runs (else ONNX Runtime FP32, said so): free-running
greedy token agreement, agreement and logits cosine per step under teacher forcing (fed the reference's tokens, so
every step compares the same context), the KV-cache path's tokens against the no-cache path's, and perplexity on
held-out text when the caller gives it (``calibration.text``; random-init models: agreement and cosine only).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibration.text import PPL_WINDOW, PPL_WINDOWS, HeldOutText, heldout_text, next_token_nll
from core.errors import BackendUnavailableError, InputError
from core.iospec import feed_digest
from core.manifest import Manifest
from core.metrics import LatencyStats
from core.models import is_random_init
from reports.generation import GenerationAccuracy, GenerationResult, GenerationResults
from runtimes.decoding import (
    LOGITS,
    Decoder,
    GenerationConfig,
    TorchDecoder,
    Trace,
    cosines,
    greedy,
    greedy_no_cache,
    hf_folder,
    max_positions,
)
from runtimes.genbackends import generation_decoders, requested
from runtimes.session import has_kv_cache, is_seq2seq
from runtimes.timing import Timed, time_units

if TYPE_CHECKING:
    from reports.models import BenchResults


def timed_traces(traces: Sequence[Trace], warmup: int, timed: Timed) -> list[list[Trace]]:
    """The traces of ``timed``'s timed units, per round: ``time_units`` runs a target's units in a fixed order (its
    ``warmup`` units, then per round the block's untimed units and its timed ones), the same order they were
    recorded in."""
    expected = warmup + sum(timed.warmup_calls) + sum(len(r) for r in timed.rounds)
    if len(traces) != expected:
        raise RuntimeError(f"{len(traces)} generation loops recorded, {expected} run")
    out, at = [], warmup
    for block_warm, samples in zip(timed.warmup_calls, timed.rounds, strict=True):
        at += block_warm
        out.append(list(traces[at:at + len(samples)]))
        at += len(samples)
    return out


# -- the benchmark ------------------------------------------------------------------------------------------------------
def seeded_prompts(manifest: Manifest, batch: int, length: int, seed: int) -> np.ndarray:
    """Token ids drawn from the model's vocabulary (the IOSpec's range of input_ids), seeded: the same prompt for
    every target; a shorter or narrower one is a slice of the largest."""
    if is_seq2seq(manifest):  # an encoder-decoder: seeded sources (runtimes.seq2seq)
        from runtimes.seq2seq import seeded_sources
        return seeded_sources(manifest, batch, length, seed)
    r = manifest.iospec.input("input_ids").int_range
    lo, hi = r if r is not None else (0, 2)
    return np.random.default_rng(seed).integers(lo, hi, size=(batch, length), dtype=np.int64)


def prompt_plan(cfg: GenerationConfig, positions: int | None) -> tuple[list[int], int, list[str]]:
    """(the prompt lengths to time, the no-cache comparison's new tokens, notes): lengths that leave no room for
    ``new_tokens`` within the model's positions are capped to the longest that does."""
    notes: list[str] = []
    if any(n < 1 for n in [*cfg.prompt_lengths, *cfg.batch_sizes]) or not cfg.prompt_lengths or not cfg.batch_sizes:
        raise InputError(f"prompt lengths and batch sizes must be positive, got {cfg.prompt_lengths} and "
                         f"{cfg.batch_sizes}")
    lengths = sorted(set(cfg.prompt_lengths))
    no_cache = cfg.no_cache_tokens
    if positions is not None:
        room = positions - cfg.new_tokens
        if room < 1:
            raise InputError(f"--new-tokens {cfg.new_tokens} leaves no room for a prompt: the model takes "
                             f"{positions} positions")
        if capped := [n for n in lengths if n > room]:
            notes.append(f"prompt length(s) {capped} capped to {room}: the model takes {positions} positions and "
                         f"{cfg.new_tokens} are generated")
            lengths = sorted({min(n, room) for n in lengths})
        if no_cache and lengths[0] + no_cache > positions:
            no_cache = max(0, positions - lengths[0])
            notes.append(f"no-cache comparison at {no_cache} new tokens, not {cfg.no_cache_tokens}: the model takes "
                         f"{positions} positions")
    return lengths, (no_cache if no_cache >= 2 else 0), notes


def build_decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
    """A decoder per (backend, variant) that can run here (the table ``runtimes.genbackends.GENERATION_BACKENDS``);
    what cannot is added to ``skipped`` with the reason."""
    if cfg.variants is not None and (missing := [v for v in cfg.variants if v not in manifest.artifacts]):
        raise InputError(f"unknown variant(s) {missing}; in the manifest: {sorted(manifest.artifacts)}")
    if is_seq2seq(manifest):  # an encoder-decoder: the encoder once, then its decoder with past (runtimes.seq2seq)
        from runtimes.base import RunnerOptions
        from runtimes.seq2seq import seq2seq_decoders
        return seq2seq_decoders(manifest, base, requested(cfg), cfg.variants,
                                RunnerOptions(threads=cfg.threads, ort_spinning=cfg.ort_spinning), skipped)
    return generation_decoders(manifest, base, cfg, skipped)


def _row(manifest: Manifest, d: Decoder, prompt: np.ndarray, new_tokens: int, kv: bool, traces: list[list[Trace]],
         timed: Timed, rss_mb: float, cache_bytes: int) -> GenerationResult:
    batch = int(prompt.shape[0])
    ttft = LatencyStats.from_samples([t.prefill_ms for r in traces for t in r], [[t.prefill_ms for t in r]
                                                                                 for r in traces])
    per = [[t.decode_ms / (new_tokens - 1) for t in r] for r in traces]
    tpot = LatencyStats.from_samples([x for r in per for x in r], per)
    total = LatencyStats.from_samples(timed.samples, timed.rounds)
    return GenerationResult(
        model=manifest.source.model, backend=d.backend, variant=d.variant, precision=d.precision, batch_size=batch,
        prompt_length=int(prompt.shape[1]), new_tokens=new_tokens, kv_cache=kv, ttft_ms=ttft, tpot_ms=tpot,
        total_ms=total, decode_tokens_per_s=batch / (tpot.p50 / 1e3), tokens_per_s=batch * new_tokens / (total.p50 / 1e3),
        peak_rss_delta_mb=rss_mb, kv_cache_mb=cache_bytes / 2**20 if kv else None, model_size_mb=d.size_mb,
        input_digest=feed_digest({"input_ids": prompt}), extra=d.extra() | timed.block_warmup())


def time_point(manifest: Manifest, entries: Sequence[tuple[Decoder, bool]], prompt: np.ndarray, new_tokens: int,
               cfg: GenerationConfig) -> list[GenerationResult]:
    """Every (decoder, KV cache or not) generating ``new_tokens`` from ``prompt``: one untimed unit each under the RSS
    sampler, then all timed as units in interleaved rounds (``time_units``)."""
    from core.resources import ResourceSampler

    def run(d: Decoder, kv: bool) -> Trace:
        return greedy(d, prompt, new_tokens - 1) if kv else greedy_no_cache(d, prompt, new_tokens - 1)

    memory: list[tuple[float, int]] = []
    for d, kv in entries:
        with ResourceSampler() as sampler:
            first = run(d, kv)
        memory.append(((sampler.peak_rss - sampler.baseline_rss) / 2**20, first.cache_bytes))
    recorded: list[list[Trace]] = [[] for _ in entries]

    def unit(i: int) -> None:
        recorded[i].append(run(*entries[i]))

    timed = time_units([functools.partial(unit, i) for i in range(len(entries))], warmup=cfg.warmup, iters=cfg.iters,
                       rounds=cfg.rounds, block_warmup=cfg.round_warmup)
    return [_row(manifest, d, prompt, new_tokens, kv, timed_traces(recorded[i], cfg.warmup, timed[i]), timed[i],
                 *memory[i]) for i, (d, kv) in enumerate(entries)]


def perplexity(decoder: Decoder, text: np.ndarray, chunk: int = 4) -> float:
    """exp(mean next-token NLL) of ``decoder`` on ``text`` windows (rows x tokens), ``chunk`` rows per forward."""
    total, count = 0.0, 0
    for s in range(0, text.shape[0], chunk):
        nll, n = next_token_nll(decoder.forward(text[s:s + chunk]), text[s:s + chunk])
        total, count = total + nll, count + n
    return float(np.exp(total / count))


def check_decoders(decoders: Sequence[Decoder], reference: Decoder, prompts: np.ndarray, tokens: int,
                   text: np.ndarray | None = None, basis: str | None = None) -> list[GenerationAccuracy]:
    """Each decoder against ``reference`` on ``prompts`` for ``tokens`` tokens (see the module docstring); with
    ``text`` (held-out windows, rows x tokens; ``basis`` says what they are) each decoder's perplexity on it."""
    ref = greedy(reference, prompts, tokens - 1, keep_logits=True)
    ref_label = f"{reference.backend}:{reference.variant}:{reference.precision}"
    checks = []
    for d in decoders:
        free = greedy(d, prompts, tokens - 1)
        forced = greedy(d, prompts, tokens - 1, keep_logits=True, forced=ref.tokens)
        cos = np.stack([cosines(x, y) for x, y in zip(forced.logits, ref.logits, strict=True)])
        no_cache = greedy_no_cache(d, prompts, tokens - 1)
        notes = ["the reference"] if d is reference else []
        if d.backend == "compile":
            notes.append("no-cache path: the eager model (the compiled module runs the KV-cache loop)")
        checks.append(GenerationAccuracy(
            backend=d.backend, variant=d.variant, precision=d.precision, reference=ref_label,
            prompts=int(prompts.shape[0]), tokens=tokens, agreement=float((free.tokens == ref.tokens).mean()),
            forced_agreement=float((forced.tokens == ref.tokens).mean()), cosine_min=float(cos.min()),
            cosine_mean=float(cos.mean()), kv_matches_no_cache=bool(np.array_equal(free.tokens, no_cache.tokens)),
            perplexity=perplexity(d, text) if text is not None else None,
            perplexity_basis=(basis or f"byte-level next-token perplexity on {text.shape[0]} held-out windows of "
                                       f"{text.shape[1]} tokens" if text is not None else
                              "no held-out text (bench --text FILE or stdlib): agreement and cosine only"),
            model_size_mb=d.size_mb, notes=notes))
    return checks


def model_vocab(manifest: Manifest) -> int | None:
    """The model's vocabulary: the last dim of its logits, else the IOSpec's range of ``input_ids``."""
    logits = next((o for o in manifest.iospec.outputs if o.name == LOGITS), None)
    if logits is not None and logits.shape and isinstance(logits.shape[-1], int):
        return int(logits.shape[-1])
    r = manifest.iospec.input("input_ids").int_range
    return int(r[1]) if r is not None else None


def held_out(manifest: Manifest, source: str, seed: int) -> tuple[np.ndarray, str, HeldOutText]:
    """``--text`` for perplexity: (windows of at most ``PPL_WINDOW`` tokens, capped by the model's positions; what
    they are; the text, for the checks' prompts), tokenized by the model's own tokenizer where its folder has one."""
    text = heldout_text(source, model_vocab(manifest), hf_folder(manifest))
    positions = max_positions(manifest)
    ppl = text.windows(min(PPL_WINDOW, positions) if positions else PPL_WINDOW, PPL_WINDOWS, seed)
    basis = text.basis(ppl) + ("; random-init weights: it compares the variants, it measures no language"
                               if is_random_init(manifest.source) else "")
    return ppl, basis, text


def load_generation_manifest(artifact_dir: Path) -> Manifest:
    """The manifest, refused unless its files match their hashes and it is one decoder file with a KV cache."""
    manifest = Manifest.load(artifact_dir)
    if problems := manifest.verify(Path(artifact_dir)):
        raise InputError("artifact folder does not match its manifest: " + "; ".join(problems))
    if is_seq2seq(manifest):  # t5, bart, whisper: runtimes.seq2seq's loop
        return manifest
    if manifest.components():
        raise InputError("the generation benchmark runs decoders exported as one file (a model with components, "
                         "e.g. an encoder-decoder, is not measured as a generation loop yet)")
    if not has_kv_cache(manifest.iospec) or LOGITS not in manifest.iospec.output_names:
        raise InputError(f"{artifact_dir}: not a decoder with a KV cache (convert it with --task "
                         "text-generation-with-past)")
    return manifest


def load_decoders(manifest: Manifest, cfg: GenerationConfig, stack: contextlib.ExitStack, skipped: list[str],
                  log: Callable[[str], None], progress: Callable[[str], None] | None = None) -> list[Decoder]:
    """Every decoder that loads here (closed when ``stack`` closes); the others go to ``skipped`` with the reason."""
    decoders: list[Decoder] = []
    for d in build_decoders(manifest, Path(cfg.artifact_dir), cfg, skipped):
        if progress:
            progress(f"loading {d.label}")
        try:
            d.load()
        except BackendUnavailableError as exc:
            skipped.append(f"{d.label}: {exc}")
            log(f"[yellow]skipped {d.label}: {exc}[/]")
            continue
        stack.callback(d.close)
        decoders.append(d)
    if not decoders:
        raise BackendUnavailableError("no backend can run this decoder: " + "; ".join(skipped))
    return decoders


def pick_reference(manifest: Manifest, base: Path, cfg: GenerationConfig, decoders: Sequence[Decoder],
                   stack: contextlib.ExitStack, skipped: list[str]) -> Decoder:
    """The checks' reference: eager PyTorch FP32 (loaded for it when not measured), else ONNX Runtime's FP32
    (said so in ``skipped``)."""
    reference = next((d for d in decoders if d.backend == "eager"), None)
    if reference is None and (folder := hf_folder(manifest)) is not None:
        with contextlib.suppress(BackendUnavailableError):
            eager = TorchDecoder(manifest, base, folder, compiled=False, threads=cfg.threads)
            eager.load()
            stack.callback(eager.close)
            reference = eager
    if reference is None:
        reference = next((d for d in decoders if d.backend == "ort" and d.variant == "fp32"), decoders[0])
        skipped.append(f"reference: eager PyTorch cannot run here; the checks compare with {reference.label}")
    return reference


def progress_steps(cfg: GenerationConfig) -> int:
    """How many times :func:`run_generation` calls its ``progress``: each decoder loaded, the checks, each (prompt
    length, batch) point and the no-cache comparison (a progress bar's total)."""
    manifest = load_generation_manifest(cfg.artifact_dir)
    lengths, no_cache_tokens, _ = prompt_plan(cfg, max_positions(manifest))
    decoders = build_decoders(manifest, Path(cfg.artifact_dir), cfg, [])
    return len(decoders) + 1 + len(lengths) * len(cfg.batch_sizes) + (1 if no_cache_tokens else 0)


def run_generation(cfg: GenerationConfig, log: Callable[[str], None] = print,
                   progress: Callable[[str], None] | None = None, *, text: np.ndarray | None = None,
                   check_prompts: np.ndarray | None = None) -> GenerationResults:
    """Load every decoder that can run here, check each against the reference, then time every point.

    ``text``: held-out token windows for perplexity (rows x tokens); ``check_prompts``: the prompts of the checks
    (default: seeded ones)."""
    manifest = load_generation_manifest(cfg.artifact_dir)
    base = Path(cfg.artifact_dir)
    lengths, no_cache_tokens, notes = prompt_plan(cfg, max_positions(manifest))
    basis = None
    if cfg.text is not None and manifest.components():
        raise InputError("--text: perplexity is measured on decoder-only models (an encoder-decoder's would need "
                         "source and target text)")
    if text is None and cfg.text is not None:  # --text: perplexity on it, and the checks' prompts from it
        text, basis, held = held_out(manifest, cfg.text, cfg.seed)
        if check_prompts is None:
            check_prompts = held.windows(lengths[0], cfg.check_prompts, cfg.seed + 2)
    for n in notes:
        log(f"[yellow]note:[/] {n}")
    results = GenerationResults(config=cfg.model_dump(mode="json") | {"backends": requested(cfg),
                                                                      "prompt_lengths_run": lengths,
                                                                      "no_cache_tokens_run": no_cache_tokens,
                                                                      "notes": notes},
                                random_init=is_random_init(manifest.source))
    with contextlib.ExitStack() as stack:
        decoders = load_decoders(manifest, cfg, stack, results.skipped, log, progress)
        reference = pick_reference(manifest, base, cfg, decoders, stack, results.skipped)
        prompts = check_prompts if check_prompts is not None else \
            seeded_prompts(manifest, cfg.check_prompts, lengths[0], cfg.seed + 1)
        if progress:
            progress(f"checks: {len(decoders)} targets against {reference.label}"
                     + (f", perplexity on {text.shape[0]} windows" if text is not None else ""))
        results.checks = check_decoders(decoders, reference, prompts, cfg.check_tokens, text, basis)
        largest = seeded_prompts(manifest, max(cfg.batch_sizes), max(lengths), cfg.seed)
        for length in lengths:
            for batch in cfg.batch_sizes:
                if progress:
                    progress(f"prompt {length}, batch {batch}: {len(decoders)} targets x {cfg.rounds} rounds")
                results.rows += time_point(manifest, [(d, True) for d in decoders], largest[:batch, :length],
                                           cfg.new_tokens, cfg)
        if no_cache_tokens:
            if progress:
                progress(f"KV cache vs no cache at {no_cache_tokens} new tokens")
            pairs = [(d, kv) for d in decoders if d.backend != "compile" for kv in (True, False)]
            results.rows += time_point(manifest, pairs, largest[:1, :lengths[0]], no_cache_tokens, cfg)
    return results


def run_generation_bench(cfg: GenerationConfig, log: Callable[[str], None] = print,
                         progress: Callable[[str], None] | None = None) -> BenchResults:
    """:func:`run_generation` as bench's results (``BenchResults.generation``; no one-shot records)."""
    from reports.models import BenchResults

    gen = run_generation(cfg, log, progress)
    model = Manifest.load(cfg.artifact_dir).source.model
    results = BenchResults(model=model, artifact_dir=str(cfg.artifact_dir), config=gen.config, generation=gen,
                           accuracy_inputs="random")
    results.warnings += [f"skipped {s}" for s in gen.skipped] + list(gen.config.get("notes", []))
    return results
