"""The artifact manifest: every file the pipeline writes, with its hash, IOSpec, step and versions.

``bench``, ``package`` and ``serve`` read the manifest; none of them guesses file names.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from core.errors import InputError, ToolkitError, ValidationError, first_line
from core.fsutil import atomic_write_text, sha256_file
from core.iospec import IOSpec
from core.records import ArtifactMetrics, EngineBuild, StepParams, migrate_v1_artifact

MANIFEST_NAME = "manifest.json"
#: 2: typed ``params`` (one record per step), ``metrics`` and ``engine`` (was the free dict ``extra``).
SCHEMA_VERSION = 2

ArtifactKind = Literal["onnx", "state_dict", "torchscript", "plan", "openvino_ir"]  # openvino_ir: .xml, its .bin as data
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4", "mixed"]
#: Every precision a variant (a row of convert.variants.VARIANTS) may declare, as reports name it, and whether it
#: runs on integer kernels (whose speed on a CPU depends on VNNI, AMX or the ARM dot-product extension).
PRECISION_LABELS: dict[str, str] = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "int8": "INT8", "int4": "INT4",
                                    "mixed": "mixed precision"}
INTEGER_PRECISIONS: frozenset[str] = frozenset({"int8"})

_VERSIONED = ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxslim", "onnxscript",
              "onnxconverter-common", "numpy", "polygraphy", "tensorrt", "torch-pruning")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact (absent ones are left out)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class Preprocessing(BaseModel):
    """How raw images become the model's input (resize, center crop, normalize)."""

    model_config = ConfigDict(extra="forbid")

    resize: int = Field(description="Shorter side is resized to this many pixels")
    crop: int = Field(description="Center crop size (square)")
    mean: list[float] = Field(default=[0.485, 0.456, 0.406])
    std: list[float] = Field(default=[0.229, 0.224, 0.225])
    source: str = Field(default="default", description="Where these numbers came from")


class SourceInfo(BaseModel):
    """What the user asked to convert."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The MODEL argument as given")
    kind: Literal["torchvision", "factory", "torchscript", "onnx", "hf"]
    task: str | None = Field(default=None, description="A Hugging Face model's task, e.g. feature-extraction")
    weights: str | None = Field(default=None, description="Weights name or file; None = random init")
    weights_note: str = Field(default="", description="Human note, e.g. 'random init (seed 0)'")
    num_classes: int | None = None
    preprocessing: Preprocessing | None = None
    component: str | None = Field(default=None, description="In a view of one component of a model exported as "
                                                             "several files (Manifest.component_view): which one")


class DataFile(BaseModel):
    """A file an artifact needs beside it: an ONNX model's external tensor data (models over 2 GiB)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Path relative to the manifest's folder")
    sha256: str
    size_bytes: int


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Path relative to the manifest's folder")
    sha256: str
    size_bytes: int
    external_data: list[DataFile] = Field(default_factory=list,
                                          description="ONNX external-data files the model reads, hashed too")

    def paths(self) -> list[str]:
        """The file and its external-data files, relative to the manifest's folder."""
        return [self.path, *(d.path for d in self.external_data)]


class HeldOutFile(BaseModel):
    """Held-out inputs (and labels) the variants' accuracy gates were graded on, kept beside the models so that
    ``bench``, ``tune`` and ``report`` grade every variant on the same real data by default, never on noise."""

    model_config = ConfigDict(extra="forbid")

    file: FileRecord = Field(description="An .npz keyed by input name, plus 'labels' when the data has them")
    source: str = Field(description="What the data is (the held-out part of --calib or --eval-data)")
    samples: int = Field(description="Samples in the file")
    of_samples: int = Field(description="Samples the gates were graded on (the file keeps the first of them, "
                                        "up to a size limit)")
    labels: bool
    data_sha256: str = Field(description="Digest of the held-out data the gates read (the manifest's held_out)")


