"""A Triton Inference Server model repository from an artifact folder's manifest.

    REPO/MANIFEST.json                 every file's sha256, the versions, engine facts
    REPO/<model>_<variant>/config.pbtxt
    REPO/<model>_<variant>/1/model.onnx   (platform onnxruntime_onnx)  or  1/model.plan  (tensorrt_plan)

``config.pbtxt`` is built as Triton's own ``inference.ModelConfig`` protobuf message (the schema that
ships in ``tritonclient``), written with ``text_format`` and read back from disk with the same
schema, so a misspelt field or enum fails here rather than in the deployment team's server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import InputError, ValidationError
from core.fsutil import _umask, atomic_write_text, ensure_writable_dir, sha256_file
from core.iospec import IOSpec, onnx_opset, spec_from_onnx
from core.manifest import Artifact, FileRecord, Manifest, library_versions, utc_now
from core.models import factory_parts
from core.shapes import apply_input_shapes
from serving.triton_config import (
    PLATFORMS,
    VERSION_DIR,
    ModelOptions,
    add_warmup,
    build_model_config,
    check_config,
    parse_config,
    render_config,
    schema,
)
from serving.tuned import TunedSettings, apply_tuning, load_tuned

REPO_MANIFEST = "MANIFEST.json"
REPO_SCHEMA_VERSION = 1


class PackageConfig(ModelOptions):
    """A `package --format triton` request."""

    artifact_dir: Path = Field(description="Folder with manifest.json (from `convert`)")
    out: Path = Field(description="Model repository folder to write (replaced if it is one written before)")
    variants: list[str] | None = Field(default=None, description="Artifact names, name prefixes ('int8') or kinds "
                                                                 "('plan'); default: opt, else fp32")
    name: str | None = Field(default=None, description="Model name prefix; default: the source model's name")
    input_shape: str | None = Field(default=None, description="Warm-up shapes (config.pbtxt model_warmup), e.g. "
                                    "input_ids:8x128,attention_mask:8x128; the config's dims stay -1")
    from_tune: Path | None = Field(default=None, description="tune.json (or a folder holding one) whose winner is "
                                                             "packaged with its settings in config.pbtxt")

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("cpu", "gpu"):
            raise InputError(f"unknown --kind {value!r}; choose cpu or gpu")
        return value


class RepoModel(BaseModel):
    """One model folder of the repository and where it came from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    variant: str = Field(description="Artifact name in the source manifest")
    kind: str
    platform: str
    precision: str
    source_file: str = Field(description="Path in the artifact folder")
    source_sha256: str
    params: dict[str, Any] = Field(default_factory=dict, description="e.g. ONNX opset and IR version")
    engine: dict[str, Any] | None = Field(default=None, description="TensorRT plans: the GPU, compute capability and "
                                                                    "TensorRT version it was built for")
    tuned: TunedSettings | None = Field(default=None, description="Packaged with --from-tune: the tune winner and "
                                                                 "which of its settings reached config.pbtxt")


