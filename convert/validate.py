"""Validation: onnx.checker (full), shape inference, and numeric parity with a reference.

Every check runs; the failures are reported together in one ``ValidationError``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError, ValidationError, first_line
from core.iospec import IOSpec
from core.metrics import compare_outputs, not_measurable_line
from core.models import output_list
from core.onnxfile import external_data_files
from core.records import ArtifactMetrics
from runtimes.ort import ort_session

Reference = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class Tolerance(BaseModel):
    """Parity tolerances: |a - b| <= atol * scale + rtol * |b| element-wise, where scale = max(1, max |b|) over
    the output, and cosine >= min_cosine.

    The absolute part follows the output's magnitude: floating-point sums differ by an amount proportional
    to the size of what is summed, not to the (possibly tiny) result, so an element near zero in an output
    of large values (a random-init inception_v3's logits are ~1e8) is within rounding of its reference."""

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




def ort_reference(path: Path, simulate_qdq: bool = False) -> Reference:
    """Outputs of ``path`` in ONNX Runtime on CPU, in the model's output order (``simulate_qdq``: see
    ``ort_session``). A run that fails raises without ONNX Runtime's own error log: the caller words it (and
    :func:`parity_spec` expects the source to refuse some shapes)."""
    sess = ort_session(path, simulate_qdq=simulate_qdq)
    quiet = _quiet_run()
    return lambda feed: list(sess.run(None, feed, quiet))


def _quiet_run() -> Any:
    """Run options without ONNX Runtime's own error log: a failing run is reported once, in the caller's words."""
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    return quiet


def torch_reference(module: Any, spec: IOSpec) -> Reference:
    """Run a PyTorch module in eval mode on CPU in FP32, outputs flattened to a list."""
    import torch

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(feed[n]) for n in spec.input_names])
        outs = output_list(out)
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
    # Past protobuf's 2 GiB (weights in an external-data file) neither check takes the loaded model: both read the
    # file by path instead (vit_h_14 and regnet_y_128gf failed here, benchmarks/run_coverage.py).
    large = bool(external_data_files(path))
    try:
        onnx.checker.check_model(str(path) if large else _ort_ops_as_contrib(model), full_check=True)
    except Exception as exc:
        failures.append(f"onnx.checker: {first_line(exc)}")
    try:
        _infer_shapes(model, path, large, data_prop=True)
    except Exception as exc:
        # ONNX's data propagation fails inside If branches that read an outer-scope tensor ("Data for input 0 already
        # exists": Optimum's merged decoders); strict inference without it still checks every shape and type
        if not (any(n.op_type == "If" for n in model.graph.node) and "already exists" in str(exc)):
            failures.append(f"shape inference: {first_line(exc)}")
        else:
            try:
                _infer_shapes(model, path, large, data_prop=False)
            except Exception as again:
                failures.append(f"shape inference: {first_line(again)}")
    return model, failures


def _infer_shapes(model: Any, path: Path, large: bool, *, data_prop: bool) -> None:
    import onnx

    if large:
        with tempfile.TemporaryDirectory() as tmp:
            onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), check_type=True,
                                                   strict_mode=True, data_prop=data_prop)
    else:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=data_prop)


def _ort_ops_as_contrib(model: Any) -> Any:
    """onnx.checker skips the nodes of a domain it does not know (``com.microsoft``: ONNX Runtime's contrib ops, which
    ONNX Runtime checks when it loads the file) but fails on the few contrib ops ONNX Runtime registers in the ONNX
    domain itself (SimplifiedLayerNormalization, which its transformer optimizer writes). ``model`` with those nodes,
    known to ONNX Runtime and not to ONNX, in the contrib domain: the checker treats them as every other contrib op
    and still checks the rest of the graph; an op neither knows still fails."""
    import onnx
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    unknown = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)}
    ort_only = unknown & {s.name for s in get_all_operator_schema() if s.domain in ("", "ai.onnx")} if unknown else set()
    if not ort_only:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for n in copy.graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type in ort_only:
            n.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in copy.opset_import):
        copy.opset_import.add(domain="com.microsoft", version=1)
    return copy


