"""The generation backends: ONE explicit table, name -> how to tell whether it runs here and how to build its
decoders for a manifest, as ``runtimes.RUNNERS`` is for one-shot backends.

A generation backend is not always a runner: ONNX Runtime GenAI (``genai``) runs its own generation loop from a
folder with a ``genai_config.json`` and has no :class:`runtimes.base.Runner`. Everything that lists or checks
generation backends reads :data:`GENERATION_BACKENDS`: ``runtimes.generation.build_decoders`` (bench's generation
benchmark and ``tune``'s generation search), bench's and tune's name check (:func:`check_generation_backends`) and
the request's default (every row, in the table's order, which is the order they are measured in).

Adding a backend is one row: its name, an ``available()`` that returns None or the one line why it cannot run on
this machine (heavy imports inside it), and a ``decoders(manifest, base, cfg, skipped)`` that returns a
``runtimes.decoding.Decoder`` per variant it can run and adds what it cannot, with the reason, to ``skipped``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import InputError

if TYPE_CHECKING:
    from core.manifest import Artifact, Manifest
    from runtimes.decoding import Decoder, GenerationConfig


@dataclass(frozen=True)
class GenerationBackend:
    """One row of :data:`GENERATION_BACKENDS`."""

    available: Callable[[], str | None]
    """None when it can run on this machine (cpu), else the one line why not (e.g. how to install it)."""
    decoders: Callable[[Manifest, Path, GenerationConfig, list[str]], list[Decoder]]
    """A decoder per variant of the manifest it runs; what it cannot run goes to ``skipped`` with the reason."""
    summary: str
    """What runs the loop (help text, reports)."""


#: the artifact kinds a generation backend decodes with (the PyTorch weights are eager's model, not a variant)
MODEL_KINDS = ("onnx", "openvino_ir")


def onnx_variants(manifest: Manifest, cfg: GenerationConfig, kinds: tuple[str, ...] = ("onnx",), backend: str = "",
                  skipped: list[str] | None = None) -> list[Artifact]:
    """The variants of ``kinds`` a request runs: ``cfg.variants``, else every ok one. One the request asks for in
    another kind (``int4_ov``, an OpenVINO IR, on any backend but openvino) goes to ``skipped`` with the reason."""
    asked = [a for a in manifest.artifacts.values() if a.kind in MODEL_KINDS
             and (a.name in cfg.variants if cfg.variants is not None else a.status == "ok")]
    if skipped is not None:
        skipped += [f"{backend}:{a.name}: an OpenVINO IR ({a.kind}); {backend} runs {'/'.join(kinds)} files, only "
                    "openvino runs it" if a.kind == "openvino_ir" else
                    f"{backend}:{a.name}: a {a.kind} file; {backend} runs {'/'.join(kinds)} files"
                    for a in asked if a.kind not in kinds]
    return [a for a in asked if a.kind in kinds]


def _runner_available(name: str) -> Callable[[], str | None]:
    def available() -> str | None:
        from runtimes import RUNNERS

        return RUNNERS[name].available("cpu")

    return available


def _torch_decoders(compiled: bool) -> Callable[[Manifest, Path, GenerationConfig, list[str]], list[Decoder]]:
    def decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
        from runtimes.decoding import TorchDecoder, hf_folder

        folder = hf_folder(manifest)
        if folder is None:
            skipped.append(f"{'compile' if compiled else 'eager'}: the manifest records no Hugging Face source folder "
                           f"that is still there ({manifest.source.model}): transformers' model cannot be rebuilt")
            return []
        return [TorchDecoder(manifest, base, folder, compiled=compiled, threads=cfg.threads)]

    return decoders


def _runner_decoders(name: str) -> Callable[[Manifest, Path, GenerationConfig, list[str]], list[Decoder]]:
    def decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
        from runtimes import RUNNERS
        from runtimes.base import RunnerOptions
        from runtimes.decoding import RunnerDecoder

        opts = RunnerOptions(threads=cfg.threads, ort_spinning=cfg.ort_spinning)
        return [RunnerDecoder(RUNNERS[name](manifest, base, a, opts))
                for a in onnx_variants(manifest, cfg, RUNNERS[name].artifact_kinds, name, skipped)]

    return decoders


def _genai_available() -> str | None:
    from runtimes.genai import unavailable

    return unavailable()


def _genai_decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
    from runtimes.genai import genai_decoders

    onnx_variants(manifest, cfg, ("onnx",), "genai", skipped)  # an OpenVINO IR (int4_ov): skipped, with why
    return genai_decoders(manifest, base, cfg, skipped)


def _openvino_decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
    from runtimes.openvino import OpenVinoRunner
    from runtimes.ovstateful import openvino_decoders

    variants = onnx_variants(manifest, cfg, OpenVinoRunner.artifact_kinds, "openvino", skipped)
    return openvino_decoders(manifest, base, variants, cfg.threads)


def _ovgenai_available() -> str | None:
    from runtimes.ovgenai import unavailable

    return unavailable()


def _ovgenai_decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
    from runtimes.ovgenai import ovgenai_decoders

    return ovgenai_decoders(manifest, base, cfg, skipped)


#: name -> generation backend, in the order they are measured
GENERATION_BACKENDS: dict[str, GenerationBackend] = {
    "eager": GenerationBackend(_runner_available("eager"), _torch_decoders(compiled=False),
                               "transformers' model with use_cache=True (the manifest's Hugging Face folder)"),
    "compile": GenerationBackend(_runner_available("compile"), _torch_decoders(compiled=True),
                                 "transformers' model under torch.compile(dynamic=True)"),
    "ort": GenerationBackend(_runner_available("ort"), _runner_decoders("ort"),
                             "each ONNX variant through ONNX Runtime's KV-cache session"),
    "genai": GenerationBackend(_genai_available, _genai_decoders,
                               "each ONNX variant through ONNX Runtime GenAI's generator (runtimes.genai)"),
    "openvino": GenerationBackend(_runner_available("openvino"), _openvino_decoders,
                                  "each ONNX variant as OpenVINO's stateful model (runtimes.ovstateful)"),
    "ovgenai": GenerationBackend(_ovgenai_available, _ovgenai_decoders,
                                 "each variant through openvino-genai's LLMPipeline (runtimes.ovgenai)"),
}


def unknown_generation_backends(names: Iterable[str]) -> str | None:
    """None when every name is a generation backend or a one-shot one (``runtimes.RUNNERS``: skipped with the
    reason by :func:`generation_decoders`), else the one line that names the generation backends."""
    from runtimes import RUNNERS

    if unknown := [b for b in names if b not in GENERATION_BACKENDS and b not in RUNNERS]:
        return f"unknown generation backend(s) {unknown}; generation backends: {', '.join(GENERATION_BACKENDS)}"
    return None


def check_generation_backends(names: Iterable[str]) -> None:
    """:func:`unknown_generation_backends` as an InputError (bench and tune on a KV-cache decoder)."""
    if (why := unknown_generation_backends(names)) is not None:
        raise InputError(why)


def requested(cfg: GenerationConfig) -> list[str]:
    """The request's backends: those it names, else every row of the table in its order."""
    return list(GENERATION_BACKENDS) if cfg.backends is None else list(cfg.backends)


def generation_decoders(manifest: Manifest, base: Path, cfg: GenerationConfig, skipped: list[str]) -> list[Decoder]:
    """A decoder per (backend, variant) of the request that can run here, in the request's backend order; a backend
    unavailable here, or a one-shot backend with no generation loop, goes to ``skipped`` with the reason."""
    check_generation_backends(requested(cfg))
    out: list[Decoder] = []
    for name in requested(cfg):
        row = GENERATION_BACKENDS.get(name)
        if row is None:
            skipped.append(f"{name}: no generation loop with a KV cache for this backend (generation runs on "
                           f"{', '.join(GENERATION_BACKENDS)})")
        elif (why := row.available()) is not None:
            skipped.append(f"{name}: {why}")
        else:
            out += row.decoders(manifest, base, cfg, skipped)
    return out
