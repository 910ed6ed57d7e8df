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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calibration.text import next_token_nll
from core.errors import BackendUnavailableError, InputError, first_line
from core.iospec import feed_digest
from core.manifest import Manifest
from core.metrics import LatencyStats, clearly_slower
from reports.generation import GenerationAccuracy, GenerationResult, GenerationResults
from runtimes import RUNNERS, check_backends
from runtimes.base import Runner, RunnerOptions
from runtimes.session import KVCacheSession, has_kv_cache
from runtimes.timing import Timed, time_units

if TYPE_CHECKING:
    from reports.models import BenchResults
    from runtimes.harness import BenchConfig
    from runtimes.tune import TuneConfig, TuneResult

#: the backends with a generation loop, in the order they are measured
GENERATION_BACKENDS = ("eager", "compile", "ort", "genai", "openvino")  # genai: runtimes.genai, no runner
TORCH_BACKENDS = ("eager", "compile")
ONNX_BACKENDS = ("ort", "openvino")
LOGITS = "logits"


class GenerationConfig(BaseModel):
    """A generation benchmark request (``bench`` on a KV-cache artifact builds one: :meth:`from_bench`)."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: Path = Field(description="Folder with manifest.json of a decoder exported with its KV cache")
    backends: list[str] = Field(default_factory=lambda: list(GENERATION_BACKENDS),
                                description="Names from runtimes.RUNNERS; one without a generation loop is skipped "
                                            "with the reason")
    variants: list[str] | None = Field(default=None, description="ONNX artifact names (default: every ok one)")
    prompt_lengths: list[int] = Field(default=[32, 128, 512], description="Prompt tokens; a length that leaves no "
                                                                          "room for new_tokens within the model's "
                                                                          "positions is capped, said so")
    batch_sizes: list[int] = Field(default=[1, 4])
    new_tokens: int = Field(default=32, ge=2, description="Tokens generated per timed unit (1 prefill + decode steps)")
    no_cache_tokens: int = Field(default=128, ge=0, description="New tokens of the KV-cache vs no-cache comparison "
                                                                "(batch 1, the shortest prompt); 0: not measured")
    check_prompts: int = Field(default=4, ge=1, description="Prompts decoded for the agreement checks")
    check_tokens: int = Field(default=16, ge=2, description="Tokens decoded per prompt for the agreement checks")
    warmup: int = Field(default=1, ge=0, description="Untimed units per target before the rounds")
    iters: int = Field(default=6, ge=1, description="Timed units per target and point")
    rounds: int = Field(default=3, ge=1, description="Interleaved rounds the timed units are split over")
    round_warmup: int = Field(default=1, ge=0, description="Untimed units at the start of every round's block")
    threads: int | None = Field(default=None, ge=1, description="Intra-op threads for every backend")
    seed: int = 0
    ort_spinning: bool = True

    @classmethod
    def from_bench(cls, cfg: BenchConfig) -> GenerationConfig:
        """``bench``'s request on a KV-cache artifact: its flags where given; a flag left at bench's default takes
        the generation default (bench's default backends mean every backend with a generation loop, its default
        100 iterations would be 100 generation loops per point). ``--dims sequence=...`` gives the prompt lengths."""
        from runtimes.harness import BenchConfig

        if cfg.device != "cpu":
            raise InputError("the generation benchmark of a KV-cache decoder runs on cpu here (--device cpu)")

        def given(name: str) -> bool:
            return bool(getattr(cfg, name) != BenchConfig.model_fields[name].get_default(call_default_factory=True))

        fields: dict[str, Any] = {"artifact_dir": cfg.artifact_dir, "variants": cfg.variants,
                                  "threads": cfg.threads, "seed": cfg.seed, "ort_spinning": cfg.ort_spinning}
        for ours, theirs in (("backends", "backends"), ("batch_sizes", "batch_sizes"), ("warmup", "warmup"),
                             ("iters", "iters"), ("rounds", "rounds"), ("round_warmup", "round_warmup")):
            if given(theirs):
                fields[ours] = getattr(cfg, theirs)
        if "sequence" in cfg.dims:
            fields["prompt_lengths"] = cfg.dims["sequence"]
        return cls(**fields)


# -- decoders: one greedy-loop interface over every backend ------------------------------------------------------------
class DecodeSession(Protocol):
    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed ``ids`` (batch x new tokens) with the cache; the last position's logits (batch x vocab)."""

    def cache_bytes(self) -> int:
        """The KV cache's bytes now."""


