"""ONNX Runtime GenAI's generator as a backend of the generation benchmark (``runtimes.generation``).

ONNX Runtime GenAI (``pip install .[genai]``, module ``onnxruntime_genai``) runs a decoder from a folder that holds
the ONNX file and a ``genai_config.json`` describing it. Convert writes no such file, and the artifact folder is
never written into (the manifest hashes every file), so :class:`GenaiDecoder` writes one per variant into a temporary
folder beside links to the variant's files (:func:`write_genai_config`).

The config follows the schema ONNX Runtime GenAI's own model builder writes (``Model.make_genai_config`` in
``onnxruntime_genai/models/builders/base.py`` of onnxruntime-genai 0.18.0): ``model.decoder`` with ``filename``,
``head_size``, ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``, ``num_key_value_heads``, ``inputs``
(``input_ids``, ``attention_mask``, ``position_ids`` where the model takes them, ``past_key_names``/
``past_value_names`` as ``past_key_values.%d.key``/``.value``) and ``outputs`` (``logits``, ``present_key_names``/
``present_value_names`` as ``present.%d.key``/``.value``), ``model.type``, ``vocab_size``, ``context_length``, the
special token ids, and ``search``. Optimum's ``text-generation-with-past`` export uses exactly these names. The
``type`` written is ``llama`` for every decoder: it selects GenAI's generic decoder-only state (one past key and one
past value tensor per layer, optional mask and positions); GenAI's ``gpt2`` type expects its own builder's combined
``past_%d`` cache and cannot bind Optimum's gpt2 export.

Each decode step feeds the token the benchmark's greedy loop chose (``Generator.append_tokens``) and reads the last
position's logits (``Generator.get_logits``), so GenAI never stops at an EOS token and the checks (teacher forcing
included) drive it like every other backend; the session's first ``append_tokens`` is the prefill. Prompts are
unpadded: the ``pad_token_id`` written is one no prompt can hold (GenAI masks pad tokens out of a batch's prompts).
A variant GenAI cannot load or run is skipped with the line the library gave.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import BackendUnavailableError, first_line
from runtimes.decoding import Decoder, GenerationConfig, hf_folder, max_positions
from runtimes.session import PAST, PAST_DIM, PRESENT, has_kv_cache

if TYPE_CHECKING:
    from core.manifest import Artifact, Manifest

NAME = "genai"
INSTALL = "onnxruntime-genai is not installed (pip install .[genai])"
#: GenAI's generic decoder-only model type (see the module docstring)
MODEL_TYPE = "llama"
LOGITS = "logits"


def unavailable() -> str | None:
    """None when ``onnxruntime_genai`` imports, else the one line that says how to install it."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return INSTALL
    return None


def _hf_config(manifest: Manifest) -> dict[str, Any]:
    folder = hf_folder(manifest)
    if folder is None:
        return {}
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config if isinstance(config, dict) else {}


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        if isinstance(config.get(k), int) and not isinstance(config.get(k), bool):
            return int(config[k])
    return None