class RepoManifest(BaseModel):
    """``REPO/MANIFEST.json``: what a deployment team checks with ``verify``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = REPO_SCHEMA_VERSION
    format: Literal["triton"] = "triton"
    created_at: str = Field(default_factory=utc_now)
    source_model: str
    artifact_dir: str
    source_manifest_sha256: str
    versions: dict[str, str] = Field(description="Libraries the artifacts were built with (from the source manifest)")
    packaged_with: dict[str, str] = Field(description="Libraries that wrote and validated this repository")
    models: list[RepoModel]
    files: list[FileRecord] = Field(description="Every file of the repository except this one, with its sha256")
    notes: list[str] = Field(default_factory=list, description="What this repository does not package (a KV-cache "
                                                               "decoder's generation loop)")


#: ``package`` on a decoder with a KV cache: what it writes, and what it cannot package yet
KV_CACHE_NOTE = ("KV-cache decoder: packaged as one stateless step (past_key_values.* in, present.* out, as plain "
                 "tensors; the client runs the generation loop and feeds present back as past); not packaged yet: "
                 "a server-side generation loop (Triton's sequence batcher with implicit state, or an ensemble/BLS "
                 "loop with sampling), so the dynamic batcher joins only requests of equal prompt and past length")


# -- naming and selection --------------------------------------------------------------------------
def load_artifacts(base: Path) -> Manifest:
    """The manifest of an artifact folder whose files all match their recorded hashes."""
    if not Path(base).is_dir():
        raise InputError(f"artifact folder {base} " + ("is a file: give the folder that holds manifest.json (from "
                                                       "`convert`)" if Path(base).exists() else "does not exist"))
    manifest = Manifest.load(base)
    problems = manifest.verify(base)
    if problems:
        raise InputError("artifact folder does not match its manifest: " + "; ".join(problems))
    return manifest


def model_base_name(manifest: Manifest) -> str:
    """``densenet121`` for a torchvision name, the file stem for ``file.py:factory`` or a file path."""
    return source_base_name(manifest.source.model)


def source_base_name(model: str) -> str:
    """``model_base_name`` of a manifest's ``source.model``."""
    parts = factory_parts(model)
    return safe_name(Path(parts[0] if parts else model).stem)


def safe_name(text: str) -> str:
    """A model name Triton and URLs take as is: letters, digits, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "model"


def served_name(base: str, artifact: Artifact) -> str:
    """The model name in the repository and on the server: the same, so one client works with both."""
    return f"{base}_{artifact.name}"


def default_variant(manifest: Manifest) -> str:
    """What `package` and `serve` take without ``--variants``: the best FP32 model (opt, else fp32)."""
    return manifest.best_fp32()


def resolve_variants(manifest: Manifest, tokens: list[str]) -> list[Artifact]:
    """Artifacts for each token: an exact artifact name, a name prefix (``int8`` -> ``int8_static_minmax``)
    or a kind (``plan``). Unknown tokens and failed artifacts are one InputError listing what exists."""
    chosen: dict[str, Artifact] = {}
    arts = manifest.artifacts
    usable = sorted(n for n, a in arts.items() if a.kind in PLATFORMS and a.status == "ok")
    for token in tokens:
        if token in arts:
            found = [arts[token]]
            if found[0].status != "ok":
                raise InputError(f"variant {token!r} is marked failed in the manifest "
                                 f"({'; '.join(found[0].notes) or 'see manifest.json'}); usable: {usable}")
        else:  # a prefix or kind picks the usable artifacts it matches
            found = [a for a in arts.values()
                     if (a.name.startswith(f"{token}_") or a.kind == token) and a.status == "ok"]
        if not found:
            raise InputError(f"unknown variant {token!r}; servable artifacts in the manifest: {usable}")
        for a in found:
            if a.kind not in PLATFORMS:
                raise InputError(f"variant {a.name!r} is a {a.kind} artifact; Triton packages take ONNX models and "
                                 f"TensorRT plans: {usable}")
            chosen[a.name] = a
    return list(chosen.values())


# -- plan facts -----------------------------------------------------------------------------------


def engine_info(artifact: Artifact) -> dict[str, Any]:
    """The GPU, compute capability and TensorRT version a plan was built for (refused when not recorded)."""
    from runtimes.trt import recorded_env

    env = recorded_env(artifact)
    build = artifact.engine.model_dump(mode="json") if artifact.engine is not None else {}
    build["build_flags"] = artifact.params.model_dump(mode="json", exclude={"step"})
    return {"gpu": env.gpu_name, "compute_capability": env.compute_capability, "tensorrt": env.tensorrt_version,
            "build": build}


def _onnx_facts(path: Path, spec: IOSpec, name: str) -> dict[str, Any]:
    """Opset/IR version of an ONNX file, after checking its graph I/O agrees with the IOSpec."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got = spec_from_onnx(model)
    problems = []
    for want, have in ((spec.inputs, got.inputs), (spec.outputs, got.outputs)):
        if [(t.name, t.dtype, len(t.shape)) for t in want] != [(t.name, t.dtype, len(t.shape)) for t in have]:
            problems.append(f"graph {[(t.name, t.dtype, t.shape) for t in have]} != IOSpec "
                            f"{[(t.name, t.dtype, t.shape) for t in want]}")
    if problems:
        raise ValidationError(f"variant {name!r} does not match the manifest's IOSpec", problems)
    return {"onnx_opset": onnx_opset(model), "onnx_ir_version": model.ir_version}


