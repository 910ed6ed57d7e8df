"""Encoder-decoder generation (t5, bart, whisper exported by Optimum as components): the same greedy-loop interface
as a decoder-only model (:class:`runtimes.decoding.Decoder`), so ``greedy``/``forced_logits``/the generation
benchmark and convert's generation check run them unchanged.

A session's first ``step`` takes the *source* (t5/bart: ``input_ids``, batch x tokens, with an all-ones
``attention_mask``; whisper: audio features, time-major, batch x frames x mel bins, zero-padded to the encoder's
window, :func:`to_features`): the encoder runs once on it, then the
decoder's first step on the config's ``decoder_start_token_id``; its logits are the step's. That first decoder step
(no past) also gives the cross-attention past (``present.<i>.encoder.*``, Optimum's layout: batch x heads x encoder
sequence x head dim), kept for every later step; each later ``step`` feeds the new decoder tokens with the
self-attention past (``present.<i>.decoder.*`` of the step before) and that cross-attention past. So the prefill
(time to first token) is the encoder plus the first decoder step.

- :class:`Seq2SeqOnnxDecoder`: an ONNX variant's components through runners (``ort``, ``openvino``; one runner per
  component file, :meth:`core.manifest.Manifest.component_view`). ``path="merged"``: ``decoder_model_merged`` (its
  ``use_cache_branch`` False on the first step, with placeholder pasts, True after); ``path="split"``:
  ``decoder_model`` then ``decoder_with_past_model`` (OpenVINO's default: its CPU plug-in refuses the merged
  decoder's ``If``). The no-cache path (:meth:`continuation_logits`) is
  the encoder once per source, then ``decoder_model`` over start token + tokens (the merged decoder's no-cache branch when no ``decoder_model``).
- :class:`Seq2SeqTorchDecoder`: transformers' model (``AutoModelForSeq2SeqLM``/``AutoModelForSpeechSeq2Seq``) of the
  source folder with the weights convert saved: the encoder once, then ``use_cache=True`` steps with its
  ``past_key_values`` (what ``model.generate`` does greedily, without stopping at an end token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import BackendUnavailableError, InputError, first_line
from core.manifest import Artifact, Manifest
from runtimes.base import Runner, RunnerOptions
from runtimes.decoding import LOGITS, Decoder, DecodeSession, _cache_bytes

ENCODER, DECODER, WITH_PAST, MERGED = "encoder_model", "decoder_model", "decoder_with_past_model", \
    "decoder_model_merged"
PAST, PRESENT, BRANCH = "past_key_values.", "present.", "use_cache_branch"
#: the encoder inputs a source may be: token ids (t5, bart) or audio features (whisper)
SOURCES = ("input_ids", "input_features")


def source_name(manifest: Manifest) -> str:
    """The encoder's source input: ``input_ids`` or ``input_features``."""
    names = manifest.artifacts["fp32"].components[ENCODER].iospec.input_names
    found = [n for n in SOURCES if n in names]
    if not found:
        raise InputError(f"{ENCODER}: no source input ({' or '.join(SOURCES)}) among {', '.join(names)}")
    return found[0]


def start_token(folder: Path | None, manifest: Manifest) -> int:
    """The decoder's first token, as transformers' ``generate`` picks it: ``decoder_start_token_id`` of the folder's
    generation config or config, else their ``bos_token_id``."""
    if folder is not None:
        configs = [json.loads((folder / n).read_text(encoding="utf-8"))
                   for n in ("generation_config.json", "config.json") if (folder / n).is_file()]
        for key in ("decoder_start_token_id", "bos_token_id"):
            for config in configs:
                if isinstance(value := config.get(key), int):
                    return value
    raise InputError(f"{manifest.source.model}: no decoder_start_token_id (nor bos_token_id) in its config: the "
                     "decoder has no first token")


