"""TensorRT engines through Polygraphy's API (never trtexec).

ONNX -> ``NetworkFromOnnxPath(strongly_typed=True)`` -> ``CreateConfig`` (sparse weights for 2:4
variants, one optimization profile from the IOSpec, timing cache, workspace limit, builder
optimization level) -> ``EngineFromNetwork`` -> ``model.plan``, written atomically and recorded in
the manifest: its build parameters (``EngineParams``) and what it is tied to (``EngineBuild``: the
TensorRT version, GPU name, compute capability, profile and sha256).

Precision comes from the ONNX model, not from builder flags: TensorRT 11 removed the weak-typing
builder flags (FP16, INT8, BF16) and implicit INT8 calibration, and TensorRT 10 deprecated
them. So an FP16 engine is built from the ``fp16`` ONNX variant and an INT8 engine from
``int8_trt``, the Q/DQ variant that convert/quantize.py calibrates (ONNX Runtime's MinMax, Entropy
or Percentile, its ranges cached in the output folder) and quantizes by TensorRT's rules. A strongly
typed network runs every layer in the precision its ONNX types say, on TensorRT 10 and 11 alike.

An engine only runs on the GPU model and TensorRT version it was built with;
``runtimes.trt.load_engine`` refuses any other, naming both. TensorRT is imported lazily: everything here except building and
deserializing works (and is tested) without it.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.config import EngineConfig, QuantConfig
from convert.trt_profile import compute_profile, profile_batches
from convert.trt_qdq import trt_qdq_problems
from core.errors import InputError, ToolkitError, ValidationError, first_line
from core.fsutil import atomic_write_bytes, sha256_file
from core.iospec import IOSpec
from core.manifest import Artifact, Precision
from core.metrics import ParityStats
from core.records import (
    CalibrationRecord,
    EngineBuild,
    EngineParams,
    Fp16Params,
    SparsityParams,
    StaticQuantParams,
    TrtQdqParams,
)
from runtimes.trt import TrtEnv, current_trt_env, require_tensorrt

if TYPE_CHECKING:
    from convert.context import ConvertContext
    from convert.validate import Reference

PLAN_NAME = "model.plan"


class EngineBuildError(ToolkitError):
    """TensorRT could not build (or serialize) an engine."""


#: The ONNX variant each engine precision is built from (FP32: the best FP32 model, opt or fp32).
SOURCE_FOR: dict[Precision, str] = {"fp16": "fp16", "int8": "int8_trt"}


def with_source_variants(cfg: EngineConfig, quant: QuantConfig | None) -> QuantConfig | None:
    """The quantization config that also makes the ONNX variants the engines are built from.

    An FP16 engine needs the ``fp16`` variant; an INT8 engine needs static INT8 calibration and its
    ``int8_trt`` variant. With ``source`` set, nothing is added.
    """
    if cfg.source is not None:
        return quant
    q = quant or QuantConfig()
    if cfg.int8 and not (q.int8_static and q.calib.data):
        raise InputError("--trt --int8 builds from Q/DQ scales calibrated on data: add --calib SOURCE (e.g. "
                         "imagenet_subset), or --trt-from an INT8 Q/DQ variant that follows TensorRT's rules")
    if cfg.fp16 and not q.fp16:
        q = q.model_copy(update={"fp16": True})
    if cfg.int8 and not q.trt_qdq:
        q = q.model_copy(update={"trt_qdq": True})
    return q if (quant is not None or q.any_variant) else None


def preflight(cfg: EngineConfig) -> None:
    """What can be checked before any export: the batch flags' order, then TensorRT and the GPU."""
    given = [(f"--{k.replace('_', '-')}", v) for k, v in
             (("min_batch", cfg.min_batch), ("opt_batch", cfg.opt_batch), ("max_batch", cfg.max_batch))
             if v is not None]
    if any(a[1] > b[1] for a, b in itertools.pairwise(given)):
        raise InputError("the optimization profile needs --min-batch <= --opt-batch <= --max-batch; got "
                         + ", ".join(f"{k} {v}" for k, v in given))
    if cfg.source is not None and cfg.int8:
        raise InputError("--trt-from with --int8: an INT8 engine takes its scales from int8_trt, which --trt --int8 "
                         "--calib SOURCE makes; drop --trt-from (or --trt-from an INT8 Q/DQ variant, without --int8)")
    require_tensorrt()


# -- builder configuration ----------------------------------------------------------------------
def source_is_sparse(source: Artifact) -> bool:
    """A 2:4 structured-sparse variant (its step's params say so: the sparsity step, or its FP16 copy)."""
    return isinstance(source.params, SparsityParams) or getattr(source.params, "sparsity", None) == "2:4"


