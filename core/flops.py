"""How much arithmetic a model does, and how much this machine can do: so a latency can be read as a fraction
of the hardware's limit.

``onnx_macs`` counts the multiply-accumulates of the ops that carry nearly all of a network's arithmetic
(Conv, ConvTranspose, MatMul, Gemm; Q/DQ variants of them too) from the ONNX graph with every input shape
fixed, via ONNX shape inference. ``matmul_peak_gflops`` measures this machine's dense FP32 matrix-multiply
rate: the best of several large GEMMs by each library a model may run on (PyTorch, ONNX Runtime, OpenVINO), with
the thread count the benchmark uses.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_CONV = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}
_MATMUL = {"MatMul", "QLinearMatMul", "MatMulInteger", "FusedMatMul", "Gemm"}


def _dims(value_info: Any) -> list[int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]
    return None if not dims or min(dims) < 1 else dims


def onnx_macs(path: Path, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Multiply-accumulates of one run of the model at these input shapes; None when shapes cannot be inferred.

    ONNX shape inference loses a dim where a size-1 dim broadcasts against one it cannot infer (a batch-1 input
    added to a position table gathered by ids it cannot follow, as in Hugging Face BERT: the sum's batch becomes
    unknown, and so does every MatMul after it). So when some op's shape is unknown at batch 1, the count is made at
    batch 2 and halved: one call's arithmetic is proportional to its batch."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total, unknown = _count_macs(model, shapes)
    if unknown and shapes and all(len(s) and s[0] == 1 for s in shapes.values()):
        doubled, still_unknown = _count_macs(model, {n: [2, *s[1:]] for n, s in shapes.items()})
        if not still_unknown:
            return doubled // 2 or None
    return total or None


def _count_macs(model: Any, shapes: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """(multiply-accumulates, how many Conv/MatMul-like ops had an output shape inference could not find)."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name], strict=False):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:
        return 0, 0
    known = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    known.update({t.name: list(t.dims) for t in model.graph.initializer})
    mac_ops = [n for n in inferred.graph.node if n.op_type in _CONV | _MATMUL]
    return (sum(_node_macs(n, known) for n in inferred.graph.node),
            sum(1 for n in mac_ops if n.output and known.get(n.output[0]) is None))


def _node_macs(node: Any, known: Mapping[str, list[int] | None]) -> int:
    out = known.get(node.output[0]) if node.output else None
    if out is None:
        return 0
    if node.op_type in _CONV:
        w = known.get(node.input[3 if node.op_type == "QLinearConv" else 1])
        if not w or len(w) < 3:
            return 0
        if node.op_type == "ConvTranspose":  # weights [Cin, Cout/group, k...]: each input element x w[1:]
            x = known.get(node.input[0])
            return int(np.prod(x)) * int(np.prod(w[1:])) if x else 0
        return int(np.prod(out)) * int(np.prod(w[1:]))  # weights [Cout, Cin/group, k...] per output element
    if node.op_type in _MATMUL:
        a = known.get(node.input[0])
        if not a:
            return 0
        transposed = node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute)
        k = a[0] if transposed else a[-1]
        return int(np.prod(out)) * k
    return 0


def matmul_peak_gflops(threads: int | None = None) -> float:
    """This machine's dense FP32 matrix-multiply peak in GFLOP/s: the fastest of the GEMM libraries the toolkit
    runs (``matmul_peaks``, measured once per process and thread count)."""
    return max(matmul_peaks(threads).values())


@functools.cache
def matmul_peaks(threads: int | None = None, n: int = 1024, repeats: int = 16) -> dict[str, float]:
    """GFLOP/s of an n x n FP32 product, the best of ``repeats``, by each library a model may run on: PyTorch's
    BLAS, ONNX Runtime's MLAS, OpenVINO's oneDNN (when installed). They differ by far on one CPU (MKL on an AMD
    CPU: often half of oneDNN's rate), so a peak taken from one library alone is beaten by models run on another
    (an FP32 transformer on OpenVINO at 166% of PyTorch's GEMM rate)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return {name: _best_gflops(call, n, repeats) for name in MATMUL_LIBRARIES
                if (call := matmul_call(name, n, threads)) is not None}
    finally:
        torch.set_num_threads(before)


#: the GEMM libraries ``matmul_peaks`` measures
MATMUL_LIBRARIES = ("torch", "onnxruntime", "openvino")


def matmul_call(library: str, n: int = 1024, threads: int | None = None,
                operands: tuple[np.ndarray, np.ndarray] | None = None) -> Callable[[], object] | None:
    """One n x n FP32 product by ``library`` (one of MATMUL_LIBRARIES) on ``operands`` (default: random ones), as a
    call to time; None when the library is not installed. ``threads``: ONNX Runtime's and OpenVINO's; PyTorch's
    product runs on the process's torch thread count. Timed side by side with a model's calls, its rate is the
    machine's GEMM peak at that moment (a shared CPU's speed drifts: a peak from minutes earlier is not).
    OpenVINO computes it in f32 (``openvino_config``): its default on CPUs with AMX is bf16, about 2x the rate."""
    import torch

    a, b = (torch.randn(n, n), torch.randn(n, n)) if operands is None else (torch.from_numpy(x) for x in operands)
    if library == "torch":
        return functools.partial(torch.mm, a, b)
    run = {"onnxruntime": _ort_matmul, "openvino": _openvino_matmul}[library](n, threads)
    return None if run is None else functools.partial(run, {"A": a.numpy(), "B": b.numpy()})


def _best_gflops(call: Callable[[], object], n: int, repeats: int) -> float:
    call()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _matmul_model(n: int) -> Any:
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", io[:2], io[2:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _ort_matmul(n: int, threads: int | None) -> Callable[[dict[str, Any]], object]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    sess = ort.InferenceSession(_matmul_model(n).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda feed: sess.run(None, feed)


def openvino_config(hint: str, threads: int | None) -> dict[str, Any]:
    """OpenVINO CPU compile settings: the performance hint, the thread count, and f32 compute. OpenVINO's CPU
    plugin computes an FP32 model in bf16 by default where the CPU has bf16 units (AMX): an "fp32" row would be
    bf16 (about 2x the GEMM rate, 3e-3 relative error: benchmarks/run_openvino_precision.py on a Xeon with AMX), so
    f32 is pinned."""
    return {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"} | (
        {"INFERENCE_NUM_THREADS": threads} if threads else {})


def _openvino_matmul(n: int, threads: int | None) -> Callable[[dict[str, Any]], object] | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    import tempfile

    import onnx

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        onnx.save(_matmul_model(n), str(path))
        config = openvino_config("LATENCY", threads)
        request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
    return lambda feed: request.infer(feed)


def peak_fraction(macs: int | None, p50_ms: float, peak_gflops: float | None) -> tuple[float | None, float | None]:
    """(GFLOP per call, achieved fraction of the matrix-multiply peak) for a call of ``macs`` taking ``p50_ms``."""
    if not macs or p50_ms <= 0:
        return None, None
    gflop = 2 * macs / 1e9
    return gflop, (gflop / (p50_ms / 1e3) / peak_gflops if peak_gflops else None)
