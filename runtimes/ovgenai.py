"""openvino-genai's ``LLMPipeline`` as a backend of the generation benchmark (``ovgenai``): OpenVINO's own generation
loop, in C++, on the stateful model of each variant (``runtimes.ovstateful``).

openvino-genai (``pip install .[ovgenai]``, module ``openvino_genai``) reads a folder with ``openvino_model.xml/.bin``
(a stateful decoder with ``input_ids``, ``attention_mask``, ``position_ids``, ``beam_idx``), ``config.json`` and
``generation_config.json``. Convert writes no such folder and the artifact folder is never written into, so
:class:`OvGenaiDecoder` writes one per variant into a temporary folder: the stateful IR, the Hugging Face
``config.json`` of the source folder (or a minimal one), and a ``generation_config.json`` with the EOS id. The
toolkit's prompts are token ids, so the pipeline is fed ``TokenizedInputs`` (ids and mask as ``ov.Tensor``) and gives
``EncodedResults``: no tokenizer IR is needed, none is converted.

Timing: one ``generate`` call (greedy, ``ignore_eos``, exactly the steps asked) is one generation loop; its time to
first token is the pipeline's own (``PerfMetrics.get_ttft``), the decode steps' time the call's wall time after it
(``perf_counter_ns`` around ``generate``). Tokens: the pipeline's ``EncodedResults``, graded for agreement like every
backend's. The pipeline exposes no logits and cannot be fed tokens it did not choose, so the checks' teacher-forced
logits (cosine), the no-cache forward and perplexity run the *same* stateful IR on an OpenVINO infer request
(:class:`runtimes.ovstateful.StatefulRequest`) and say so in the row's ``extra``; free-running agreement and
``kv_matches_no_cache`` compare the pipeline's own tokens.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import BackendUnavailableError, first_line
from core.flops import openvino_config
from core.sigstack import keep_valid
from runtimes.decoding import Decoder, Trace, hf_folder
from runtimes.ovstateful import (
    KV_CACHE_PRECISION,
    StatefulDecoder,
    StatefulRequest,
    state_map,
    stateful_model,
    write_ir,
)
from runtimes.session import PAST, PAST_DIM

if TYPE_CHECKING:
    from core.manifest import Artifact, Manifest
    from runtimes.decoding import GenerationConfig

NAME = "ovgenai"
INSTALL = "openvino-genai is not installed (pip install .[ovgenai])"
#: the artifact kinds whose file is a decoder OpenVINO reads (ONNX; an OpenVINO IR written by convert)
KINDS = ("onnx", "openvino_ir")


def unavailable() -> str | None:
    """None when ``openvino_genai`` imports, else the one line that says how to install it."""
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        return INSTALL
    return None


def _hf_config(manifest: Manifest, vocab: int) -> dict[str, Any]:
    """The source folder's ``config.json`` (the pipeline reads it), else a minimal decoder config."""
    folder = hf_folder(manifest)
    if folder is not None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict):
            return config
    return {"model_type": "llama", "vocab_size": vocab}


def write_pipeline_folder(manifest: Manifest, base: Path, artifact: Artifact, folder: Path,
                          pairs: dict[str, str] | None = None) -> dict[str, Any]:
    """``folder`` as LLMPipeline reads it (see the module docstring); the stateful model returned beside the
    ``generation_config.json`` written. The EOS id is one the vocabulary holds (the loop ignores it anyway)."""
    model = stateful_model(base / artifact.file.path, manifest.iospec, pairs)
    write_ir(model, folder)
    vocab = int(model.output("logits").get_partial_shape()[-1].get_length())
    config = _hf_config(manifest, vocab)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    eos = config.get("eos_token_id")
    generation = {"eos_token_id": eos if isinstance(eos, int) and 0 <= eos < vocab else vocab - 1}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return {"model": model, "vocab": vocab} | generation