def genai_config(manifest: Manifest, filename: str, positions: int | None, threads: int | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` of the decoder file ``filename`` (the module docstring gives the schema's source):
    layer count, KV heads and head size from the IOSpec's cache inputs, the vocabulary from ``logits``, attention
    heads and hidden size from the Hugging Face config where the manifest records one; ``threads``: ONNX Runtime's
    intra-op threads."""
    spec = manifest.iospec
    if not has_kv_cache(spec) or LOGITS not in spec.output_names:
        raise BackendUnavailableError(f"{NAME}: not a decoder with a KV cache and logits")
    keys = [n for n in spec.input_names if n.startswith(PAST) and n.endswith(".key")]
    if [f"{PAST}{i}.key" for i in range(len(keys))] != keys or \
            any(f"{PAST}{i}.value" not in spec.input_names for i in range(len(keys))):
        raise BackendUnavailableError(f"{NAME}: cache inputs are not named {PAST}<layer>.key/.value")
    shape = spec.input(keys[0]).shape
    if len(shape) != 4 or shape[2] != PAST_DIM or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise BackendUnavailableError(f"{NAME}: cache input {keys[0]} has shape {shape}, not "
                                      f"(batch, kv_heads, {PAST_DIM}, head_size)")
    kv_heads, head_size = int(shape[1]), int(shape[3])
    vocab = next(t for t in spec.outputs if t.name == LOGITS).shape[-1]
    if not isinstance(vocab, int):
        raise BackendUnavailableError(f"{NAME}: the logits' vocabulary dim is symbolic ({vocab})")
    hf = _hf_config(manifest)
    heads = _first_int(hf, "num_attention_heads", "n_head") or kv_heads
    hidden = _first_int(hf, "hidden_size", "n_embd") or heads * head_size
    context = positions or _first_int(hf, "max_position_embeddings", "n_positions") or 2048
    eos = _first_int(hf, "eos_token_id")
    bos = _first_int(hf, "bos_token_id")
    inputs: dict[str, str] = {"input_ids": "input_ids"}
    inputs |= {n: n for n in ("attention_mask", "position_ids") if n in spec.input_names}
    inputs |= {"past_key_names": f"{PAST}%d.key", "past_value_names": f"{PAST}%d.value"}
    return {
        "model": {
            "bos_token_id": bos if bos is not None and 0 <= bos < vocab else 0,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxkit-genai", "provider_options": []}
                | ({"intra_op_num_threads": threads} if threads else {}),
                "filename": filename,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": {"logits": LOGITS, "present_key_names": f"{PRESENT}%d.key",
                            "present_value_names": f"{PRESENT}%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": len(keys),
                "num_key_value_heads": kv_heads,
            },
            # the loop feeds every token itself (append_tokens), so EOS never ends it; GenAI wants one in range
            "eos_token_id": eos if eos is not None and 0 <= eos < vocab else vocab - 1,
            # no prompt token is ever padding (GenAI masks pad tokens of a batch's prompts)
            "pad_token_id": -1,
            "type": MODEL_TYPE,
            "vocab_size": vocab,
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
                   "min_length": 0, "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_genai_config(manifest: Manifest, base: Path, artifact: Artifact, folder: Path, positions: int | None,
                       threads: int | None = None) -> Path:
    """``folder`` with links to the artifact's files (its ONNX file and external data, copied where links cannot be
    made) and their ``genai_config.json``; the artifact folder itself is only read."""
    for rel in artifact.file.paths():
        src, dst = (base / rel).resolve(), folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    config = genai_config(manifest, artifact.file.path, positions, threads)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


class _GenaiSession:
    """One ``og.Generator``: created at the first step (the batch is the prompt's), whose ``append_tokens`` is the
    prefill. A decode step at batch 1 appends the token fed. GenAI takes ``append_tokens`` once per generator at a
    larger batch, so there the step sets the logits to the one-hot of the tokens fed and lets the greedy search pick
    them (``generate_next_token``): the tokens run are the ones fed, checked. GenAI's search ends a sequence at its
    EOS token (and 0.18.0 then fails the next step), so a batch > 1 step that feeds the EOS token is run as a new
    generator's prefill over everything fed so far instead (counted: ``GenaiDecoder.eos_replays``)."""

    def __init__(self, decoder: GenaiDecoder) -> None:
        self.decoder = decoder
        self.generator: Any = None
        self.batch = 0
        self.fed: list[np.ndarray] = []

    def _start(self, ids: np.ndarray) -> None:
        og, model = self.decoder.og, self.decoder.model
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=self.decoder.context, batch_size=self.batch)
        self.generator = og.Generator(model, params)
        self.generator.append_tokens(ids)

    def step(self, ids: np.ndarray) -> np.ndarray:
        ids32 = np.ascontiguousarray(ids, dtype=np.int32)
        if self.generator is None:
            self.batch = int(ids.shape[0])
            self._start(ids32)
        elif self.batch == 1:
            self.generator.append_tokens(ids32)
        else:
            fed = ids32[:, -1]
            if ids32.shape[1] != 1:
                raise RuntimeError(f"{NAME}: a decode step at batch {self.batch} feeds one token per sequence")
            if (fed == self.decoder.eos).any():
                self.decoder.eos_replays += 1
                self._start(np.concatenate([*self.fed, ids32], axis=1))
            else:
                onehot = np.zeros((self.batch, self.decoder.vocab), np.float32)
                onehot[np.arange(self.batch), fed] = 1.0
                self.generator.set_logits(onehot)
                self.generator.generate_next_token()
                if not np.array_equal(np.asarray(self.generator.get_next_tokens()), fed):
                    raise RuntimeError(f"{NAME}: the generator ran other tokens than the ones fed")
        if self.batch > 1:
            self.fed.append(ids32)
        return np.asarray(self.generator.get_logits())[:, -1]

    def cache_bytes(self) -> int:
        """The present tensors' bytes (the past GenAI feeds the next step)."""
        if self.generator is None:
            return 0
        return sum(int(np.asarray(self.generator.get_output(f"{PRESENT}{i}.{kv}")).nbytes)
                   for i in range(self.decoder.layers) for kv in ("key", "value"))


class GenaiDecoder(Decoder):
    """An ONNX variant run by ONNX Runtime GenAI's generator (see the module docstring)."""

    def __init__(self, manifest: Manifest, base: Path, artifact: Artifact, positions: int | None,
                 threads: int | None = None) -> None:
        self.manifest, self.base, self.artifact, self.positions = manifest, base, artifact, positions
        self.threads = threads
        self.backend, self.variant, self.precision = NAME, artifact.name, artifact.precision
        self.size_mb = artifact.file.size_bytes / 2**20
        self.layers = sum(1 for n in manifest.iospec.input_names if n.startswith(PAST) and n.endswith(".key"))
        self.og: Any = None
        self.model: Any = None
        self.context, self.eos, self.vocab = positions or 2048, -1, 0
        self.eos_replays = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def load(self) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise BackendUnavailableError(INSTALL) from None
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxkit-genai-")
        try:
            folder = write_genai_config(self.manifest, self.base, self.artifact, Path(self._tmp.name),
                                        self.positions, self.threads)
            config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
            self.context, self.eos, self.vocab = config["context_length"], config["eos_token_id"], config["vocab_size"]
            self.og, self.model = og, og.Model(str(folder))
            token = np.int64((self.eos + 1) % self.vocab)  # a generator runs at batch 1 and 2: bindings checked here
            for batch in (1, 2) if self.manifest.iospec.dynamic_batch else (1,):
                probe = _GenaiSession(self)
                probe.step(np.full((batch, 2), token))
                probe.step(np.full((batch, 1), token))
        except BackendUnavailableError:
            self.close()
            raise
        except Exception as exc:  # GenAI raises RuntimeError (or its OrtException) with the reason
            self.close()
            raise BackendUnavailableError(f"onnxruntime-genai cannot run {self.artifact.file.path}: "
                                          f"{first_line(exc)}") from None

    def close(self) -> None:
        self.model = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def extra(self) -> dict[str, Any]:
        return {"genai_eos_replays": self.eos_replays, "genai_eos_token_id": self.eos}

    def session(self) -> _GenaiSession:
        return _GenaiSession(self)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits of ``ids`` with no cache: a fresh generator's prefill, its ``logits`` output."""
        s = _GenaiSession(self)
        s.step(ids)
        return np.asarray(s.generator.get_output(LOGITS))


def genai_decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
    """A :class:`GenaiDecoder` per ONNX variant the request runs (every ok one, or ``cfg.variants``); none, with the
    reason added to ``skipped``, when onnxruntime-genai is not installed."""
    if (why := unavailable()) is not None:
        skipped.append(f"{NAME}: {why}")
        return []
    arts = [a for a in manifest.artifacts.values() if a.kind == "onnx"
            and (a.name in cfg.variants if cfg.variants is not None else a.status == "ok")]
    positions = max_positions(manifest)
    return [GenaiDecoder(manifest, base, a, positions, cfg.threads) for a in arts]