class Decoder:
    """A model that generates: sessions with a KV cache, and a whole-sequence forward with none."""

    backend: str = ""
    variant: str = ""
    precision: str = "fp32"
    size_mb: float | None = None

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.variant}"

    def load(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def session(self) -> DecodeSession:
        raise NotImplementedError

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits (batch x seq x vocab) of ``ids`` with no cache."""
        raise NotImplementedError

    def extra(self) -> dict[str, Any]:
        return {}


class _RunnerSession:
    def __init__(self, session: KVCacheSession, index: int) -> None:
        self.inner, self.index = session, index

    def step(self, ids: np.ndarray) -> np.ndarray:
        return self.inner.step({"input_ids": ids})[self.index][:, -1]

    def cache_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.inner.cache.values())


class RunnerDecoder(Decoder):
    """An ONNX variant on a runner whose ``open_session()`` keeps the KV cache (ONNX Runtime, OpenVINO)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.backend, self.variant, self.precision = runner.name, runner.artifact.name, runner.artifact.precision
        self.size_mb = runner.artifact.file.size_bytes / 2**20
        names = runner.manifest.iospec.output_names
        if LOGITS not in names:
            raise InputError(f"{runner.label}: no {LOGITS!r} output to decode from (outputs: {', '.join(names)})")
        self.index = names.index(LOGITS)

    def load(self) -> None:
        self.runner.load()
        if not isinstance(self.runner.open_session(), KVCacheSession):
            self.runner.close()
            raise BackendUnavailableError(f"{self.runner.name}: its runner opens no KV-cache session")

    def close(self) -> None:
        self.runner.close()

    def session(self) -> DecodeSession:
        s = self.runner.open_session()
        assert isinstance(s, KVCacheSession)  # load() checked it
        return _RunnerSession(s, self.index)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        with self.runner.open_session() as s:  # an empty cache: the whole sequence in one call
            return s.step({"input_ids": ids})[self.index]


def _cache_bytes(past: Any) -> int:
    """Bytes of a transformers cache (``DynamicCache`` layers, or the legacy tuples)."""
    import torch

    if past is None:
        return 0
    if isinstance(past, torch.Tensor):
        return int(past.numel() * past.element_size())
    if hasattr(past, "layers"):
        return sum(_cache_bytes(getattr(layer, n, None)) for layer in past.layers for n in ("keys", "values"))
    if isinstance(past, (list, tuple)):
        return sum(_cache_bytes(x) for x in past)
    return sum(_cache_bytes(x) for n in ("key_cache", "value_cache") for x in getattr(past, n, []))


class _TorchSession:
    def __init__(self, module: Any) -> None:
        self.module, self.past = module, None

    def step(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(input_ids=torch.from_numpy(np.ascontiguousarray(ids)), past_key_values=self.past,
                              use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float().numpy()

    def cache_bytes(self) -> int:
        return _cache_bytes(self.past)


def hf_folder(manifest: Manifest) -> Path | None:
    """The Hugging Face folder the artifact was exported from, when the manifest records one that is still there."""
    from core.hf import PREFIX

    if manifest.source.kind != "hf" or not manifest.source.model.startswith(PREFIX):
        return None
    folder = Path(manifest.source.model[len(PREFIX):])
    return folder if (folder / "config.json").is_file() else None


class TorchDecoder(Decoder):
    """transformers' model of the source folder, with the weights convert saved (the ``state_dict`` artifact), run
    with ``use_cache=True``; ``compiled``: under ``torch.compile(dynamic=True)``; ``saved_weights=False``: the
    folder's own weights (convert's generation check: the model as given, before any variant step)."""

    def __init__(self, manifest: Manifest, base: Path, folder: Path, *, compiled: bool, threads: int | None,
                 saved_weights: bool = True) -> None:
        self.folder, self.compiled, self.threads = folder, compiled, threads
        self.backend = "compile" if compiled else "eager"
        weights = [a for a in manifest.artifacts.values()
                   if saved_weights and a.kind == "state_dict" and a.status == "ok"]
        self.weights = base / weights[0].file.path if weights else None
        self.variant = weights[0].name if weights else "hf"
        self.size_mb = weights[0].file.size_bytes / 2**20 if weights else None
        self.model: Any = None
        self.module: Any = None
        self.compile_s: float | None = None
        self._threads_before: int | None = None

    def load(self) -> None:
        import torch

        try:
            import transformers
        except ImportError as exc:
            raise BackendUnavailableError(f"{self.backend}: needs transformers ({first_line(exc)})") from None
        if self.threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(self.folder), local_files_only=True)
            if self.weights is not None:
                model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True), strict=True)
        except Exception as exc:
            self.close()
            raise BackendUnavailableError(f"{self.backend}: cannot load {self.folder} as a causal LM: "
                                          f"{first_line(exc, with_type=True)}") from None
        self.model = self.module = model.eval()
        if self.compiled:
            self.module = torch.compile(model, dynamic=True)
            t0 = time.perf_counter()
            try:  # compiled here, at a small shape (other shapes recompile during each point's untimed units)
                greedy(self, np.zeros((1, 4), np.int64), 3)
            except Exception as exc:
                self.close()
                raise BackendUnavailableError(f"torch.compile failed on this model: "
                                              f"{first_line(exc, with_type=True)}") from None
            self.compile_s = time.perf_counter() - t0

    def close(self) -> None:
        import torch

        self.model = self.module = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def session(self) -> DecodeSession:
        return _TorchSession(self.module)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():  # the eager model (compiling a second, no-cache graph is not measured)
            return np.asarray(self.model(input_ids=torch.from_numpy(np.ascontiguousarray(ids)),
                                         use_cache=False).logits.float().numpy())

    def extra(self) -> dict[str, Any]:
        return {"compile_s": self.compile_s} if self.compiled else {}


