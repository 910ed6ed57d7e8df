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
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import BackendUnavailableError, InputError, ValidationError
from core.fsutil import _umask, atomic_write_text, ensure_writable_dir, sha256_file
from core.iospec import IOSpec, TensorSpec, onnx_opset, spec_from_onnx
from core.manifest import Artifact, FileRecord, Manifest, library_versions, utc_now
from core.models import factory_parts
from serving.protocol import datatype_of

REPO_MANIFEST = "MANIFEST.json"
REPO_SCHEMA_VERSION = 1
VERSION_DIR = "1"
#: manifest artifact kind -> (Triton platform, model file name Triton looks for)
PLATFORMS: dict[str, tuple[str, str]] = {"onnx": ("onnxruntime_onnx", "model.onnx"),
                                         "plan": ("tensorrt_plan", "model.plan")}


class ModelOptions(BaseModel):
    """How Triton should batch and place one model (shared by `package` and the server's /config)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=0, description="Triton max_batch_size; default 8 for a "
                                                                       "dynamic-batch model, 0 for a fixed batch")
    dynamic_batching: bool | None = Field(default=None, description="Enable Triton's dynamic batcher "
                                                                    "(default: on when max_batch_size > 0)")
    max_queue_delay_us: int = Field(default=100, ge=0, description="Dynamic batcher max queue delay (µs)")
    instances: int = Field(default=1, ge=1, description="Model instances per device (instance_group count)")
    kind: Literal["cpu", "gpu"] | None = Field(default=None, description="Instance kind; default cpu for ONNX, "
                                                                         "gpu for TensorRT plans")


class PackageConfig(ModelOptions):
    """A `package --format triton` request."""

    artifact_dir: Path = Field(description="Folder with manifest.json (from `convert`)")
    out: Path = Field(description="Model repository folder to write (replaced if it is one written before)")
    variants: list[str] | None = Field(default=None, description="Artifact names, name prefixes ('int8') or kinds "
                                                                 "('plan'); default: opt, else fp32")
    name: str | None = Field(default=None, description="Model name prefix; default: the source model's name")


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


# -- naming and selection --------------------------------------------------------------------------
def load_artifacts(base: Path) -> Manifest:
    """The manifest of an artifact folder whose files all match their recorded hashes."""
    if not Path(base).is_dir():
        raise InputError(f"artifact folder {base} does not exist")
    manifest = Manifest.load(base)
    problems = manifest.verify(base)
    if problems:
        raise InputError("artifact folder does not match its manifest: " + "; ".join(problems))
    return manifest


def model_base_name(manifest: Manifest) -> str:
    """``densenet121`` for a torchvision name, the file stem for ``file.py:factory`` or a file path."""
    model = manifest.source.model
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


# -- config.pbtxt ----------------------------------------------------------------------------------
def _schema() -> Any:
    """Triton's model-configuration protobuf module, as shipped in tritonclient (grpc extra)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError) as exc:
        raise BackendUnavailableError("Triton's model-config schema needs tritonclient with gRPC support "
                                      f"(pip install 'tritonclient[http,grpc]'): {exc}") from None
    return model_config_pb2


def engine_info(artifact: Artifact) -> dict[str, Any]:
    """The GPU, compute capability and TensorRT version a plan was built for (refused when not recorded)."""
    from runtimes.trt import recorded_env

    env = recorded_env(artifact)
    build = artifact.engine.model_dump(mode="json") if artifact.engine is not None else {}
    build["build_flags"] = artifact.params.model_dump(mode="json", exclude={"step"})
    return {"gpu": env.gpu_name, "compute_capability": env.compute_capability, "tensorrt": env.tensorrt_version,
            "build": build}


def triton_dims(t: TensorSpec, batched: bool) -> list[int]:
    """Triton dims: symbolic ones become -1; with ``batched`` the batch dim is left to max_batch_size."""
    shape = t.shape[1:] if batched else t.shape
    return [d if isinstance(d, int) else -1 for d in shape]


