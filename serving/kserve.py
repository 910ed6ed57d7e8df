"""`package --format kserve`: a Triton model repository plus the KServe ``InferenceService`` that serves it.

    DIR/model_repository/            the repository `package --format triton` writes (MANIFEST.json included)
    DIR/inferenceservice.yaml        serving.kserve.io/v1beta1 InferenceService: Triton runtime, v2 protocol

The manifest is built from the ``kserve`` package's own model classes (``V1beta1InferenceService`` ...) and
serialised with its API client, then read back from disk and rebuilt class by class, refusing any key those
classes do not define: what is written is what KServe's schema describes. ``storageUri`` is where the deployment
team uploads ``model_repository/``: KServe's storage initializer copies that folder to ``/mnt/models`` and the
``kserve-tritonserver`` runtime starts Triton on it, so each model is served under its folder name
(``/v2/models/<name>/infer``). Autoscaling runs on Knative: concurrency or requests per second through its Pod
Autoscaler (scale to zero allowed), CPU or memory through its HPA class (at least one replica).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from core.errors import BackendUnavailableError, InputError, ValidationError
from core.fsutil import _umask, atomic_write_text, ensure_writable_dir
from serving.triton import REPO_MANIFEST, PackageConfig, RepoManifest, _swap_in, package, source_base_name

REPO_DIR = "model_repository"
ISVC_FILE = "inferenceservice.yaml"
#: Knative exposes one port; Triton's gRPC port in the kserve-tritonserver runtime. "h2c": Knative's gRPC port name.
GRPC_PORT = 9000
#: Schemes KServe's storage initializer downloads from.
STORAGE_SCHEMES = ("gs", "s3", "pvc", "http", "https", "hdfs", "webhdfs", "hf", "oci")
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_PRIMITIVES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "bool": bool, "float": (int, float)}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: An OCI image tag (the Docker reference grammar): a word character, then up to 127 of [A-Za-z0-9_.-].
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class KServeOptions(BaseModel):
    """The InferenceService side of `package --format kserve` (field names are the CLI flags)."""

    model_config = ConfigDict(extra="forbid")

    storage_uri: str = Field(description="Where model_repository/ is uploaded: gs://, s3://, pvc://, https:// ...")
    service_name: str | None = Field(default=None, description="InferenceService name (a DNS-1035 label); default: "
                                                               "the model name, lower case, '_' -> '-'")
    cpu: str = Field(default="1", description="CPU request and limit per replica (Kubernetes quantity: 1, 500m)")
    memory: str = Field(default="2Gi", description="Memory request and limit per replica (Kubernetes quantity)")
    gpus: int = Field(default=0, ge=0, le=64, description="nvidia.com/gpu per replica")
    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas; 0 lets Knative scale to zero")
    max_replicas: int | None = Field(default=None, ge=1, description="Most replicas (default: KServe's)")
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = Field(
        default="concurrency", description="What the autoscaler watches: concurrency/rps (Knative Pod Autoscaler), "
                                           "cpu/memory (Knative's HPA class)")
    scale_target: int | None = Field(default=None, ge=1, description="Target value per replica of --scale-metric "
                                                                      "(cpu: % of the request)")
    grpc: bool = Field(default=False, description="Expose Triton's gRPC port instead of HTTP (Knative routes one)")
    runtime_version: str | None = Field(default=None, description="Triton image tag, e.g. 24.08-py3 (default: the "
                                                                   "runtime's)")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str, info: ValidationInfo) -> str:
        m = _QUANTITY.match(v.strip())
        if not m or float(m.group(1)) <= 0:
            raise InputError(f"--{info.field_name}: {v!r} is not a positive Kubernetes quantity (e.g. 2, 500m, "
                             "2Gi, 512Mi)")
        return v.strip()

    @field_validator("storage_uri")
    @classmethod
    def _storage(cls, v: str) -> str:
        scheme, sep, rest = v.partition("://")
        if not sep or scheme not in STORAGE_SCHEMES or not rest.strip("/"):
            raise InputError(f"--storage-uri {v!r} is not a storage URI KServe downloads from ({', '.join(STORAGE_SCHEMES)}, "
                             "e.g. s3://bucket/models/resnet)")
        return v

    @field_validator("service_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 63 or not _DNS1035.match(v)):
            raise InputError(f"--service-name {v!r} is not a DNS-1035 label (lower-case letters, digits and '-', starting with a "
                             "letter, at most 63 characters)")
        return v

    @field_validator("runtime_version")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        if v is not None and not _IMAGE_TAG.match(v):
            raise InputError(f"--runtime-version {v!r} is not an image tag (letters, digits, '_', '.' and '-', not "
                             "starting with '.' or '-', at most 128 characters; e.g. 24.08-py3)")
        return v

    @model_validator(mode="after")
    def _scaling(self) -> KServeOptions:
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise InputError(f"--min-replicas {self.min_replicas} is above --max-replicas {self.max_replicas}")
        if self.scale_metric in ("cpu", "memory") and self.min_replicas == 0:
            raise InputError(f"--scale-metric {self.scale_metric} scales with Knative's HPA class, which cannot "
                             "scale to zero: use --min-replicas 1 or more")
        if self.scale_metric == "cpu" and self.scale_target is not None and self.scale_target > 100:
            raise InputError(f"--scale-target {self.scale_target}: a cpu target is a percentage (1..100)")
        return self


def service_name(base: str) -> str:
    """A DNS-1035 label from a model name: ``tiny_cnn`` -> ``tiny-cnn``."""
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    name = name if name[:1].isalpha() else f"m-{name}"
    return name[:63].rstrip("-")


def kserve_modules() -> tuple[Any, Any]:
    """(kserve, kubernetes.client), or one clear line saying how to get them."""
    argv = sys.argv
    try:
        sys.argv = argv[:1]  # kserve.model_server parses the process's arguments when imported
        import kserve
        from kubernetes import client
    except ImportError as exc:
        raise BackendUnavailableError(f"--format kserve needs the kserve package (pip install 'onnxkit[kserve]'): "
                                      f"{exc}") from None
    except TypeError as exc:  # protobuf: both register the `inference.*` gRPC messages
        raise BackendUnavailableError("the kserve package cannot be imported in a process that has already "
                                      f"imported tritonclient.grpc ({exc}); run `package` on its own") from None
    finally:
        sys.argv = argv
    return kserve, client


def build_inference_service(name: str, opts: KServeOptions) -> Any:
    """The ``V1beta1InferenceService`` for a Triton repository at ``opts.storage_uri``."""
    kserve, k8s = kserve_modules()
    amounts = {"cpu": opts.cpu, "memory": opts.memory} | ({"nvidia.com/gpu": str(opts.gpus)} if opts.gpus else {})
    model = kserve.V1beta1ModelSpec(
        name="kserve-container",  # the runtime container's name: KServe merges the two
        model_format=kserve.V1beta1ModelFormat(name="triton"),
        protocol_version="grpc-v2" if opts.grpc else "v2",
        storage_uri=opts.storage_uri, runtime_version=opts.runtime_version,
        resources=k8s.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts)),
        ports=[k8s.V1ContainerPort(container_port=GRPC_PORT, name="h2c", protocol="TCP")] if opts.grpc else None)
    predictor = kserve.V1beta1PredictorSpec(model=model, min_replicas=opts.min_replicas,
                                            max_replicas=opts.max_replicas, scale_metric=opts.scale_metric,
                                            scale_target=opts.scale_target)
    annotations = {"serving.kserve.io/deploymentMode": "Serverless"}  # Knative, whatever the cluster's default
    if opts.scale_metric in ("cpu", "memory"):  # the Knative Pod Autoscaler scales on requests only
        annotations["autoscaling.knative.dev/class"] = "hpa.autoscaling.knative.dev"
    return kserve.V1beta1InferenceService(
        api_version=kserve.constants.KSERVE_V1BETA1, kind=kserve.constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=k8s.V1ObjectMeta(name=name, annotations=annotations,
                                  labels={"app.kubernetes.io/managed-by": "onnxkit"}),
        spec=kserve.V1beta1InferenceServiceSpec(predictor=predictor))


def to_dict(obj: Any) -> Any:
    """The manifest as Kubernetes reads it (camelCase keys, unset fields left out), by KServe's API client."""
    from kserve.api_client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _from_dict(data: Any, type_name: str, where: str, mods: tuple[Any, Any]) -> Any:
    """``data`` rebuilt as ``type_name`` (an OpenAPI type string of the model classes of ``mods``: kserve,
    kubernetes.client)."""
    if data is None:
        return None
    if m := re.fullmatch(r"(?:list|List)\[(.*)\]", type_name):
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list")
        return [_from_dict(x, m.group(1), f"{where}[{i}]", mods) for i, x in enumerate(data)]
    if m := re.fullmatch(r"dict\(str, (.*)\)|Dict\[str, (.*)\]", type_name):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping")
        return {k: _from_dict(v, m.group(1) or m.group(2), f"{where}.{k}", mods) for k, v in data.items()}
    primitive = _PRIMITIVES.get(type_name)
    if primitive is not None or type_name == "object":
        if primitive is not None and (not isinstance(data, primitive) or (isinstance(data, bool)
                                                                           and type_name != "bool")):
            raise ValueError(f"{where}: expected {type_name}, got {data!r}")
        return data
    cls = getattr(mods[0].models, type_name, None) or getattr(mods[1], type_name, None)
    if cls is None or not isinstance(data, dict):
        raise ValueError(f"{where}: cannot read a {type_name} from {type(data).__name__}")
    attrs = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    if unknown := sorted(set(data) - set(attrs)):
        raise ValueError(f"{where}: {type_name} has no field(s) {unknown}")
    return cls(**{attrs[k]: _from_dict(v, cls.openapi_types[attrs[k]], f"{where}.{k}", mods)
                  for k, v in data.items()})