def parity_spec(spec: IOSpec, reference: Reference, batch: int, sample: Mapping[str, np.ndarray] | None = None,
                log: Callable[[str], None] | None = None) -> IOSpec:
    """The spec parity runs on: integer inputs of unknown range drawn from the span of ``sample``'s values
    (:meth:`IOSpec.with_sample_ranges`), and every bound dim that declares no second value (``parity_values``) given
    the first of :meth:`IOSpec.parity_candidates` the source (``reference``) runs at, at ``batch`` with the dims
    settled before it varied too. A dim the source runs at no candidate is not varied: its second value is its
    binding, the reason goes to ``parity_notes`` and ``log``. A shape where the source fails says nothing of the
    conversion; one where it runs and the converted file does not is a defect that parity reports. The spec as it
    is when every dim has its value, or when the source does not run at its own bindings (parity says so)."""
    spec = spec.with_sample_ranges(sample)
    pending = [d for d in spec.dims if d not in spec.parity_values]
    if not pending:
        return spec

    def runs(dims: dict[str, int]) -> bool:
        feed = spec.random_feed(batch, seed=1234 + batch, dims=dims)
        try:
            reference(feed)
        except Exception:
            return False
        return True

    if not runs(spec.dims):
        return spec
    values, notes = dict(spec.parity_values), dict(spec.parity_notes)
    for d in pending:
        varied = {k: v for k, v in values.items() if k in spec.dims}
        tried: list[int] = []
        for value in spec.parity_candidates(d):
            if runs({**spec.dims, **varied, d: value}):
                values[d] = value
                break
            tried.append(value)
        else:
            values[d] = spec.dims[d]
            listed = ", ".join(map(str, tried[:-1])) + (" or " if len(tried) > 1 else "") + str(tried[-1])
            notes[d] = f"{d} not varied: the source does not run at {d}={listed}"
            if log is not None:
                log(f"parity: {notes[d]}")
    return spec.model_copy(update={"parity_values": values, "parity_notes": notes})