def packaging_versions() -> dict[str, str]:
    out = {"python": library_versions()["python"]}
    for dist in ("onnxkit", "tritonclient", "protobuf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


# -- the repository --------------------------------------------------------------------------------
def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPO_MANIFEST).is_file():
        raise InputError(f"--out {out} is a non-empty folder that `package` did not write; "
                         "refusing to replace it (choose an empty or new folder)")
    ensure_writable_dir(out.parent)


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished repository in place: the old one is removed only once the new one is there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "repo")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_file(src: Path, dst: Path) -> None:
    """``shutil.copyfile``, whose error on a full disk names the file written, not the one read (its sendfile path
    gives both, the source first, and the message then points at the wrong disk)."""
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(exc.errno, exc.strerror, str(dst)) from None
        raise


def _copy_model(base: Path, art: Artifact, target: Path, name: str) -> tuple[list[Path], list[str]]:
    """Copy the artifact's file to ``target`` and its external-data files beside it under their own names (a model
    past 2 GiB names its side file inside it); (the data copies, the copies whose sha256 differs from the record)."""
    _copy_file(base / art.file.path, target)
    data = [target.parent / Path(d.path).name for d in art.file.external_data]
    for d, dst in zip(art.file.external_data, data, strict=True):
        _copy_file(base / d.path, dst)
    pairs = [(art.file.path, art.file.sha256, target)] + [
        (d.path, d.sha256, dst) for d, dst in zip(art.file.external_data, data, strict=True)]
    return data, [f"{name}: the copy of {src} does not match its recorded sha256"
                  for src, digest, copy in pairs if sha256_file(copy) != digest]


def _chosen(cfg: PackageConfig, manifest: Manifest) -> tuple[list[Artifact], PackageConfig, TunedSettings | None]:
    """The artifacts to package, the options to build their configs with, and the tune winner (--from-tune)."""
    if cfg.from_tune is None:
        return resolve_variants(manifest, cfg.variants or [default_variant(manifest)]), cfg, None
    tuned = load_tuned(cfg.from_tune, Path(cfg.artifact_dir))
    if cfg.variants:
        raise InputError(f"--from-tune packages the tune winner's variant ({tuned.variant}); leave out --variants")
    if cfg.kind == "gpu":
        raise InputError(f"--from-tune: the winner ({tuned.winner}) was tuned on CPU; leave out --kind gpu")
    if cfg.max_batch_size is None and manifest.iospec.dynamic_batch and tuned.batch_size > 8:
        cfg = cfg.model_copy(update={"max_batch_size": tuned.batch_size})  # room for the winner's batch
    return resolve_variants(manifest, [tuned.variant]), cfg, tuned


def _write_model(tmp: Path, base: Path, art: Artifact, msg: Any, spec: IOSpec) -> tuple[RepoModel, list[FileRecord]]:
    """One model folder: the artifact's file(s) and config.pbtxt, checked; its record and its files' records."""
    name = msg.name
    filename = PLATFORMS[art.kind][1]
    model_dir = tmp / name
    target = model_dir / VERSION_DIR / filename
    target.parent.mkdir(parents=True)
    data, failures = _copy_model(base, art, target, name)
    atomic_write_text(model_dir / "config.pbtxt", render_config(msg))
    failures += check_config(parse_config(model_dir / "config.pbtxt"), model_dir)
    if failures:
        raise ValidationError(f"model {name}", failures)
    params = _onnx_facts(target, spec, art.name) if art.kind == "onnx" else {}
    model = RepoModel(name=name, variant=art.name, kind=art.kind, platform=msg.platform or msg.backend,
                      precision=art.precision, source_file=art.file.path, source_sha256=art.file.sha256,
                      params=params)
    files = [FileRecord(path=p.relative_to(tmp).as_posix(), sha256=sha256_file(p), size_bytes=p.stat().st_size)
             for p in (model_dir / "config.pbtxt", target, *data)]
    return model, files