def check_source(source: Artifact, base: Path) -> None:
    """Refuse a source TensorRT cannot build from, in one clear line, before any work."""
    if source.kind != "onnx":
        raise InputError(f"TensorRT builds from an ONNX artifact; {source.name!r} is a {source.kind}")
    if source.precision == "int8":
        problems = trt_qdq_problems(base / source.file.path)
        if problems:
            raise InputError(f"{source.name!r} is not Q/DQ by TensorRT's rules ({problems[0]}): build the INT8 "
                             "engine from int8_trt (convert --trt --int8 --calib SOURCE makes it)")


def engine_params(cfg: EngineConfig, source: Artifact, spec: IOSpec) -> EngineParams:
    """The build's settings as recorded in the manifest (the plan artifact's ``params``)."""
    lo, opt, hi = profile_batches(cfg, spec)
    return EngineParams(
        source=source.name, precision=source.precision, strongly_typed=True,
        int8_mode="explicit (Q/DQ)" if source.precision == "int8" else None,
        sparse_weights=source_is_sparse(source), min_batch=lo, opt_batch=opt, max_batch=hi,
        tf32=cfg.tf32, workspace_mb=cfg.workspace_mb, builder_optimization_level=cfg.builder_opt_level,
    )


def config_kwargs(cfg: EngineConfig, spec: IOSpec, source: Artifact, *,
                  timing_cache: Path | None = None) -> dict[str, Any]:
    """Keyword arguments for Polygraphy's ``CreateConfig``, with TensorRT enums still named.

    No FP16/INT8 flags: the network is strongly typed (``NETWORK_KWARGS``); TF32 is a math mode of
    FP32 layers, not a type, and stays a flag. ``profiles`` are plain
    {input: {min, opt, max}} dicts and ``memory_pool_limits`` is keyed by ``trt.MemoryPoolType``
    member name; ``create_config`` turns them into Polygraphy/TensorRT objects.
    """
    kw: dict[str, Any] = {"profiles": [compute_profile(cfg, spec)], "tf32": cfg.tf32,
                          "sparse_weights": source_is_sparse(source)}
    if cfg.workspace_mb is not None:
        kw["memory_pool_limits"] = {"WORKSPACE": cfg.workspace_mb * 2**20}
    if cfg.builder_opt_level is not None:
        kw["builder_optimization_level"] = cfg.builder_opt_level
    if timing_cache is not None and timing_cache.is_file() and timing_cache.stat().st_size:
        kw["load_timing_cache"] = str(timing_cache)
    return kw


#: Keyword arguments for Polygraphy's ``NetworkFromOnnxPath``: every layer in its ONNX type.
NETWORK_KWARGS: dict[str, Any] = {"strongly_typed": True}


def create_config(kwargs: dict[str, Any]) -> Any:
    """Polygraphy ``CreateConfig`` from ``config_kwargs`` output (TensorRT needed only for memory pools)."""
    from polygraphy.backend.trt import CreateConfig, Profile

    kw = dict(kwargs)
    profiles = []
    for shapes in kw.pop("profiles"):
        prof = Profile()
        for name, s in shapes.items():
            prof.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
        profiles.append(prof)
    if "memory_pool_limits" in kw:
        import tensorrt as trt

        kw["memory_pool_limits"] = {getattr(trt.MemoryPoolType, k): v for k, v in kw["memory_pool_limits"].items()}
    return CreateConfig(profiles=profiles, **kw)


# -- build ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def staged_copy(final: Path | None) -> Iterator[Path | None]:
    """A private working copy of a cache file that Polygraphy reads and rewrites in place.

    The copy lives in a temporary folder (so Polygraphy's ``.lock`` files never land next to the
    artifacts); on success a non-empty copy replaces ``final`` atomically, on failure ``final``
    is left as it was.
    """
    if final is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="onnxkit-trt-") as d:
        work = Path(d) / final.name
        if final.is_file() and final.stat().st_size:
            shutil.copyfile(final, work)
        yield work
        if work.is_file() and work.stat().st_size:
            atomic_write_bytes(final, work.read_bytes())