# -- the loops ----------------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One greedy loop: the tokens chosen (batch x steps + 1), the prefill's and decode steps' time, the last
    position's logits of every step (when kept), the cache's bytes at the end."""

    tokens: np.ndarray
    prefill_ms: float
    decode_ms: float
    cache_bytes: int = 0
    logits: list[np.ndarray] = field(default_factory=list)


def greedy(decoder: Decoder, prompt: np.ndarray, steps: int, *, keep_logits: bool = False,
           forced: np.ndarray | None = None) -> Trace:
    """Prefill on ``prompt`` then ``steps`` decode steps of one token, each the argmax of the step before, or, with
    ``forced`` (batch x steps + 1, e.g. a reference's tokens), that token instead (teacher forcing)."""
    clock = time.perf_counter_ns
    session = decoder.session()
    t0 = clock()
    last = session.step(prompt)
    t1 = clock()
    logits = [last] if keep_logits else []
    tokens = [last.argmax(-1)]
    for k in range(steps):
        feed = tokens[-1] if forced is None else forced[:, k]
        last = session.step(feed[:, None].astype(prompt.dtype))
        tokens.append(last.argmax(-1))
        if keep_logits:
            logits.append(last)
    t2 = clock()
    return Trace(tokens=np.stack(tokens, axis=1), prefill_ms=(t1 - t0) / 1e6, decode_ms=(t2 - t1) / 1e6,
                 cache_bytes=session.cache_bytes(), logits=logits)


def forced_logits(decoder: Decoder, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Each step's last-position logits when ``decoder`` is fed ``tokens`` (a reference's choices, batch x steps) after
    the prefill: steps x batch x vocab, the same steps as the reference's (teacher forcing)."""
    trace = greedy(decoder, prompt, tokens.shape[1] - 1, keep_logits=True, forced=tokens)
    return np.stack(trace.logits).astype(np.float32)


def no_cache_logits(decoder: Decoder, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """One forward over prompt + ``tokens`` (but the last) with no cache: the logits of the positions the cached
    steps of :func:`forced_logits` produced, steps x batch x vocab."""
    seq = np.concatenate([prompt, tokens[:, :-1].astype(prompt.dtype)], axis=1)
    return np.moveaxis(decoder.forward(seq)[:, prompt.shape[1] - 1:], 1, 0).astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis (0 where either vector is zero)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.asarray(np.where(den > 0, (a64 * b64).sum(-1) / np.maximum(den, 1e-300), 0.0))


def greedy_no_cache(decoder: Decoder, prompt: np.ndarray, steps: int) -> Trace:
    """The same greedy loop with no cache: every new token a full forward over prompt + tokens so far."""
    clock = time.perf_counter_ns
    t0 = clock()
    ids = prompt
    tokens = [decoder.forward(ids)[:, -1].argmax(-1)]
    t1 = clock()
    for _ in range(steps):
        ids = np.concatenate([ids, tokens[-1][:, None].astype(prompt.dtype)], axis=1)
        tokens.append(decoder.forward(ids)[:, -1].argmax(-1))
    t2 = clock()
    return Trace(tokens=np.stack(tokens, axis=1), prefill_ms=(t1 - t0) / 1e6, decode_ms=(t2 - t1) / 1e6)


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
def max_positions(manifest: Manifest) -> int | None:
    """The most positions the model takes: its config's ``n_positions``/``max_position_embeddings``, else the
    IOSpec's range of ``position_ids``."""
    folder = hf_folder(manifest)
    if folder is not None:
        import json

        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            if isinstance(config.get(key), int):
                return int(config[key])
    spec = manifest.iospec
    if "position_ids" in spec.input_names and (r := spec.input("position_ids").int_range) is not None:
        return int(r[1])
    return None


def seeded_prompts(manifest: Manifest, batch: int, length: int, seed: int) -> np.ndarray:
    """Token ids drawn from the model's vocabulary (the IOSpec's range of input_ids), seeded: the same prompt for
    every target; a shorter or narrower one is a slice of the largest."""
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
    """A decoder per (backend, variant) that can run here; what cannot is added to ``skipped`` with the reason."""
    check_backends([b for b in cfg.backends if b != "genai"])  # ONNX Runtime GenAI: a generation loop, no runner
    if cfg.variants is not None and (missing := [v for v in cfg.variants if v not in manifest.artifacts]):
        raise InputError(f"unknown variant(s) {missing}; in the manifest: {sorted(manifest.artifacts)}")
    opts = RunnerOptions(threads=cfg.threads, ort_spinning=cfg.ort_spinning)
    folder = hf_folder(manifest)
    out: list[Decoder] = []
    for b in cfg.backends:
        if b not in GENERATION_BACKENDS:
            skipped.append(f"{b}: no generation loop with a KV cache for this backend (generation runs on "
                           f"{', '.join(GENERATION_BACKENDS)})")
            continue
        if b == "genai":
            from runtimes.genai import genai_decoders

            out += genai_decoders(manifest, base, cfg, skipped)
            continue
        if (why := RUNNERS[b].available("cpu")) is not None:
            skipped.append(f"{b}: {why}")
            continue
        if b in TORCH_BACKENDS:
            if folder is None:
                skipped.append(f"{b}: the manifest records no Hugging Face source folder that is still there "
                               f"({manifest.source.model}): transformers' model cannot be rebuilt")
                continue
            out.append(TorchDecoder(manifest, base, folder, compiled=b == "compile", threads=cfg.threads))
            continue
        arts = [a for a in manifest.artifacts.values() if a.kind == "onnx"
                and (a.name in cfg.variants if cfg.variants is not None else a.status == "ok")]
        out += [RunnerDecoder(RUNNERS[b](manifest, base, a, opts)) for a in arts]
    return out


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
                   text: np.ndarray | None = None) -> list[GenerationAccuracy]:
    """Each decoder against ``reference`` on ``prompts`` for ``tokens`` tokens (see the module docstring)."""
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
            perplexity_basis=(f"byte-level next-token perplexity on {text.shape[0]} held-out windows of "
                              f"{text.shape[1]} tokens" if text is not None else
                              "no held-out text: agreement and cosine only"),
            model_size_mb=d.size_mb, notes=notes))
    return checks


