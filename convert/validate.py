"""Validation: onnx.checker (full), shape inference, and numeric parity with a reference.

Every check runs; the failures are reported together in one ``ValidationError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError, ValidationError, first_line
from core.iospec import IOSpec

Reference = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class Tolerance(BaseModel):
    """Parity tolerances: |a - b| <= atol + rtol * |b| element-wise, and cosine >= min_cosine."""

    model_config = ConfigDict(extra="forbid")

    atol: float = Field(default=1e-4, description="Absolute tolerance")
    rtol: float = Field(default=1e-3, description="Relative tolerance")
    min_cosine: float = Field(default=0.9999, description="Minimum cosine similarity per output")

    @classmethod
    def fp32(cls) -> Tolerance:
        return cls()

    @classmethod
    def fp16(cls) -> Tolerance:
        return cls(atol=5e-2, rtol=5e-2, min_cosine=0.999)

    @classmethod
    def tf32(cls) -> Tolerance:
        """FP32 layers on TF32 tensor cores (10-bit mantissa products, FP32 accumulation)."""
        return cls(atol=1e-2, rtol=1e-2, min_cosine=0.9995)


def compare_outputs(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, float]:
    """Max abs / max rel / mean abs error and the minimum cosine over all outputs."""
    max_abs = max_rel = mean_abs = 0.0
    cos_min = 1.0
    for g, r in zip(got, ref, strict=True):
        g64 = np.asarray(g, dtype=np.float64).reshape(-1)
        r64 = np.asarray(r, dtype=np.float64).reshape(-1)
        if g64.shape != r64.shape:
            return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "mean_abs_err": float("inf"),
                    "cosine": 0.0}
        diff = np.abs(g64 - r64)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        mean_abs = max(mean_abs, float(diff.mean()) if diff.size else 0.0)
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(r64), 1e-6)).max(initial=0.0)))
        denom = float(np.linalg.norm(g64) * np.linalg.norm(r64))
        cos = float(np.dot(g64, r64) / denom) if denom > 0 else float(np.allclose(g64, r64))
        cos_min = min(cos_min, cos)
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "mean_abs_err": mean_abs, "cosine": cos_min}


def ort_session(model: Path | bytes, threads: int | None = None, providers: list[str] | None = None, *,
                simulate_qdq: bool = False) -> Any:
    """An ONNX Runtime CPU session (or the given providers) over a file or a serialised model;
    a model ONNX Runtime refuses is an InputError.

    ``simulate_qdq`` turns graph optimizations off, so Q/DQ pairs run as written (quantize, then
    dequantize, then the FP32 op) instead of being fused into ONNX Runtime's integer kernels: the
    arithmetic TensorRT's INT8 kernels follow (INT32 accumulation), without the x86 CPU kernels'
    saturation of full-range signed INT8 weights.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if simulate_qdq:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=so,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        what = "the in-memory model" if isinstance(model, bytes) else str(model)
        raise InputError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from None


def ort_reference(path: Path, simulate_qdq: bool = False) -> Reference:
    """Outputs of ``path`` in ONNX Runtime on CPU, in the model's output order (``simulate_qdq``: see
    ``ort_session``)."""
    sess = ort_session(path, simulate_qdq=simulate_qdq)
    return lambda feed: list(sess.run(None, feed))


def torch_reference(module: Any, spec: IOSpec) -> Reference:
    """Run a PyTorch module in eval mode on CPU in FP32, outputs flattened to a list."""
    import torch

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(feed[n]) for n in spec.input_names])
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().float().numpy() if hasattr(o, "detach") else np.asarray(o) for o in outs]

    return run


def structural_checks(path: Path) -> tuple[Any, list[str]]:
    """Load, full checker, strict shape inference. Returns (model or None, failures)."""
    import onnx

    failures: list[str] = []
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise InputError(f"{path} is not a readable ONNX model (corrupt or truncated?): "
                         f"{first_line(exc)}") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        failures.append(f"onnx.checker: {first_line(exc)}")
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        failures.append(f"shape inference: {first_line(exc)}")
    return model, failures


def validate_onnx(path: Path, spec: IOSpec, reference: Reference | None, *, batches: Sequence[int] = (1, 2),
                  tol: Tolerance | None = None, what: str | None = None) -> dict[str, Any]:
    """Run every check on ``path``; return the parity numbers; raise one ValidationError on any failure."""
    tol = tol or Tolerance.fp32()
    _, failures = structural_checks(path)
    metrics: dict[str, Any] = {"checker": "ok" if not any(f.startswith("onnx.checker") for f in failures) else "failed",
                               "shape_inference": "ok" if not any(f.startswith("shape") for f in failures)
                               else "failed", "parity": {}}
    if reference is not None:
        try:
            sess = ort_session(path)
        except InputError as exc:
            failures.append(str(exc))
            batches = ()
        for batch in batches:
            feed = spec.random_feed(batch, seed=1234 + batch)
            try:
                got = list(sess.run(None, feed))
            except Exception as exc:
                failures.append(f"ONNX Runtime run at batch {batch}: {first_line(exc)}")
                continue
            ref = reference(feed)
            stats = compare_outputs(got, ref)
            metrics["parity"][f"batch_{batch}"] = stats
            bad = len(got) != len(ref) or any(
                not np.allclose(np.asarray(g, np.float64), np.asarray(r, np.float64), atol=tol.atol, rtol=tol.rtol)
                for g, r in zip(got, ref, strict=False))
            if bad:
                failures.append(f"parity at batch {batch}: max abs err {stats['max_abs_err']:.3g} exceeds "
                                f"atol {tol.atol:g} + rtol {tol.rtol:g}")
            if stats["cosine"] < tol.min_cosine:
                failures.append(f"parity at batch {batch}: cosine {stats['cosine']:.6f} < {tol.min_cosine}")
    if failures:
        raise ValidationError(f"validation of {what or path.name}", failures)
    return metrics
