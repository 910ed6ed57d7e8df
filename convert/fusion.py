"""Transformer graph fusion: ONNX Runtime's transformer optimizer as a variant (``fused``).

``onnxruntime.transformers.optimizer`` (what ``onnxruntime-tools`` used to ship) fuses attention,
LayerNorm (+ residual: SkipLayerNormalization), GELU (+ bias) and embedding patterns into ONNX
Runtime's contrib ops. It runs only when the graph looks like a transformer (Softmax over MatMul
scores, and LayerNormalization) and is kept only when it fused something. The result uses
``com.microsoft`` ops, so it is for ONNX Runtime only: a separate variant, validated like ``opt``
against the same reference, never the source of TensorRT engines or of the default served model. A fusion that
fails (the optimizer raises, or its file fails validation) leaves the variant out; the run goes on.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convert.context import ConvertContext, attempt_variant, parity_batches
from convert.validate import Tolerance, validate_onnx
from core.errors import ToolkitError, ValidationError, first_line
from core.fsutil import scratch_cwd
from core.onnxfile import save_onnx
from core.quiet import quiet_loggers
from core.records import FusionParams

FUSED = "fused"
CONTRIB_NOTE = ("uses ONNX Runtime contrib ops (com.microsoft): for ONNX Runtime only, not for TensorRT or other "
                "runtimes")


def looks_like_transformer(model: Any) -> bool:
    """Softmax and MatMul (attention scores) and a layer norm: the patterns the optimizer fuses."""
    ops = {n.op_type for n in model.graph.node}
    return {"Softmax", "MatMul"} <= ops and bool(ops & {"LayerNormalization", "ReduceMean"})


def step_fuse(ctx: ConvertContext) -> None:
    """Write ``model.fused.onnx`` from the plain export (``fp32``) when the graph is a transformer and something
    fuses. Not from ``opt``: onnxslim's and ONNX Runtime's rewrites break the attention and embedding patterns
    the optimizer matches (a tiny BERT: Attention x2 + EmbedLayerNormalization from the export, none from opt)."""
    import onnx

    src_name = "fp32" if "fp32" in ctx.manifest.artifacts else ctx.best_fp32()
    if ctx.manifest.artifacts[src_name].components:
        ctx.log("transformer fusion skipped: the model is exported as several files (per-component fusion is not "
                "built yet)")
        return
    src = (ctx.out / ctx.manifest.artifacts[src_name].file.path).resolve()
    model = onnx.load(str(src), load_external_data=False)
    if not looks_like_transformer(model):
        return
    if loops := sum(n.op_type in ("Loop", "Scan") for n in model.graph.node):
        # mvit_v2_s (51 Loops, 13k nodes): the optimizer's symbolic shape inference re-infers every Loop body for
        # each Cast it checks (past 30 minutes); without it, the optimizer wrote nodes out of order (a Loop body's
        # outer-scope inputs), a file the checker refuses
        ctx.log(f"transformer fusion skipped: the graph has {loops} Loop/Scan node(s), which ONNX Runtime's "
                "transformer optimizer does not handle (no 'fused' variant)")
        return
    # optional: a failure (the optimizer, or a fused file that fails validation) leaves it out, the run goes on
    attempt_variant(ctx, FUSED, "fuse_transformer", lambda: _fuse(ctx, src_name, src), parent=src_name)


def _fuse(ctx: ConvertContext, src_name: str, src: Path) -> None:
    ctx.log("transformer fusion (onnxruntime.transformers.optimizer: attention, LayerNorm, GELU)")
    try:
        _fuse_with(ctx, src_name, src, rotary=True)
    except ValidationError as exc:
        if not any("RotaryEmbedding" in f for f in exc.failures):
            raise
        # ONNX Runtime's RotaryEmbedding takes position_ids of the batch's size; the optimizer feeds it the export's
        # broadcast [1, sequence] positions (gemma), a file that runs at batch 1 only
        ctx.log("transformer fusion: the fused RotaryEmbedding fails at batch > 1 "
                f"({exc.failures[0].splitlines()[0][:160]}); fusing again without rotary-embedding fusion")
        ctx.path(f"model.{FUSED}.onnx").unlink(missing_ok=True)
        _fuse_with(ctx, src_name, src, rotary=False)


def _fuse_with(ctx: ConvertContext, src_name: str, src: Path, *, rotary: bool) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_rotary_embeddings = rotary
    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logs(), scratch_cwd():
            optimized = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                                       use_gpu=False, optimization_options=options)
    except Exception as exc:
        raise ToolkitError(f"ONNX Runtime's transformer optimizer failed on {src.name}: "
                           f"{first_line(exc, with_type=True)}") from exc
    fused = {k: int(v) for k, v in (optimized.get_fused_operator_statistics() or {}).items() if v}
    if not fused:
        ctx.log("transformer fusion: nothing fused; no 'fused' variant")
        return
    target = ctx.path(f"model.{FUSED}.onnx")
    save_onnx(_ready_to_save(optimized), target)
    notes = [CONTRIB_NOTE] + ([] if rotary else [
        "rotary-embedding fusion off: ONNX Runtime's fused RotaryEmbedding failed at batch > 1 on this model"])
    metrics = validate_onnx(target, ctx.spec, ctx.reference, batches=parity_batches(ctx), tol=Tolerance.fp32(),
                            what=target.name)  # raises before anything is recorded
    art = ctx.manifest.record(ctx.out, target, name=FUSED, kind="onnx", parent=src_name, notes=notes,
                              params=FusionParams(model_type="bert", fused_ops=fused))
    art.metrics.update(metrics)
    ctx.log(f"{FUSED}: " + ", ".join(f"{k} x{v}" for k, v in sorted(fused.items())))


def _ready_to_save(optimized: Any) -> Any:
    """What ``OnnxModel.save_model_to_file`` does before writing (we write with ``save_onnx``: atomic, external
    data past 2 GiB): nodes in topological order, and the ``com.microsoft`` opset the fused ops need."""
    with scratch_cwd():  # a failed sort writes _topo_sort_failed.onnx into the working directory
        optimized.topological_sort()
    model = optimized.model
    if any(n.domain == "com.microsoft" for n in model.graph.node) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    return model


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The optimizer's warnings, and its symbolic shape inference's one line per undecidable dim ("Cannot determine
    if past_sequence + sequence - sequence < 0" for a KV-cache decoder), stay out of the log."""
    with quiet_loggers("onnxruntime.transformers", "onnxruntime.tools.symbolic_shape_infer", "symbolic_shape_infer"):
        yield