def load_generation_manifest(artifact_dir: Path) -> Manifest:
    """The manifest, refused unless its files match their hashes and it is one decoder file with a KV cache."""
    manifest = Manifest.load(artifact_dir)
    if problems := manifest.verify(Path(artifact_dir)):
        raise InputError("artifact folder does not match its manifest: " + "; ".join(problems))
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
    for n in notes:
        log(f"[yellow]note:[/] {n}")
    results = GenerationResults(config=cfg.model_dump(mode="json") | {"prompt_lengths_run": lengths,
                                                                      "no_cache_tokens_run": no_cache_tokens,
                                                                      "notes": notes},
                                random_init=text is None)
    with contextlib.ExitStack() as stack:
        decoders = load_decoders(manifest, cfg, stack, results.skipped, log, progress)
        reference = pick_reference(manifest, base, cfg, decoders, stack, results.skipped)
        prompts = check_prompts if check_prompts is not None else \
            seeded_prompts(manifest, cfg.check_prompts, lengths[0], cfg.seed + 1)
        if progress:
            progress(f"checks: {len(decoders)} targets against {reference.label}")
        results.checks = check_decoders(decoders, reference, prompts, cfg.check_tokens, text)
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


def generation_request(cfg: BenchConfig) -> GenerationConfig | None:
    """``bench``'s request as a generation benchmark when its artifact is one decoder with a KV cache, else None."""
    manifest = Manifest.load(cfg.artifact_dir)
    if cfg.component is not None or manifest.components() or not has_kv_cache(manifest.iospec):
        return None
    return GenerationConfig.from_bench(cfg)


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


