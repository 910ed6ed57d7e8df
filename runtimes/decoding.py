"""What a decoder with a KV cache is to the generation benchmark and convert's generation check: one greedy-loop
interface (:class:`Decoder`) over every backend, the loops over it, and the request's fields.

- :class:`RunnerDecoder`: an ONNX variant through its runner's ``open_session()`` (``runtimes.session.KVCacheSession``,
  present fed back as past), for ``ort`` and ``openvino``;
- :class:`TorchDecoder`: transformers' own model for the artifact's Hugging Face source folder with
  ``use_cache=True`` and its ``past_key_values`` (``compile``: wrapped in ``torch.compile(dynamic=True)``);
- ``runtimes.genai``: ONNX Runtime GenAI's generator, built on the same :class:`Decoder`.

:func:`greedy` is the loop every backend runs (prefill, then one token per decode step), :func:`forced_logits` the
logits along a reference's tokens (teacher forcing), :func:`no_cache_logits` / :func:`greedy_no_cache` the path
without a cache. ``runtimes.generation`` measures these; ``convert.genvalidate`` grades variants with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import BackendUnavailableError, InputError, first_line
from core.manifest import Manifest
from runtimes.base import Runner
from runtimes.session import KVCacheSession

LOGITS = "logits"


class GenerationConfig(BaseModel):
    """A generation benchmark request (``bench`` on a KV-cache artifact builds one: ``runtimes.harness.generation_request``)."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: Path = Field(description="Folder with manifest.json of a decoder exported with its KV cache")
    backends: list[str] | None = Field(default=None, description="Names from runtimes.genbackends."
                                                                 "GENERATION_BACKENDS (a one-shot backend of "
                                                                 "runtimes.RUNNERS is skipped with the reason); None: "
                                                                 "every row of that table, in its order")
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
    text: str | None = Field(default=None, description="Held-out text for perplexity (and the checks' prompts): a "
                                                       "UTF-8 file, or 'stdlib' (calibration.text); None: agreement "
                                                       "and cosine only")


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

    def continuation_logits(self, prompt: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """With no cache, the logits (batch x ``ids`` + 1 x vocab) of the positions that follow ``prompt``: its last
        and each of ``ids`` (an encoder-decoder, ``runtimes.seq2seq``, encodes the prompt and decodes ``ids``)."""
        seq = np.concatenate([prompt, ids.astype(prompt.dtype)], axis=1)
        return self.forward(seq)[:, prompt.shape[1] - 1:]

    def generate(self, prompt: np.ndarray, steps: int) -> Trace | None:
        """A backend with a whole generation loop of its own (``runtimes.ovgenai``): its greedy trace, which
        :func:`greedy` uses when it keeps no logits and forces no tokens; None: :func:`greedy` steps a session."""
        return None

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
        f = runner.artifact.file  # with its data files: ONNX external data, an OpenVINO IR's .bin
        self.size_mb = (f.size_bytes + sum(d.size_bytes for d in f.external_data)) / 2**20
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


def own_attention(folder: Path) -> dict[str, str]:
    """``from_pretrained``'s attention for a model whose config caps its attention logits (gemma2's
    ``attn_logit_softcapping``): its own eager attention, which applies the cap as Optimum's export does;
    transformers' default SDPA ignores it and gives other logits. Else nothing (the default)."""
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {"attn_implementation": "eager"} if isinstance(config, dict) and config.get("attn_logit_softcapping") \
        else {}


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
            model = transformers.AutoModelForCausalLM.from_pretrained(str(self.folder), local_files_only=True,
                                                                      **own_attention(self.folder))
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
    if forced is None and not keep_logits and (own := decoder.generate(prompt, steps)) is not None:
        return own
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
    return np.moveaxis(decoder.continuation_logits(prompt, tokens[:, :-1]), 1, 0).astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis (0 where either vector is zero)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.asarray(np.where(den > 0, (a64 * b64).sum(-1) / np.maximum(den, 1e-300), 0.0))


def greedy_no_cache(decoder: Decoder, prompt: np.ndarray, steps: int) -> Trace:
    """The same greedy loop with no cache: every new token a full forward over prompt + tokens so far."""
    clock = time.perf_counter_ns
    t0 = clock()
    ids = np.zeros((prompt.shape[0], 0), dtype=np.int64)
    tokens = [decoder.continuation_logits(prompt, ids)[:, -1].argmax(-1)]
    t1 = clock()
    for _ in range(steps):
        ids = np.concatenate([ids, tokens[-1][:, None].astype(np.int64)], axis=1)
        tokens.append(decoder.continuation_logits(prompt, ids)[:, -1].argmax(-1))
    t2 = clock()
    return Trace(tokens=np.stack(tokens, axis=1), prefill_ms=(t1 - t0) / 1e6, decode_ms=(t2 - t1) / 1e6)


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