class FailedVariant(BaseModel):
    """An optional variant the run asked for and did not write: its step failed (``failed``), or what it derives from
    did (``skipped``). No file exists for it, so nothing that reads ``artifacts`` (bench, tune, package, verify,
    report) ever sees it; ``convert`` exits as for a failed gate."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The variant, e.g. 'fused', 'int8_static_minmax', 'sparse24_recovered'")
    step: str = Field(description="The step that was to write it: optimize, fuse_transformer, quantize_static, ...")
    parent: str | None = Field(default=None, description="The artifact (or failed variant) it derives from")
    status: Literal["failed", "skipped"]
    reason: str = Field(description="One line: why it failed, or which variant it derives from failed")


class Component(BaseModel):
    """One file of a model exported as several (Optimum's encoder, decoder, decoder with past, merged decoder): its
    own file, hash, IOSpec and parity with its own submodel."""

    model_config = ConfigDict(extra="forbid")

    file: FileRecord
    iospec: IOSpec
    metrics: ArtifactMetrics = Field(default_factory=ArtifactMetrics, description="Checker, shape inference, parity")


class Artifact(BaseModel):
    """One file the pipeline produced, and how."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique key, e.g. 'fp32', 'opt', 'int8_static_minmax'")
    kind: ArtifactKind
    precision: Precision = "fp32"
    file: FileRecord
    params: StepParams = Field(description="The step that wrote it (params.step) and its parameters")
    parent: str | None = Field(default=None, description="Artifact this one was derived from")
    metrics: ArtifactMetrics = Field(default_factory=ArtifactMetrics, description="Parity / accuracy numbers")
    status: Literal["ok", "failed"] = "ok"
    notes: list[str] = Field(default_factory=list)
    engine: EngineBuild | None = Field(default=None, description="TensorRT plans: what the engine is tied to")
    components: dict[str, Component] = Field(
        default_factory=dict, description="A model exported as several files: each by name (its file stem); "
                                          "``file`` is then the first of them")

    def files(self) -> list[FileRecord]:
        """Every file record of the artifact: its file, or each of its components'."""
        return [c.file for c in self.components.values()] if self.components else [self.file]

    @property
    def step(self) -> str:
        """The step that wrote it: export, optimize, quantize_static, ..."""
        return self.params.step