def build_engine(onnx_path: Path, plan_path: Path, kwargs: dict[str, Any], *,
                 save_timing_cache: Path | None = None) -> Any:
    """Build with Polygraphy, write ``plan_path`` atomically, return the deserialized engine."""
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, bytes_from_engine
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            engine = EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path), **NETWORK_KWARGS),
                                       config=create_config(kwargs),
                                       save_timing_cache=str(save_timing_cache) if save_timing_cache else None)()
            data = bytes_from_engine(engine)
    except PolygraphyException as exc:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path.name}: {first_line(exc)}") \
            from None
    atomic_write_bytes(plan_path, data)
    return engine


def engine_profile(engine: Any, names: list[str]) -> dict[str, dict[str, list[int]]]:
    """The min/opt/max shapes of profile 0 as the built engine reports them."""
    out: dict[str, dict[str, list[int]]] = {}
    for n in names:
        lo, opt, hi = engine.get_tensor_profile_shape(n, 0)
        out[n] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
    return out


def engine_build(env: TrtEnv, engine_sha256: str, profile: dict[str, dict[str, list[int]]], *,
                 timing_cache: str | None = None, calibration: CalibrationRecord | None = None) -> EngineBuild:
    """The manifest's ``engine`` record of a plan artifact: what it is tied to, its profile and caches."""
    return EngineBuild(tensorrt_version=env.tensorrt_version, gpu_name=env.gpu_name,
                       compute_capability=env.compute_capability, engine_sha256=engine_sha256, profile=profile,
                       timing_cache=timing_cache, calibration=calibration)


def source_calibration(source: Artifact) -> CalibrationRecord | None:
    """The calibration an INT8 source was made with (recorded with its engine too), else None."""
    params = source.params
    return params.calibration if isinstance(params, (StaticQuantParams, TrtQdqParams)) else None


# -- pipeline step ----------------------------------------------------------------------------------
def source_reference(base: Path, source: Artifact) -> Reference:
    """Outputs of the engine's own ONNX source in ONNX Runtime on CPU: what the engine must reproduce.

    Not the PyTorch model: a sparse, pruned or quantized source legitimately differs from it. A Q/DQ
    source runs as written (``simulate_qdq``), the arithmetic TensorRT's INT8 kernels follow.
    """
    from convert.validate import ort_reference

    return ort_reference(base / source.file.path, simulate_qdq=source.precision == "int8")


def _engine_parity(engine: Any, ctx: ConvertContext, source: Artifact,
                   batches: list[int]) -> dict[str, ParityStats]:
    """Run the fresh engine on random inputs and compare with its ONNX source (``source_reference``)."""
    from polygraphy.backend.trt import TrtRunner

    from core.metrics import compare_outputs

    reference = source_reference(ctx.out, source)
    parity: dict[str, ParityStats] = {}
    # a dim given a --dim-range runs at its opt value (inside the profile even where its binding is not)
    dims = {d: r[1] for d, r in (ctx.cfg.engine.dim_ranges if ctx.cfg.engine else {}).items()}
    with TrtRunner(engine) as runner:
        for b in batches:
            feed = ctx.spec.random_feed(b, seed=1234 + b, dims=dims)
            out = runner.infer(feed)
            got = [out[n].copy() for n in ctx.spec.output_names]
            parity[f"batch_{b}"] = compare_outputs(got, reference(feed), ctx.spec.output_names)
    return parity


def engine_sources(cfg: EngineConfig, best_fp32: str) -> list[tuple[str, str]]:
    """(engine artifact name, ONNX source artifact name) for each engine to build.

    With ``source`` and ``fp16``, the source is the FP16 conversion of ``source`` (``<source>_fp16``,
    made by ``step_engine``).
    """
    if cfg.source is not None:
        src = f"{cfg.source}_fp16" if cfg.fp16 else cfg.source
        return [(f"trt_{src}", src)]
    return [(f"trt_{p}", SOURCE_FOR.get(p, best_fp32)) for p in cfg.precisions()]


def plan_file(name: str, count: int) -> str:
    """``model.plan`` for the one engine of a conversion; ``model.<name>.plan`` each when there are several."""
    return PLAN_NAME if count == 1 else f"model.{name}.plan"


def _source_artifact(ctx: ConvertContext, name: str) -> Artifact:
    """The manifest artifact an engine is built from, or one clear line naming what there is."""
    source = ctx.manifest.artifacts.get(name)
    if source is None:
        raise InputError(f"--trt-from {name!r} is not in the manifest; available: {sorted(ctx.manifest.artifacts)}")
    return source


