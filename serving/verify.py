"""`verify REPO`: check a model repository against its MANIFEST.json before deploying it.

Every check runs and every failure is listed: a missing, changed (sha256 or size) or unlisted file,
a ``config.pbtxt`` that Triton's schema rejects or that disagrees with the manifest, and a TensorRT
plan built for another GPU or TensorRT version than this machine has (where that can be told here).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from core.errors import InputError, ValidationError
from core.fsutil import sha256_file
from serving.triton import REPO_MANIFEST, REPO_SCHEMA_VERSION, RepoManifest, RepoModel
from serving.triton_config import check_config, parse_config


class VerifyReport(BaseModel):
    """What a successful verification checked."""

    model_config = ConfigDict(extra="forbid")

    repo: str
    models: list[str]
    files_checked: int
    notes: list[str] = Field(default_factory=list, description="Checks that could not be made on this machine")


def load_repo_manifest(repo: Path) -> RepoManifest:
    path = repo / REPO_MANIFEST
    if repo.exists() and not repo.is_dir():
        raise InputError(f"{repo} is a file; expected a model repository folder written by `package` "
                         f"(with {REPO_MANIFEST})")
    if not repo.is_dir():
        raise InputError(f"model repository {repo} does not exist")
    if not path.is_file():
        raise InputError(f"no {REPO_MANIFEST} in {repo}: not a repository written by `package`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"{path}", [f"not readable JSON: {exc}"]) from None
    if not isinstance(data, dict) or data.get("schema_version") != REPO_SCHEMA_VERSION:
        got = data.get("schema_version") if isinstance(data, dict) else None
        raise ValidationError(f"{path}", [f"schema_version {got!r}; this toolkit reads {REPO_SCHEMA_VERSION}"])
    try:
        return RepoManifest.model_validate(data)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ValidationError(f"{path}", [f"does not match the repository manifest schema: {loc}: {first['msg']}"]) \
            from None


def _check_files(repo: Path, manifest: RepoManifest) -> list[str]:
    problems: list[str] = []
    root = repo.resolve()
    listed: set[Path] = set()
    for rec in manifest.files:
        p = (repo / rec.path).resolve()
        listed.add(p)
        if not p.is_relative_to(root):
            problems.append(f"{rec.path}: points outside the repository")
        elif not p.is_file():
            problems.append(f"{rec.path}: missing")
        elif p.stat().st_size != rec.size_bytes:
            problems.append(f"{rec.path}: {p.stat().st_size} bytes, MANIFEST.json records {rec.size_bytes} "
                            "(changed after packaging)")
        elif (digest := sha256_file(p)) != rec.sha256:
            problems.append(f"{rec.path}: sha256 {digest[:12]}… differs from the recorded {rec.sha256[:12]}… "
                            "(changed after packaging)")
    for p in sorted(repo.rglob("*")):
        if p.is_file() and p.name != REPO_MANIFEST and p.resolve() not in listed:
            problems.append(f"{p.relative_to(repo).as_posix()}: not listed in MANIFEST.json")
    return problems


def _check_model(repo: Path, model: RepoModel) -> list[str]:
    model_dir = repo / model.name
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.is_file():
        return [f"{model.name}/config.pbtxt: missing"]
    try:
        msg = parse_config(cfg_path)
    except ValidationError as exc:
        return exc.failures
    problems = check_config(msg, model_dir)
    if (msg.platform or msg.backend) != model.platform:
        problems.append(f"{model.name}: config platform {msg.platform or msg.backend!r} but MANIFEST.json records "
                        f"{model.platform!r}")
    return problems


def _check_engine(model: RepoModel, notes: list[str]) -> list[str]:
    """A plan runs only on the GPU model and TensorRT version it was built with."""
    from runtimes.trt import TrtEnv, current_trt_env, tensorrt_problem

    engine = model.engine or {}
    try:
        built = TrtEnv(tensorrt_version=str(engine["tensorrt"]), gpu_name=str(engine["gpu"]),
                       compute_capability=str(engine["compute_capability"]))
    except KeyError as exc:
        return [f"{model.name}: MANIFEST.json does not record the {exc.args[0]} this plan was built for"]
    if (why := tensorrt_problem()) is not None:
        notes.append(f"{model.name}: built for {built.describe()}; not checked here ({why})")
        return []
    here = current_trt_env()
    if here != built:
        return [f"{model.name}: plan built for {built.describe()}, this machine has {here.describe()}"]
    return []


def verify_repo(repo: Path) -> VerifyReport:
    """Check every file and config of ``repo``; raise one ValidationError listing every failure. A folder from
    `package --format kserve` is checked as its model repository plus its InferenceService manifest."""
    from serving.kserve import ISVC_FILE, REPO_DIR, load_inference_service

    repo = Path(repo)
    if not (repo / REPO_MANIFEST).is_file() and (repo / REPO_DIR / REPO_MANIFEST).is_file():
        report = verify_repo(repo / REPO_DIR)
        load_inference_service(repo / ISVC_FILE)
        return report.model_copy(update={"repo": str(repo), "files_checked": report.files_checked + 1, "notes": [
            *report.notes, f"{ISVC_FILE}: read back by KServe's model classes; its storageUri is not checked here"]})
    manifest = load_repo_manifest(repo)
    problems = _check_files(repo, manifest)
    notes: list[str] = []
    on_disk = {p.name for p in repo.iterdir() if p.is_dir()}
    for extra in sorted(on_disk - {m.name for m in manifest.models}):
        problems.append(f"{extra}/: a model folder that MANIFEST.json does not list")
    for model in manifest.models:
        problems += _check_model(repo, model)
        if model.kind == "plan":
            problems += _check_engine(model, notes)
    if problems:
        raise ValidationError(f"model repository {repo} failed verification", problems)
    return VerifyReport(repo=str(repo), models=[m.name for m in manifest.models], files_checked=len(manifest.files),
                        notes=notes)