def load_inference_service(path: Path) -> Any:
    """``path`` read back into KServe's ``V1beta1InferenceService``; any field its classes do not define, a
    wrong type or a missing required field is a ValidationError."""
    import yaml

    mods = kserve_modules()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        isvc = _from_dict(data, "V1beta1InferenceService", "InferenceService", mods)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, TypeError) as exc:
        raise ValidationError(f"{path}", [f"not an InferenceService KServe's model classes accept: {exc}"]) from None
    if isvc.spec is None or isvc.spec.predictor is None or isvc.spec.predictor.model is None:
        raise ValidationError(f"{path}", ["no spec.predictor.model"])
    return isvc


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPO_DIR / REPO_MANIFEST).is_file():
        raise InputError(f"--out {out} is a non-empty folder that `package --format kserve` did not write; "
                         "refusing to replace it (choose an empty or new folder)")
    ensure_writable_dir(out.parent)


def _check_devices(cfg: PackageConfig, repo: RepoManifest, opts: KServeOptions) -> None:
    gpu_models = [m.name for m in repo.models if m.kind == "plan"] if cfg.kind is None else (
        [m.name for m in repo.models] if cfg.kind == "gpu" else [])
    if gpu_models and not opts.gpus:
        raise InputError(f"{', '.join(gpu_models)} run(s) on GPU instances: give each replica a GPU with --gpus 1")