def _resolve_batching(spec: IOSpec, cfg: ModelOptions) -> tuple[int, bool]:
    """(max_batch_size, dynamic batching) from the options and whether the model has a batch dim."""
    if not spec.dynamic_batch or not all(o.has_dynamic_batch for o in spec.outputs):
        if cfg.max_batch_size:
            raise InputError(f"this model has a fixed batch of {spec.fixed_batch()}; Triton needs --max-batch-size 0 "
                             "for it (export again without --no-dynamic-batch to batch)")
        if cfg.dynamic_batching:
            raise InputError("dynamic batching needs a model with a dynamic batch dimension")
        return 0, False
    mbs = 8 if cfg.max_batch_size is None else cfg.max_batch_size
    if cfg.dynamic_batching and mbs == 0:
        raise InputError("--dynamic-batching needs --max-batch-size >= 1")
    return mbs, (mbs > 0 if cfg.dynamic_batching is None else cfg.dynamic_batching)


def _plan_batch(artifact: Artifact, mbs: int, explicit: bool) -> int:
    """max_batch_size within the engine's optimization profile (Triton sends any batch from 1 up to it)."""
    from runtimes.trt import batch_range

    lo, hi = batch_range(artifact)
    if lo > 1:
        raise InputError(f"engine {artifact.name!r} accepts batches {lo}..{hi}, but Triton sends batches from 1: "
                         "rebuild it with --min-batch 1")
    if explicit and mbs > hi:
        raise InputError(f"--max-batch-size {mbs} exceeds engine {artifact.name!r}'s profile maximum of {hi}")
    return min(mbs, hi)


def build_model_config(name: str, spec: IOSpec, artifact: Artifact, cfg: ModelOptions) -> Any:
    """The ``inference.ModelConfig`` message for one artifact."""
    mc = _schema()
    platform, _ = PLATFORMS[artifact.kind]
    kind = cfg.kind or ("gpu" if artifact.kind == "plan" else "cpu")
    if artifact.kind == "plan" and kind != "gpu":
        raise InputError(f"{artifact.name!r} is a TensorRT plan: it runs on GPU instances only (use --kind gpu)")
    if not spec.outputs:
        raise InputError("the manifest's IOSpec lists no outputs; convert the model again")
    mbs, dynamic = _resolve_batching(spec, cfg)
    if artifact.kind == "plan" and mbs > 0:
        mbs = _plan_batch(artifact, mbs, explicit=cfg.max_batch_size is not None)
    msg = mc.ModelConfig(name=name, platform=platform, max_batch_size=mbs)
    for field, tensors in ((msg.input, spec.inputs), (msg.output, spec.outputs)):
        for t in tensors:
            field.add(name=t.name, data_type=mc.DataType.Value(f"TYPE_{datatype_of(t.dtype)}"),
                      dims=triton_dims(t, mbs > 0))
    if dynamic:
        msg.dynamic_batching.SetInParent()
        msg.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    group = mc.ModelInstanceGroup.Kind.Value(f"KIND_{kind.upper()}")
    msg.instance_group.add(count=cfg.instances, kind=group)
    return msg