def decoder_positions(folder: Path | None) -> int | None:
    """The most tokens the decoder takes (start token included): ``max_target_positions`` (whisper), else
    ``max_position_embeddings`` (bart); None where positions are relative (t5)."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in ("max_target_positions", "max_position_embeddings"):
        if isinstance(value := config.get(key), int):
            return value
    return None


def check_positions(limit: int | None, used: int, new: int) -> None:
    """One line instead of an index error deep in the model when a loop runs past the decoder's positions."""
    if limit is not None and used + new > limit:
        raise InputError(f"{used + new} decoder tokens (start token included): the model's decoder takes at most "
                         f"{limit} positions; generate fewer new tokens")


def audio_window(manifest: Manifest) -> tuple[int, int] | None:
    """(mel bins, frames) of an audio encoder's fixed input window (whisper: ``input_features`` batch x mel x frames);
    None for a token source."""
    if source_name(manifest) != "input_features":
        return None
    spec = manifest.artifacts["fp32"].components[ENCODER].iospec
    dims = spec.input("input_features").shape[1:]
    mel, frames = (int(d) if isinstance(d, int) else int(spec.dims[str(d)]) for d in dims)
    return mel, frames


def to_features(source: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """An audio source, time-major (batch x frames x mel bins, at most the window's frames: its prompt length is its
    frame count), as the encoder takes it: batch x mel x window frames, zero-padded after its end (whisper's feature
    extractor pads every clip to its 30 s window too)."""
    mel, frames = window
    if source.ndim != 3 or source.shape[2] != mel:
        raise InputError(f"an audio source is batch x frames x {mel} mel bins, got shape {list(source.shape)}")
    if source.shape[1] > frames:
        raise InputError(f"a source of {source.shape[1]} frames: the encoder takes at most {frames} (its window)")
    out = np.zeros((source.shape[0], mel, frames), dtype=np.float32)
    out[:, :, :source.shape[1]] = np.swapaxes(source, 1, 2)
    return out


def seeded_sources(manifest: Manifest, batch: int, length: int | None, seed: int) -> np.ndarray:
    """Seeded sources: token ids inside the encoder's vocabulary range (batch x ``length``), or audio features,
    time-major (batch x ``length`` frames x mel bins; None: the encoder's whole window; see :func:`to_features`)."""
    rng = np.random.default_rng(seed)
    window = audio_window(manifest)
    if window is None:
        spec = manifest.artifacts["fp32"].components[ENCODER].iospec
        lo, hi = spec.input("input_ids").int_range or (0, 2)
        return rng.integers(lo, hi, size=(batch, length or 16), dtype=np.int64)
    frames = window[1] if length is None else length
    return rng.standard_normal(size=(batch, frames, window[0])).astype(np.float32)


def _same(memo: tuple[np.ndarray, Any], prompt: np.ndarray, ids: np.ndarray) -> bool:
    """Whether the no-cache path may reuse ``memo``'s encoder output: the same source, and not a loop's first step
    (each no-cache loop, ``greedy_no_cache``, runs its encoder once, so its time counts in every loop)."""
    return ids.shape[1] > 0 and np.array_equal(memo[0], prompt)


def _start_ids(batch: int, token: int) -> np.ndarray:
    return np.full((batch, 1), token, dtype=np.int64)


# -- ONNX: the components through runners ------------------------------------------------------------------------------
class _Component:
    """One component file of a variant on a runner; outputs by name."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.spec = runner.manifest.iospec
        self.inputs = set(self.spec.input_names)

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.runner.infer({k: v for k, v in feed.items() if k in self.inputs})
        return dict(zip(self.spec.output_names, outs, strict=True))


def _placeholder(spec: Any, name: str, batch: int) -> np.ndarray:
    """A past the merged decoder's no-cache branch does not read: zeros of length 1 in its symbolic dims."""
    t = spec.input(name)
    return np.zeros([batch if d == "batch" else d if isinstance(d, int) else 1 for d in t.shape], dtype=t.dtype)


class _OnnxSession:
    def __init__(self, decoder: Seq2SeqOnnxDecoder) -> None:
        self.d = decoder
        self.enc: dict[str, np.ndarray] = {}
        self.cross: dict[str, np.ndarray] = {}
        self.self_past: dict[str, np.ndarray] = {}
        self.length = 0

    def _encode(self, source: np.ndarray) -> None:
        d = self.d
        feed = {d.source: source if d.window is None else to_features(source, d.window)}
        if d.source == "input_ids":
            feed["attention_mask"] = np.ones(source.shape, dtype=np.int64)
        self.enc = {"encoder_hidden_states": d.parts[ENCODER](feed)["last_hidden_state"]}
        if d.source == "input_ids":
            self.enc["encoder_attention_mask"] = feed["attention_mask"]

    def _keep(self, out: dict[str, np.ndarray], first: bool) -> None:
        for name, value in out.items():
            if not name.startswith(PRESENT):
                continue
            past = PAST + name[len(PRESENT):]
            if ".decoder." in name:
                self.self_past[past] = value
            elif first:  # the cross-attention past: from the first decoder step only
                self.cross[past] = value

    def step(self, ids: np.ndarray) -> np.ndarray:
        d = self.d
        check_positions(d.positions, self.length, 1 if not self.enc else ids.shape[1])
        if not self.enc:  # the source: encoder, then the decoder's first step on the start token
            self.length = 1
            self._encode(ids)
            batch = ids.shape[0]
            tokens = _start_ids(batch, d.start)
            if d.path == "merged":
                comp = d.parts[MERGED]
                feed = {**self.enc, "input_ids": tokens, BRANCH: np.zeros([1], dtype=bool)}
                feed |= {n: _placeholder(comp.spec, n, batch) for n in comp.inputs if n.startswith(PAST)}
                out = comp(feed)
            else:
                out = d.parts[DECODER]({**self.enc, "input_ids": tokens})
            self._keep(out, first=True)
            return out[LOGITS][:, -1]
        tokens = ids.astype(np.int64)
        self.length += tokens.shape[1]
        if d.path == "merged":
            out = d.parts[MERGED]({**self.enc, "input_ids": tokens, BRANCH: np.ones([1], dtype=bool),
                                   **self.self_past, **self.cross})
        else:
            out = d.parts[WITH_PAST]({**self.enc, "input_ids": tokens, **self.self_past, **self.cross})
        self._keep(out, first=False)
        return out[LOGITS][:, -1]

    def cache_bytes(self) -> int:
        return sum(int(a.nbytes) for a in [*self.self_past.values(), *self.cross.values()])


class Seq2SeqOnnxDecoder(Decoder):
    """An ONNX variant's encoder and decoder components on backend ``backend`` (a name of ``runtimes.RUNNERS``)."""

    def __init__(self, manifest: Manifest, base: Path, variant: str, backend: str, options: RunnerOptions,
                 path: str | None = None, start: int | None = None) -> None:
        from runtimes import RUNNERS
        from runtimes.decoding import hf_folder

        art: Artifact = manifest.artifacts[variant]
        comps = set(art.components)
        # OpenVINO's CPU plug-in refuses the merged decoder's If (outputs of dynamic rank): its two decoders instead
        self.path = path or ("merged" if MERGED in comps and backend != "openvino" else "split")
        needed = [ENCODER, DECODER] + ([MERGED] if self.path == "merged" else [WITH_PAST])
        if self.path == "merged" and DECODER not in comps:
            needed.remove(DECODER)
        if missing := [c for c in needed if c not in comps]:
            raise InputError(f"{backend}:{variant}: no {', '.join(missing)} component for the {self.path} decoder "
                             f"(components: {', '.join(art.components)})")
        self.backend, self.variant, self.precision = backend, variant, art.precision
        self.size_mb = sum(art.components[c].file.size_bytes for c in needed) / 2**20
        self.source, self.window = source_name(manifest), audio_window(manifest)
        self.start = start if start is not None else start_token(hf_folder(manifest), manifest)
        self.positions = decoder_positions(hf_folder(manifest))
        self.runners: dict[str, Runner] = {}
        for c in needed:
            view = manifest.component_view(c)
            self.runners[c] = RUNNERS[backend](view, base, view.artifacts[variant], options)
        self.parts: dict[str, _Component] = {}
        self._memo: tuple[np.ndarray, _OnnxSession] | None = None

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.variant}" + ("" if self.path == "merged" else f":{self.path}")

    def load(self) -> None:
        try:
            for name, runner in self.runners.items():
                runner.load()
                self.parts[name] = _Component(runner)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.parts, self._memo = {}, None

    def session(self) -> DecodeSession:
        return _OnnxSession(self)

    def continuation_logits(self, prompt: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """No cache: the encoder on ``prompt`` (once per source and loop, as transformers'
        ``generate(use_cache=False)``), then the decoder over start token + ``ids`` in one call."""
        if self._memo is None or not _same(self._memo, prompt, ids):
            fresh = _OnnxSession(self)
            fresh._encode(prompt)
            self._memo = (prompt.copy(), fresh)
        s = self._memo[1]
        tokens = np.concatenate([_start_ids(prompt.shape[0], self.start), ids.astype(np.int64)], axis=1)
        check_positions(self.positions, 0, tokens.shape[1])
        if DECODER in self.parts:
            return self.parts[DECODER]({**s.enc, "input_ids": tokens})[LOGITS]
        comp = self.parts[MERGED]
        feed = {**s.enc, "input_ids": tokens, BRANCH: np.zeros([1], dtype=bool)}
        feed |= {n: _placeholder(comp.spec, n, prompt.shape[0]) for n in comp.inputs if n.startswith(PAST)}
        return comp(feed)[LOGITS]

    def extra(self) -> dict[str, Any]:
        return {"decoder": self.path}


# -- eager: transformers' own model ------------------------------------------------------------------------------------
class _TorchSession:
    def __init__(self, decoder: Seq2SeqTorchDecoder) -> None:
        self.d = decoder
        self.kwargs: dict[str, Any] = {}
        self.past: Any = None
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        import torch

        d = self.d
        new = 1 if not self.kwargs else ids.shape[1]
        check_positions(d.positions, self.length, new)
        self.length += new
        with torch.inference_mode():
            if not self.kwargs:
                self.kwargs = d.encode(ids)
                tokens = torch.from_numpy(_start_ids(ids.shape[0], d.start))
            else:
                tokens = torch.from_numpy(np.ascontiguousarray(ids.astype(np.int64)))
            out = d.model(**self.kwargs, decoder_input_ids=tokens, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return np.asarray(out.logits[:, -1].float().numpy())

    def cache_bytes(self) -> int:
        past = self.past
        parts = [getattr(past, n) for n in ("self_attention_cache", "cross_attention_cache") if hasattr(past, n)]
        return sum(_cache_bytes(p) for p in parts) if parts else _cache_bytes(past)


class Seq2SeqTorchDecoder(Decoder):
    """transformers' encoder-decoder of the source folder with the weights convert saved (``saved_weights=False``:
    the folder's own), greedy with ``use_cache=True``."""

    def __init__(self, manifest: Manifest, base: Path, folder: Path, *, threads: int | None = None,
                 saved_weights: bool = True) -> None:
        self.folder, self.threads = folder, threads
        self.backend = "eager"
        weights = [a for a in manifest.artifacts.values()
                   if saved_weights and a.kind == "state_dict" and a.status == "ok"]
        self.weights = base / weights[0].file.path if weights else None
        self.variant = weights[0].name if weights else "hf"
        self.size_mb = weights[0].file.size_bytes / 2**20 if weights else None
        self.source, self.window = source_name(manifest), audio_window(manifest)
        self.start = start_token(folder, manifest)
        self.positions = decoder_positions(folder)
        self.model: Any = None
        self._threads_before: int | None = None
        self._memo: tuple[np.ndarray, dict[str, Any]] | None = None

    def load(self) -> None:
        import torch

        try:
            import transformers
        except ImportError as exc:
            raise BackendUnavailableError(f"eager: needs transformers ({first_line(exc)})") from None
        if self.threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        auto = transformers.AutoModelForSpeechSeq2Seq if self.source == "input_features" else \
            transformers.AutoModelForSeq2SeqLM
        try:
            model = auto.from_pretrained(str(self.folder), local_files_only=True)
            if self.weights is not None:
                model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True), strict=True)
        except Exception as exc:
            self.close()
            raise BackendUnavailableError(f"eager: cannot load {self.folder} as an encoder-decoder: "
                                          f"{first_line(exc, with_type=True)}") from None
        self.model = model.eval()

    def close(self) -> None:
        import torch

        self.model, self._memo = None, None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def encode(self, source: np.ndarray) -> dict[str, Any]:
        """The encoder once: what every decoder call takes (its outputs, and the source's mask)."""
        import torch

        src = torch.from_numpy(np.ascontiguousarray(source))
        if self.source == "input_ids":
            mask = torch.ones_like(src)
            return {"encoder_outputs": self.model.get_encoder()(input_ids=src, attention_mask=mask),
                    "attention_mask": mask}
        assert self.window is not None  # an audio source
        features = torch.from_numpy(to_features(source, self.window))
        return {"encoder_outputs": self.model.get_encoder()(input_features=features)}

    def session(self) -> DecodeSession:
        return _TorchSession(self)

    def continuation_logits(self, prompt: np.ndarray, ids: np.ndarray) -> np.ndarray:
        import torch

        tokens = np.concatenate([_start_ids(prompt.shape[0], self.start), ids.astype(np.int64)], axis=1)
        check_positions(self.positions, 0, tokens.shape[1])
        with torch.inference_mode():
            if self._memo is None or not _same(self._memo, prompt, ids):  # the encoder once per source and loop
                self._memo = (prompt.copy(), self.encode(prompt))
            out = self.model(**self._memo[1], decoder_input_ids=torch.from_numpy(tokens), use_cache=False)
        return np.asarray(out.logits.float().numpy())