class OvGenaiDecoder(StatefulDecoder):
    """A variant run by openvino-genai's LLMPipeline (see the module docstring); teacher forcing and logits run on
    the same stateful IR on an OpenVINO request (``stateful``: the pipeline exposes none)."""

    def __init__(self, manifest: Manifest, base: Path, artifact: Artifact, threads: int | None = None,
                 pairs: dict[str, str] | None = None) -> None:
        self.manifest, self.base, self.artifact, self.threads, self.pairs = manifest, base, artifact, threads, pairs
        self.backend, self.variant, self.precision = NAME, artifact.name, artifact.precision
        f = artifact.file  # with its data files: ONNX external data, an OpenVINO IR's .bin
        self.size_mb = (f.size_bytes + sum(d.size_bytes for d in f.external_data)) / 2**20
        self.config = openvino_config("LATENCY", threads) | {"KV_CACHE_PRECISION": KV_CACHE_PRECISION["f32"]}
        self.og: Any = None
        self.ov: Any = None
        self.pipe: Any = None
        self.stateful: StatefulRequest | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def load(self) -> None:
        try:
            import openvino as ov
            import openvino_genai as og
        except ImportError:
            raise BackendUnavailableError(INSTALL) from None
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxkit-ovgenai-")
        try:
            written = write_pipeline_folder(self.manifest, self.base, self.artifact, Path(self._tmp.name), self.pairs)
            self.og, self.ov = og, ov
            self.pipe = og.LLMPipeline(self._tmp.name, "CPU", **self.config)
            self.stateful = StatefulRequest(written["model"], self.config)
            for batch in (1, 2) if self.manifest.iospec.dynamic_batch else (1,):  # bindings checked here
                self.generate(np.ones((batch, 2), np.int64), 1)
        except BackendUnavailableError:
            self.close()
            raise
        except Exception as exc:  # openvino-genai raises RuntimeError with the reason
            self.close()
            raise BackendUnavailableError(f"openvino-genai cannot run {self.artifact.file.path}: "
                                          f"{first_line(exc)}") from None

    def close(self) -> None:
        self.pipe = None
        self.stateful = None
        keep_valid()  # the pipeline freed its plugin's signal stack, which may still be set (core.sigstack)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def generate(self, prompt: np.ndarray, steps: int) -> Trace:
        """The pipeline's greedy loop: ``steps + 1`` tokens (the prefill's, then one per decode step), EOS ignored."""
        if self.pipe is None:
            raise RuntimeError(f"{self.label}: load() first")
        og, ov = self.og, self.ov
        cfg = og.GenerationConfig()
        # ignore_eos: exactly max_new_tokens, EOS chosen like any token; min_new_tokens would mask EOS's logit and
        # change the tokens of a model that emits it (mistral's coverage row, benchmarks/run_gen_coverage.py)
        cfg.do_sample, cfg.ignore_eos = False, True
        cfg.max_new_tokens = steps + 1
        ids = np.ascontiguousarray(prompt, dtype=np.int64)
        inputs = og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones(ids.shape, np.int64)))
        t0 = time.perf_counter_ns()
        result = self.pipe.generate(inputs, cfg)
        total_ms = (time.perf_counter_ns() - t0) / 1e6
        tokens = np.asarray(result.tokens, dtype=np.int64)
        if tokens.shape != (ids.shape[0], steps + 1):
            raise RuntimeError(f"{NAME}: the pipeline gave tokens of shape {tokens.shape}, not "
                               f"{(ids.shape[0], steps + 1)}")
        ttft = float(result.perf_metrics.get_ttft().mean)
        return Trace(tokens=tokens, prefill_ms=ttft, decode_ms=max(total_ms - ttft, 0.0),
                     cache_bytes=self.cache_bytes(ids.shape[0], ids.shape[1] + steps))

    def cache_bytes(self, batch: int, length: int) -> int:
        """The KV cache's bytes at ``length`` positions, from the cache inputs' shapes (f32, as the cache is pinned):
        the pipeline does not expose its state."""
        total = 0
        for name in state_map(self.manifest.iospec):
            t = self.manifest.iospec.input(name)
            dims = [batch if d == "batch" else length if d == PAST_DIM else d for d in t.shape]
            if not all(isinstance(d, int) for d in dims):
                return 0
            total += int(np.prod([int(d) for d in dims])) * np.dtype(t.dtype).itemsize
        return total

    def extra(self) -> dict[str, Any]:
        return {"ovgenai_logits_from": "the same stateful IR on an OpenVINO infer request (LLMPipeline exposes none)"}


def ovgenai_decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
    """An :class:`OvGenaiDecoder` per variant the request runs (every ok ONNX/IR one, or ``cfg.variants``); none, with
    the reason added to ``skipped``, when openvino-genai is not installed."""
    if (why := unavailable()) is not None:
        skipped.append(f"{NAME}: {why}")
        return []
    if not any(n.startswith(PAST) for n in manifest.iospec.input_names):
        skipped.append(f"{NAME}: not a decoder with a KV cache")
        return []
    arts = [a for a in manifest.artifacts.values() if a.kind in KINDS
            and (a.name in cfg.variants if cfg.variants is not None else a.status == "ok")]
    return [OvGenaiDecoder(manifest, base, a, cfg.threads) for a in arts]