def sample_feed(spec: IOSpec, sample: Mapping[str, np.ndarray], batch: int,
                dims: Mapping[str, int]) -> dict[str, np.ndarray] | None:
    """``sample``'s values as the feed at ``batch`` and ``dims`` (rows repeated or cut to the batch where it is
    dynamic); None when they do not have that shape (e.g. --input-shape bound other values)."""
    shapes = spec.input_shapes(batch, dims)
    feed: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        if t.name not in sample:
            return None
        arr = np.asarray(sample[t.name]).astype(np.float32 if t.dtype == "bfloat16" else t.dtype, copy=False)
        if spec.dynamic_batch and arr.ndim and 0 < arr.shape[0] != batch:
            arr = np.concatenate([arr] * -(-batch // arr.shape[0]))[:batch]
        if arr.shape != shapes[t.name]:
            return None
        feed[t.name] = np.ascontiguousarray(arr)
    return feed


def validate_onnx(path: Path, spec: IOSpec, reference: Reference | None, *, batches: Sequence[int] = (1, 2),
                  tol: Tolerance | None = None, what: str | None = None,
                  sample: Mapping[str, np.ndarray] | None = None) -> ArtifactMetrics:
    """Run every check on ``path``; return the checker, shape inference and parity results (merge them into
    an artifact's metrics with ``ArtifactMetrics.update``); raise one ValidationError on any failure.

    Parity runs at every batch of ``batches`` at the dims' bindings, then with every dim the source runs at another
    value at that value (:func:`parity_spec`). With ``sample`` (``--sample-inputs``, a factory's example inputs),
    the first point runs on its values, not random ones, where they have its shape."""
    tol = tol or Tolerance.fp32()
    _, failures = structural_checks(path)
    metrics = ArtifactMetrics(checker="failed" if any(f.startswith("onnx.checker") for f in failures) else "ok",
                              shape_inference="failed" if any(f.startswith("shape") for f in failures) else "ok",
                              parity={})
    if reference is not None:
        try:
            sess = ort_session(path)
        except InputError as exc:
            failures.append(str(exc))
            batches = ()
        if batches:
            spec = parity_spec(spec, reference, batches[0], sample)
        for i, dims in enumerate(spec.parity_dims()):  # the bound values, then the dims the source runs at another
            varied = [(d, v) for d, v in dims.items() if i and v != spec.dims.get(d)]
            for j, batch in enumerate(batches):
                key = f"batch_{batch}" + "".join(f"_{d}_{v}" for d, v in varied)
                where = ", ".join([f"batch {batch}", *(f"{d}={v}" for d, v in varied)])
                feed = sample_feed(spec, sample, batch, dims) if sample and not i and not j else None
                failures += _parity_at(sess, spec, reference, (batch, dims), key,
                                       where + (" (the sample inputs)" if feed is not None else ""), tol, metrics,
                                       feed=feed)
    if failures:
        raise ValidationError(f"validation of {what or path.name}", failures)
    return metrics


def _parity_at(sess: Any, spec: IOSpec, reference: Reference, at: tuple[int, dict[str, int]], key: str, where: str,
               tol: Tolerance, metrics: ArtifactMetrics, feed: dict[str, np.ndarray] | None = None) -> list[str]:
    """Parity of every output, by name, on one seeded random feed (or ``feed``); the failures, each naming where.

    An output whose reference is constant over the feed or all zeros (``core.metrics.constant_reference``) is
    "not measurable": its values are still held to the tolerance, its cosine is not read (it is no perfect match)
    and the record lists it (``ParityStats.not_measurable``); when every output is, parity fails in one line
    rather than pass on zeros against zeros. NaN or inf where the reference has the same (asin of 2, the square
    root of a negative: an input outside the function's domain) is a match, the finite elements are compared; NaN
    or inf on one side only is a failure."""
    batch, dims = at
    if feed is None:
        feed = spec.random_feed(batch, seed=1234 + batch, dims=dims)
    try:
        got = list(sess.run(None, feed, _quiet_run()))
    except Exception as exc:
        return [f"ONNX Runtime run at {where}: {first_line(exc)}"]
    try:
        ref = reference(feed)
    except Exception as exc:
        return [f"parity at {where}: the source model does not run here, nothing to compare with: {first_line(exc)}"]
    if len(got) != len(ref):
        return [f"parity at {where}: {len(got)} outputs, the reference has {len(ref)}"]
    names = spec.output_names if len(spec.output_names) == len(got) else [f"output {i}" for i in range(len(got))]
    stats = compare_outputs(got, ref, names, samples=batch)
    metrics.parity[key] = stats
    failures: list[str] = []
    if ref and len(stats.not_measurable) == len(ref):  # nothing varies: zeros matching zeros is no pass
        line = not_measurable_line(stats, batch, "random input" if batch == 1 else "random inputs", "parity",
                                   "the reference")
        failures.append(f"parity at {where}: {line}")
    for name, g, r in zip(names, got, ref, strict=True):
        one = stats.per_output[name]
        if np.shape(g) != np.shape(r):
            failures.append(f"parity at {where}: {name}: shape {list(np.shape(g))}, the reference's "
                            f"{list(np.shape(r))}")
            continue
        g64, r64 = np.asarray(g, np.float64), np.asarray(r, np.float64)
        failures += [f"parity at {where}: {name}: {line}" for line in nonfinite_mismatches(g64, r64)]
        both = np.isfinite(g64) & np.isfinite(r64)
        g64, r64 = g64[both], r64[both]
        scale = max(1.0, float(np.abs(r64).max(initial=0.0)))
        if not np.allclose(g64, r64, atol=tol.atol * scale, rtol=tol.rtol):
            failures.append(f"parity at {where}: {name}: max abs err {float(np.abs(g64 - r64).max()):.3g} exceeds "
                            f"atol {tol.atol:g} x {scale:.3g} (the output's largest value) + rtol {tol.rtol:g}")
        if one.not_measurable is None and one.cosine < tol.min_cosine:  # a constant one: recorded in not_measurable
            failures.append(f"parity at {where}: {name}: cosine {one.cosine:.6f} < {tol.min_cosine}")
    return failures


def nonfinite_mismatches(got: np.ndarray, ref: np.ndarray) -> list[str]:
    """Where NaN/inf differ between an output and its reference of the same shape, one line per kind (none when
    every NaN and inf of one is the same NaN or inf, at the same place, in the other)."""
    gf, rf = np.isfinite(got), np.isfinite(ref)
    with np.errstate(invalid="ignore"):
        differ = ~gf & ~rf & ~(np.isnan(got) & np.isnan(ref)) & (got != ref)
    counts = {"NaN or inf where the reference is finite": int((~gf & rf).sum()),
              "finite where the reference is NaN or inf": int((gf & ~rf).sum()),
              "NaN or inf other than the reference's": int(differ.sum())}
    return [f"{n} element(s) {what}" for what, n in counts.items() if n]