# -- tune on a KV-cache decoder -----------------------------------------------------------------------------------------
#: the prompt and the new tokens of a tune candidate's generation loop (the prompt capped by the model's positions)
TUNE_PROMPT, TUNE_NEW_TOKENS, TUNE_CHECK_TOKENS = 32, 32, 16


def is_generation_artifact(artifact_dir: Path) -> bool:
    """One decoder file with a KV cache: ``bench`` and ``tune`` run it as a generation loop."""
    manifest = Manifest.load(artifact_dir)
    return not manifest.components() and has_kv_cache(manifest.iospec)


def tune_generation(cfg: TuneConfig, log: Callable[[str], None] = print) -> TuneResult:
    """``tune`` on a KV-cache decoder: every backend x variant that can run the generation loop, ranked by decode
    tokens/s (the objective; ``latency``: at the smallest batch, ``throughput``: at any batch), within an accuracy
    budget in points of greedy token agreement with FP32 (the reference of :func:`check_decoders`: eager PyTorch
    FP32, else ONNX Runtime's FP32; teacher-forced steps, as convert's generation gate). Candidates over the budget
    are not timed; the rest are timed once, interleaved (``stages[0]`` generation loops in ``rounds`` rounds), so
    there is no pruning and no final stage; runner settings are not searched (each runs with its defaults)."""
    from runtimes.tune import Candidate, TuneResult, _per_sample, best_per_batch, best_per_precision

    manifest = load_generation_manifest(cfg.artifact_dir)
    batches = [min(cfg.batch_sizes)] if cfg.objective == "latency" else sorted(set(cfg.batch_sizes))
    gcfg = GenerationConfig(artifact_dir=cfg.artifact_dir, backends=cfg.backends, variants=cfg.variants,
                            prompt_lengths=[TUNE_PROMPT], batch_sizes=batches, new_tokens=TUNE_NEW_TOKENS,
                            no_cache_tokens=0, check_prompts=cfg.accuracy_samples, check_tokens=TUNE_CHECK_TOKENS,
                            iters=cfg.stages[0], rounds=cfg.rounds, round_warmup=0, seed=cfg.seed)
    lengths, _, notes = prompt_plan(gcfg, max_positions(manifest))
    for n in notes:
        log(f"note: {n}")
    skipped: list[str] = []
    candidates: list[Candidate] = []
    with contextlib.ExitStack() as stack:
        decoders = load_decoders(manifest, gcfg, stack, skipped, log)
        reference = pick_reference(manifest, Path(cfg.artifact_dir), gcfg, decoders, stack, skipped)
        prompts = seeded_prompts(manifest, gcfg.check_prompts, lengths[0], cfg.seed + 1)
        log(f"accuracy: greedy token agreement of {len(decoders)} candidate(s) with {reference.label} "
            f"({gcfg.check_prompts} prompts x {TUNE_CHECK_TOKENS} tokens, teacher-forced)")
        checks = check_decoders(decoders, reference, prompts, TUNE_CHECK_TOKENS)
        ref_label = checks[0].reference
        drops = [round(100.0 * (1.0 - c.forced_agreement), 4) for c in checks]
        for d, drop in zip(decoders, drops, strict=True):
            candidates += [Candidate(backend=d.backend, variant=d.variant, precision=d.precision, settings={},
                                     batch_size=b, accuracy_drop_points=drop,
                                     within_budget=drop <= cfg.accuracy_budget + 1e-9) for b in batches]
        live = [d for d, drop in zip(decoders, drops, strict=True) if drop <= cfg.accuracy_budget + 1e-9]
        if not live:
            raise InputError(f"no candidate is within the accuracy budget of {cfg.accuracy_budget:g} points of "
                             f"greedy token agreement with {ref_label}")
        largest = seeded_prompts(manifest, max(batches), lengths[0], cfg.seed)
        for b in batches:
            log(f"batch {b}: {len(live)} candidate(s) x {gcfg.iters} generation loops of {TUNE_NEW_TOKENS} tokens "
                f"(prompt {lengths[0]}) in {gcfg.rounds} interleaved rounds")
            for row in time_point(manifest, [(d, True) for d in live], largest[:b], TUNE_NEW_TOKENS, gcfg):
                c = next(c for c in candidates if (c.backend, c.variant, c.batch_size) ==
                         (row.backend, row.variant, b))
                c.latency_ms, c.throughput = row.tpot_ms, row.decode_tokens_per_s
    for s in skipped:
        log(f"skipped {s}")
    timed = [c for c in candidates if c.throughput is not None]
    win = max(timed, key=lambda c: c.throughput or 0.0)
    tied = [c.label for c in timed if c is not win and not clearly_slower(_per_sample(c), _per_sample(win))]
    reason = (f"most decode tokens/s (KV-cache generation loop, prompt {lengths[0]}, {TUNE_NEW_TOKENS} new tokens"
              f"{', batch ' + str(win.batch_size) if cfg.objective == 'latency' else ', any batch'}) within "
              f"{cfg.accuracy_budget:g} points of greedy token agreement with {ref_label}; latency_ms is "
              f"the time per output token" + (f"; within the noise of: {'; '.join(tied)}" if tied else
                                               "; every other candidate clearly slower"))
    return TuneResult(config=cfg.model_dump(mode="json") | {"generation": gcfg.model_dump(mode="json"),
                                                            "skipped": skipped},
                      candidates=candidates, winner=win.label, stages_run=1, reason=reason,
                      best_per_batch=best_per_batch(candidates), best_per_precision=best_per_precision(candidates))