def seq2seq_decoders(manifest: Manifest, base: Path, backends: list[str], variants: list[str] | None,
                     options: RunnerOptions, skipped: list[str]) -> list[Decoder]:
    """The generation benchmark's decoders of an encoder-decoder: eager (the source folder) and each ONNX variant on
    ``ort``/``openvino``; a backend without an encoder-decoder loop here is added to ``skipped`` with the reason."""
    from runtimes import RUNNERS
    from runtimes.decoding import hf_folder

    out: list[Decoder] = []
    onnx = [a.name for a in manifest.artifacts.values() if a.kind == "onnx"
            and (a.name in variants if variants is not None else a.status == "ok")]
    for b in backends:
        if b == "eager":
            folder = hf_folder(manifest)
            if folder is None:
                skipped.append(f"eager: no Hugging Face source folder recorded that is still there "
                               f"({manifest.source.model})")
            else:
                out.append(Seq2SeqTorchDecoder(manifest, base, folder, threads=options.threads))
        elif b in ("ort", "openvino"):
            if (why := RUNNERS[b].available("cpu")) is not None:
                skipped.append(f"{b}: {why}")
                continue
            out += [Seq2SeqOnnxDecoder(manifest, base, v, b, options) for v in onnx]
        else:
            skipped.append(f"{b}: no encoder-decoder generation loop (eager, ort and openvino have one)")
    return out