def render_config(msg: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(msg)


def parse_config(path: Path) -> Any:
    """Parse ``config.pbtxt`` with Triton's schema; a syntax or schema error is a ValidationError."""
    from google.protobuf import text_format

    mc = _schema()
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ValidationError(f"{path}", [f"not a valid Triton model configuration: {exc}"]) from None


def check_config(msg: Any, model_dir: Path) -> list[str]:
    """What Triton would refuse in a parsed config that the schema alone accepts (empty = fine)."""
    mc = _schema()
    problems: list[str] = []
    where = model_dir.name
    if msg.name != model_dir.name:
        problems.append(f"{where}: config name {msg.name!r} differs from its folder name")
    files = dict(PLATFORMS.values())
    if msg.platform not in files:
        problems.append(f"{where}: platform {msg.platform!r} is not one of {sorted(files)}")
    elif not (model_dir / VERSION_DIR / files[msg.platform]).is_file():
        problems.append(f"{where}: {VERSION_DIR}/{files[msg.platform]} is missing for platform {msg.platform}")
    if msg.max_batch_size < 0:
        problems.append(f"{where}: max_batch_size must be >= 0")
    if msg.HasField("dynamic_batching") and msg.max_batch_size == 0:
        problems.append(f"{where}: dynamic_batching needs max_batch_size > 0")
    for t in [*msg.input, *msg.output]:
        if t.data_type == mc.TYPE_INVALID:
            problems.append(f"{where}: tensor {t.name!r} has no data_type")
        if any(d == 0 or d < -1 for d in t.dims) or (not t.dims and msg.max_batch_size == 0):
            problems.append(f"{where}: tensor {t.name!r} has invalid dims {list(t.dims)}")
    if not msg.input or not msg.output:
        problems.append(f"{where}: inputs and outputs must both be listed")
    if msg.platform == "tensorrt_plan" and any(g.kind != mc.ModelInstanceGroup.KIND_GPU for g in msg.instance_group):
        problems.append(f"{where}: TensorRT plans need KIND_GPU instance groups")
    return problems


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


def package(cfg: PackageConfig, log: Callable[[str], None] = print) -> tuple[RepoManifest, Path]:
    """Write the model repository for ``cfg``; return its manifest and folder.

    The repository is assembled in a temporary folder beside ``out`` and renamed into place only when
    every file is written, hashed and validated, so a failure leaves the previous repository intact.
    """
    base = Path(cfg.artifact_dir)
    manifest = load_artifacts(base)
    arts = resolve_variants(manifest, cfg.variants or [default_variant(manifest)])
    base_name = safe_name(cfg.name) if cfg.name else model_base_name(manifest)
    engines = {a.name: engine_info(a) for a in arts if a.kind == "plan"}  # refuses plans of unknown origin
    out = Path(cfg.out)
    _prepare_out(out)
    configs = {served_name(base_name, a): (a, build_model_config(served_name(base_name, a), manifest.iospec, a, cfg))
               for a in arts}
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        models: list[RepoModel] = []
        files: list[FileRecord] = []
        for name, (art, msg) in configs.items():
            platform, filename = PLATFORMS[art.kind]
            model_dir = tmp / name
            target = model_dir / VERSION_DIR / filename
            target.parent.mkdir(parents=True)
            shutil.copyfile(base / art.file.path, target)
            atomic_write_text(model_dir / "config.pbtxt", render_config(msg))
            failures = check_config(parse_config(model_dir / "config.pbtxt"), model_dir)
            if sha256_file(target) != art.file.sha256:
                failures.append(f"{name}: the copy of {art.file.path} does not match its recorded sha256")
            if failures:
                raise ValidationError(f"model {name}", failures)
            params = _onnx_facts(target, manifest.iospec, art.name) if art.kind == "onnx" else {}
            models.append(RepoModel(name=name, variant=art.name, kind=art.kind, platform=platform,
                                    precision=art.precision, source_file=art.file.path,
                                    source_sha256=art.file.sha256, params=params, engine=engines.get(art.name)))
            for p in (model_dir / "config.pbtxt", target):
                files.append(FileRecord(path=p.relative_to(tmp).as_posix(), sha256=sha256_file(p),
                                        size_bytes=p.stat().st_size))
            group = msg.instance_group[0]
            log(f"{name}: {platform}, max_batch_size {msg.max_batch_size}, "
                f"dynamic batching {'on' if msg.HasField('dynamic_batching') else 'off'}, "
                f"{group.count} x {_schema().ModelInstanceGroup.Kind.Name(group.kind)}")
        repo = RepoManifest(source_model=manifest.source.model, artifact_dir=str(base.resolve()),
                            source_manifest_sha256=sha256_file(base / "manifest.json"), versions=manifest.versions,
                            packaged_with=packaging_versions(), models=models, files=files)
        atomic_write_text(tmp / REPO_MANIFEST, repo.model_dump_json(indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return repo, out