def fp16_of(ctx: ConvertContext, name: str) -> None:
    """Record ``<name>_fp16``: the FP16 conversion of ONNX artifact ``name`` (FP32 inputs/outputs kept).

    A 2:4 source's copy is marked sparse too (``Fp16Params.sparsity``): zeros stay zeros in FP16.
    """
    from convert.precision import convert_fp16

    source = _source_artifact(ctx, name)
    if source.kind != "onnx" or source.precision != "fp32":
        raise InputError(f"--trt-from {name!r} --fp16 converts an FP32 ONNX variant; {name!r} is a "
                         f"{source.precision} {source.kind}")
    target = ctx.path(f"model.{name}_fp16.onnx")
    ctx.log(f"FP16 conversion of {name} for the engine (ONNX Runtime's float16 converter, FP32 inputs/outputs kept)")
    info = convert_fp16(ctx.out / source.file.path, target)
    params = Fp16Params(**info.model_dump(), sparsity="2:4" if source_is_sparse(source) else None)
    ctx.manifest.record(ctx.out, target, name=f"{name}_fp16", kind="onnx", precision="fp16", parent=name,
                        params=params)
    ctx.manifest.save(ctx.out)


def step_engine(ctx: ConvertContext) -> None:
    """Build one strongly typed engine per precision asked for, from the matching ONNX variant."""
    from convert.context import failed_variant, skip_variant

    cfg = ctx.cfg.engine
    if cfg is None:
        return
    if cfg.source is not None and cfg.fp16:
        fp16_of(ctx, cfg.source)
    targets = engine_sources(cfg, ctx.best_fp32())
    for name, source_name in targets:
        if failed_variant(ctx, source_name) is not None:  # its source could not be made: left out, with the reason
            skip_variant(ctx, name, "build_engine", source_name)
            continue
        source = _source_artifact(ctx, source_name)
        if source.status == "failed":
            ctx.log(f"[yellow]warning:[/] {name}: not built, its source {source_name} failed its checks")
            continue
        check_source(source, ctx.out)
        _build_one(ctx, cfg, name, source, ctx.path(plan_file(name, len(targets))))


def _build_one(ctx: ConvertContext, cfg: EngineConfig, name: str, source: Artifact, plan: Path) -> None:
    env = current_trt_env()
    params = engine_params(cfg, source, ctx.spec)
    timing_cache = cfg.timing_cache or ctx.out / "timing.cache"
    with staged_copy(timing_cache) as staged_timing:
        kwargs = config_kwargs(cfg, ctx.spec, source, timing_cache=staged_timing)
        ctx.log(f"building TensorRT engine {plan.name} from {source.file.path} ({source.precision}, strongly typed, "
                f"batch {params.min_batch}..{params.max_batch}, opt {params.opt_batch}) on {env.describe()}")
        engine = build_engine(ctx.out / source.file.path, plan, kwargs, save_timing_cache=staged_timing)
    build = engine_build(env, sha256_file(plan), engine_profile(engine, ctx.spec.input_names),
                         timing_cache=str(cfg.timing_cache or ctx.final_path("timing.cache")),
                         calibration=source_calibration(source))
    art = ctx.manifest.record(ctx.out, plan, name=name, kind="plan", precision=source.precision, params=params,
                              parent=source.name, engine=build)
    art.metrics.parity = _engine_parity(engine, ctx, source, sorted({params.min_batch, params.opt_batch}))
    art.metrics.parity_reference = f"onnxruntime cpu on {source.name}"
    _check_parity(ctx, cfg, art, source, plan)


def _check_parity(ctx: ConvertContext, cfg: EngineConfig, art: Artifact, source: Artifact, plan: Path) -> None:
    """Every engine must reproduce its source; a failure marks the artifact failed and raises. FP32/FP16: the
    ONNX tolerances. INT8: its outputs against ONNX Runtime running its Q/DQ source (which passed the accuracy
    gate against FP32) must keep the gate's default cosine: TensorRT's INT8 kernels round differently from
    ONNX Runtime's Q/DQ simulation, but not by more than that.
    """
    from convert.config import DEFAULT_MIN_COSINE
    from convert.validate import Tolerance

    if art.precision == "int8":
        min_cosine = DEFAULT_MIN_COSINE
    else:
        min_cosine = (Tolerance.fp16() if art.precision == "fp16" else Tolerance.tf32() if cfg.tf32
                      else Tolerance.fp32()).min_cosine
    bad = [f"parity with {source.name} at {k}: cosine {v.cosine:.6f} < {min_cosine}"
           for k, v in art.metrics.parity.items() if v.cosine < min_cosine]
    if bad:
        art.status = "failed"
        art.notes.extend(bad)
        ctx.manifest.save(ctx.out)
        raise ValidationError(f"TensorRT engine {plan.name}", bad)