def keep_layout_optimizers_off(base: Path, art: Artifact, msg: Any) -> str | None:
    """An ONNX model with float16 tensors served at the onnxruntime backend's default graph level (all) gets level
    extended, and the note saying why; None otherwise. The layout level holds the NCHWc transformer that kills ONNX
    Runtime 1.32 on some FP16 graphs (runtimes.ort.FP16_DISABLED_OPTIMIZERS; the backend has no key to leave one
    optimizer off), and its blocked layout is for FP32 convolutions."""
    from runtimes.ort import TRITON_GRAPH_LEVELS, disabled_optimizers

    if art.kind != "onnx" or msg.optimization.graph.level or not disabled_optimizers(base / art.file.path):
        return None
    msg.optimization.graph.level = TRITON_GRAPH_LEVELS["extended"]
    return (f"{msg.name}: float16 tensors, so optimization.graph.level {msg.optimization.graph.level} (extended, not "
            "the backend's default all): ONNX Runtime 1.32's NCHWc layout transformer segfaults on some FP16 graphs "
            "(a float16 ViT); it is for FP32 convolutions")


def _tuned_note(tuned: TunedSettings | None) -> str:
    if tuned is None:
        return ""
    lost = f"; not carried over: {'; '.join(tuned.not_carried)}" if tuned.not_carried else ""
    return (f"; tune winner {tuned.backend}:{tuned.variant} batch {tuned.batch_size} {tuned.settings}: parameters "
            f"{tuned.parameters}{lost}")  # no brackets: the CLI's log reads them as markup


def package(cfg: PackageConfig, log: Callable[[str], None] = print) -> tuple[RepoManifest, Path]:
    """Write the model repository for ``cfg``; return its manifest and folder.

    The repository is assembled in a temporary folder beside ``out`` and renamed into place only when
    every file is written, hashed and validated, so a failure leaves the previous repository intact.
    """
    base = Path(cfg.artifact_dir)
    manifest = load_artifacts(base)
    arts, opts, tuned = _chosen(cfg, manifest)
    from runtimes.session import has_kv_cache

    notes = [KV_CACHE_NOTE] if has_kv_cache(manifest.iospec) else []
    base_name = safe_name(cfg.name) if cfg.name else model_base_name(manifest)
    engines = {a.name: engine_info(a) for a in arts if a.kind == "plan"}  # refuses plans of unknown origin
    out = Path(cfg.out)
    _prepare_out(out)
    configs = [(a, build_model_config(served_name(base_name, a), manifest.iospec, a, opts)) for a in arts]
    for art, msg in configs:
        if tuned is not None:
            apply_tuning(msg, tuned)
        if (why := keep_layout_optimizers_off(base, art, msg)) is not None:
            notes.append(why)
        if cfg.input_shape:
            add_warmup(msg, *apply_input_shapes(manifest.iospec, cfg.input_shape))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        models: list[RepoModel] = []
        files: list[FileRecord] = []
        for art, msg in configs:
            model, written = _write_model(tmp, base, art, msg, manifest.iospec)
            models.append(model.model_copy(update={"engine": engines.get(art.name), "tuned": tuned}))
            files += written
            group = msg.instance_group[0]
            log(f"{model.name}: {model.platform}, max_batch_size {msg.max_batch_size}, "
                f"dynamic batching {'on' if msg.HasField('dynamic_batching') else 'off'}, "
                f"{group.count} x {schema().ModelInstanceGroup.Kind.Name(group.kind)}{_tuned_note(tuned)}")
        repo = RepoManifest(source_model=manifest.source.model, artifact_dir=str(base.resolve()),
                            source_manifest_sha256=sha256_file(base / "manifest.json"), versions=manifest.versions,
                            packaged_with=packaging_versions(), models=models, files=files, notes=notes)
        atomic_write_text(tmp / REPO_MANIFEST, repo.model_dump_json(indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        log(f"note: {note}")
    return repo, out