class Manifest(BaseModel):
    """``manifest.json``: the source of truth for an artifact folder."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)
    source: SourceInfo
    iospec: IOSpec
    opset: int | None = None
    exporter: str | None = None
    versions: dict[str, str] = Field(default_factory=library_versions)
    artifacts: dict[str, Artifact] = Field(default_factory=dict)
    held_out: HeldOutFile | None = Field(default=None, description="The held-out inputs bench grades on by default")
    failed_variants: list[FailedVariant] = Field(default_factory=list,
                                                 description="Variants asked for and not written, with the reason")

    # -- files ---------------------------------------------------------------------------------
    def record(self, base: Path, path: Path, *, name: str, kind: ArtifactKind, params: StepParams,
               precision: Precision = "fp32", parent: str | None = None, metrics: ArtifactMetrics | None = None,
               notes: list[str] | None = None, engine: EngineBuild | None = None) -> Artifact:
        """Hash ``path`` and add (or replace) the artifact ``name``."""
        rec = self.file_record(base, path, onnx=kind == "onnx")
        art = Artifact(name=name, kind=kind, precision=precision, file=rec, params=params, parent=parent,
                       metrics=metrics or ArtifactMetrics(), notes=notes or [], engine=engine)
        self.artifacts[name] = art
        return art

    @staticmethod
    def file_record(base: Path, path: Path, onnx: bool = True) -> FileRecord:
        """``path`` hashed, relative to ``base``, with its ONNX external-data files."""
        path = Path(path)
        return FileRecord(path=_relative(base, path), sha256=sha256_file(path), size_bytes=path.stat().st_size,
                          external_data=_data_files(base, path) if onnx else [])

    def components(self) -> list[str]:
        """The components of a model exported as several files (empty for one file)."""
        fp32 = self.artifacts.get("fp32")
        return list(fp32.components) if fp32 is not None else []

    def component_view(self, name: str) -> Manifest:
        """The manifest as if the folder held only component ``name``: its IOSpec, each ONNX artifact's file of that
        component, and the PyTorch weights (bench measures a component as it measures a single-file model)."""
        fp32 = self.artifacts["fp32"]
        if name not in fp32.components:
            raise InputError(f"no component {name!r}; this model's components: {', '.join(fp32.components)}")
        kept = {k: a.model_copy(update={"file": a.components[name].file, "components": {},
                                        "metrics": a.components[name].metrics})
                for k, a in self.artifacts.items() if name in a.components}  # fp32, opt, ...: this component
        kept |= {k: a for k, a in self.artifacts.items() if a.kind != "onnx"}
        return self.model_copy(update={"iospec": fp32.components[name].iospec, "artifacts": kept, "held_out": None,
                                       "source": self.source.model_copy(update={"component": name})})

    def path_of(self, base: Path, name: str) -> Path:
        if name not in self.artifacts:
            raise InputError(f"artifact {name!r} not in manifest; available: {sorted(self.artifacts)}")
        return Path(base) / self.artifacts[name].file.path

    def best_fp32(self) -> str:
        """The FP32 model variants derive from and ONNX backends run by default: ``opt`` when present."""
        return "opt" if "opt" in self.artifacts else "fp32"

    def by_kind(self, kind: ArtifactKind) -> list[Artifact]:
        return [a for a in self.artifacts.values() if a.kind == kind]

    def verify(self, base: Path) -> list[str]:
        """Every problem with the files on disk versus their recorded hashes (empty = all good)."""
        owners: list[tuple[str, FileRecord | DataFile]] = []
        for art in self.artifacts.values():
            for f in art.files():
                owners += [(art.name, f), *((art.name, d) for d in f.external_data)]
        if self.held_out is not None:
            owners.append(("held-out data", self.held_out.file))
        problems: list[str] = []
        for owner, rec in owners:
            p = Path(base) / rec.path
            if not p.is_file():
                problems.append(f"{owner}: {rec.path} is missing")
            elif sha256_file(p) != rec.sha256:
                problems.append(f"{owner}: {rec.path} sha256 does not match the manifest")
        return problems

    def owned_paths(self) -> set[str]:
        """Every file the artifacts consist of (external data included), relative to the folder."""
        held = set(self.held_out.file.paths()) if self.held_out is not None else set()
        return {p for art in self.artifacts.values() for f in art.files() for p in f.paths()} | held

    # -- persistence ---------------------------------------------------------------------------
    def save(self, base: Path) -> Path:
        self.updated_at = utc_now()
        path = Path(base) / MANIFEST_NAME
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, base: Path) -> Manifest:
        base = Path(base)
        if base.is_file() and base.name != MANIFEST_NAME:
            raise _not_a_folder(base)
        path = base / MANIFEST_NAME if base.is_dir() or not base.suffix else base
        if not path.is_file():
            raise InputError(f"no {MANIFEST_NAME} in {base}: run `python cli.py convert MODEL --out {base}` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bytes that are not UTF-8
            raise InputError(f"{path} is not readable JSON: {first_line(exc)}") from None
        if isinstance(data, dict) and data.get("schema_version") == 1:
            data = _from_v1(data)
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            version = data.get("schema_version") if isinstance(data, dict) else None
            raise InputError(f"{path} has schema_version {version!r}; this toolkit reads versions 1 and "
                             f"{SCHEMA_VERSION}")
        try:
            return cls.model_validate(data)
        except PydanticValidationError as exc:
            errs = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            raise ValidationError(f"{path} is not a valid manifest", [errs]) from None


def artifact_files(base: Path) -> list[Path]:
    """The files of an artifact folder that commands read: manifest.json and every file it records (only
    manifest.json when it cannot be read; the command that loads it says why). An output path must not be one."""
    base = Path(base)
    if base.is_file():  # said first: an output path derived from it would only fail more obscurely
        raise _not_a_folder(base)
    try:
        owned = sorted(Manifest.load(base).owned_paths()) if base.is_dir() else []
    except ToolkitError:
        owned = []
    return [base / MANIFEST_NAME, *(base / p for p in owned)]


def _not_a_folder(base: Path) -> InputError:
    return InputError(f"{base} is a file, not an artifact folder: give the folder that holds {MANIFEST_NAME} "
                      f"(written by `python cli.py convert MODEL --out FOLDER`)")


def _relative(base: Path, path: Path) -> str:
    return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()


def _data_files(base: Path, model: Path) -> list[DataFile]:
    from core.onnxfile import external_data_files

    try:
        files = external_data_files(model)
    except InputError:
        raise
    except Exception:  # not parseable as ONNX (protobuf's DecodeError): the file's own hash is all there is
        return []
    return [DataFile(path=_relative(base, p), sha256=sha256_file(p), size_bytes=p.stat().st_size) for p in files]


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 manifest (free dicts) as schema 2; a malformed one is left for validation to refuse."""
    arts = data.get("artifacts")
    if not isinstance(arts, dict) or not all(isinstance(a, dict) for a in arts.values()):
        return {**data, "schema_version": SCHEMA_VERSION}
    return {**data, "schema_version": SCHEMA_VERSION,
            "artifacts": {k: migrate_v1_artifact(a) for k, a in arts.items()}}