def package_kserve(cfg: PackageConfig, opts: KServeOptions,
                   log: Callable[[str], None] = print) -> tuple[RepoManifest, Path, Any]:
    """Write ``cfg.out``/model_repository and ``cfg.out``/inferenceservice.yaml; return the repository manifest,
    the folder and the InferenceService read back from disk. Built in a staging folder and swapped in whole."""
    import yaml

    kserve_modules()  # before any work: one clear line when kserve is missing
    out = Path(cfg.out)
    _prepare(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        lines: list[str] = []  # shown once everything passed: a refusal is one line
        repo, _ = package(cfg.model_copy(update={"out": tmp / REPO_DIR}), log=lines.append)
        _check_devices(cfg, repo, opts)
        name = opts.service_name or service_name(cfg.name or source_base_name(repo.source_model))
        doc = to_dict(build_inference_service(name, opts))
        atomic_write_text(tmp / ISVC_FILE, yaml.safe_dump(doc, sort_keys=False))
        isvc = load_inference_service(tmp / ISVC_FILE)
        if to_dict(isvc) != doc:
            raise ValidationError(str(out / ISVC_FILE), ["reads back different from what was written"])
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for line in lines:
        log(line)
    log(f"InferenceService {name}: Triton (v2 {'gRPC' if opts.grpc else 'REST'}), storageUri {opts.storage_uri}, "
        f"{opts.cpu} CPU / {opts.memory}" + (f" / {opts.gpus} GPU" if opts.gpus else "")
        + f" per replica, {opts.min_replicas}..{opts.max_replicas or 'default'} replicas on {opts.scale_metric}")
    return repo, out, isvc



def options_from_flags(flags: dict[str, Any]) -> KServeOptions:
    """KServeOptions from the `package` flags that were given (None: not given)."""
    if flags.get("storage_uri") is None:
        raise InputError("--format kserve needs --storage-uri: where model_repository/ will be uploaded "
                         "(e.g. s3://bucket/models/resnet, gs://..., pvc://claim/path)")
    return KServeOptions(**{k: v for k, v in flags.items() if v is not None})


def refuse_kserve_flags(flags: dict[str, Any]) -> None:
    """`package --format triton` with an InferenceService flag: one clear line rather than a silent no-op."""
    if given := [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]:
        raise InputError(f"{', '.join(given)}: only with --format kserve")
