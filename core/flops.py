"""How much arithmetic a model does, and how much this machine can do: so a latency can be read as a fraction
of the hardware's limit.

``onnx_macs`` counts the multiply-accumulates of the ops that carry nearly all of a network's arithmetic
(Conv, ConvTranspose, MatMul, Gemm; their quantized forms too: QLinearConv, ConvInteger, MatMulInteger,
QLinearMatMul, QGemm, and Conv/MatMul/Gemm between QuantizeLinear/DequantizeLinear) from the ONNX graph with every
input shape fixed, via ONNX shape inference (ONNX Runtime's symbolic shape inference where contrib ops hide
shapes). ``matmul_peak_gflops`` measures this machine's dense FP32 matrix-multiply rate: the best of several large
GEMMs by each library a model may run on (PyTorch, ONNX Runtime, OpenVINO), with the thread count the benchmark
uses; ``int8_matmul_peaks`` measures the INT8 rate the same way (``measured_peaks``: one ``Peak`` per precision).
A row is read against the peak of its own precision only: an INT8 model against the FP32 rate reads as 300-700%.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from core.manifest import Manifest

_CONV = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "FusedConv"}
_MATMUL = {"MatMul", "QLinearMatMul", "MatMulInteger", "FusedMatMul", "Gemm", "FusedGemm", "QGemm",
           "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"}
_GEMM = {"Gemm", "FusedGemm", "QGemm"}
_ARITHMETIC = ("Conv", "MatMul", "Gemm", "Attention")  # an op named so and not counted above: its MACs are unknown


def _dims(value_info: Any) -> list[int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]
    return None if not dims or min(dims) < 1 else dims


def onnx_macs(path: Path, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Multiply-accumulates of one run of the model at these input shapes; None when shapes cannot be inferred.
    A lower bound where some op's arithmetic is unknown (``count_macs`` says which)."""
    return count_macs(path, shapes).macs


@dataclass(frozen=True)
class MacCount:
    """A file's multiply-accumulates at some input shapes, and what the count leaves out."""

    macs: int | None
    uncounted: tuple[str, ...] = ()  # op types with arithmetic not in ``macs``: no inferable shape, or not countable
    unshaped: int = 0  # how many Conv/MatMul-like ops had no output shape

    @property
    def complete(self) -> bool:
        return self.macs is not None and not self.uncounted


def count_macs(path: Path, shapes: Mapping[str, Sequence[int]]) -> MacCount:
    """Multiply-accumulates of one run of the model file at these input shapes, counted on that file's own ops.

    ONNX shape inference loses a dim where a size-1 dim broadcasts against one it cannot infer (a batch-1 input
    added to a position table gathered by ids it cannot follow, as in Hugging Face BERT: the sum's batch becomes
    unknown, and so does every MatMul after it). So when some op's shape is unknown at batch 1, the count is made at
    batch 2 and halved: one call's arithmetic is proportional to its batch. ONNX's inference knows no contrib op
    (a QOperator INT8 graph's QLinearAdd: every QLinearConv after it has no shape), so where ops stay unknown ONNX
    Runtime's symbolic shape inference, which knows them, counts instead (not where sizes come from the data:
    :data:`DATA_DEPENDENT`)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    best = _count_macs(model, shapes)
    if best.uncounted and shapes and all(len(s) and s[0] == 1 for s in shapes.values()):
        doubled = _count_macs(model, {n: [2, *s[1:]] for n, s in shapes.items()})
        if doubled.unshaped < best.unshaped:
            best = MacCount(None if doubled.macs is None else doubled.macs // 2 or None, doubled.uncounted,
                            doubled.unshaped)
    if best.unshaped and not {n.op_type for n in model.graph.node} & DATA_DEPENDENT:
        symbolic = _count_macs(model, shapes, symbolic=True)
        if symbolic.unshaped < best.unshaped:
            best = symbolic
    return best


#: Ops whose output sizes come from the data (a detector's NMS, a Loop's trip count): ONNX Runtime's symbolic shape
#: inference turns them into sympy expressions it simplifies for many minutes (fasterrcnn_mobilenet_v3_large_320_fpn:
#: past 17 minutes of bench's preparation), and cannot size them anyway; such a graph's count is ONNX's, a lower bound
DATA_DEPENDENT = {"NonMaxSuppression", "NonZero", "Loop", "Scan"}


@dataclass(frozen=True)
class VariantMacs:
    """One artifact's multiply-accumulates per call at each measured point, and where they were not counted on its
    own file, why."""

    per_point: list[int | None]
    note: str | None = None
    lower_bound: bool = False  # some arithmetic is not in ``per_point`` and no complete count stood in


def variant_macs(manifest: Manifest, base: Path, names: Iterable[str],
                 shapes: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, VariantMacs]:
    """Each artifact's MACs at each point's input shapes, counted on its own ONNX file: a pruned, sparsified or
    distilled variant does its own arithmetic, not the FP32 export's. Where the own count is incomplete (contrib ops
    whose shapes no inference finds, or arithmetic not counted: a fused Attention), the nearest ancestor ONNX
    (``parent``, then ``fp32``, then the export's graph rewrites ``opt`` and ``fused``, which do its arithmetic: a
    torchvision ViT's export loses the attention MatMuls' shapes that onnxslim's ``opt`` keeps) counted completely
    stands in, with a note. An artifact that is no ONNX file
    (PyTorch weights, a TensorRT plan) takes its nearest ONNX ancestor's count, else the FP32 ONNX's: the same
    model, so no note."""
    counted: dict[str, list[MacCount]] = {}

    def count(name: str) -> list[MacCount]:
        if name not in counted:
            path = Path(base) / manifest.artifacts[name].file.path
            counted[name] = [count_macs(path, s) for s in shapes]
        return counted[name]

    from core.records import FusionParams, OptimizeParams

    # the FP32 export's graph rewrites: the same arithmetic as the export
    rewrites = [n for n, a in manifest.artifacts.items()
                if a.parent == "fp32" and isinstance(a.params, OptimizeParams | FusionParams)]
    out = {}
    for name in names:
        chain = []
        at: str | None = name
        while at is not None and at in manifest.artifacts and at not in chain:
            chain.append(at)
            at = manifest.artifacts[at].parent
        onnx_chain = [a for a in [*chain, "fp32", *rewrites] if a in manifest.artifacts
                      and manifest.artifacts[a].kind == "onnx"]
        own = manifest.artifacts[name].kind == "onnx"
        stand_in = next((a for a in dict.fromkeys(onnx_chain) if all(c.complete for c in count(a))), None)
        if stand_in is None:  # nothing complete: the own file's (or the nearest ONNX's) count is a lower bound
            first = onnx_chain[0] if onnx_chain else None
            counts = count(first) if first else [MacCount(None)] * len(shapes)
            left_out = sorted({op for c in counts for op in c.uncounted})
            out[name] = VariantMacs([c.macs for c in counts], f"GFLOP a lower bound: {', '.join(left_out)} not "
                                                              "counted (no inferable shape, or arithmetic core.flops "
                                                              "does not count)" if left_out else None,
                                      lower_bound=bool(left_out))
            continue
        note = None
        if own and stand_in != name:
            left_out = sorted({op for c in count(name) for op in c.uncounted})
            note = (f"GFLOP counted on {stand_in}'s file ({manifest.artifacts[stand_in].file.path}): this file's "
                    f"{', '.join(left_out)} ops are not countable here (no inferable shape, or arithmetic core.flops "
                    "does not count)")
        out[name] = VariantMacs([c.macs for c in count(stand_in)], note)
    return out


def _fixed(model: Any, shapes: Mapping[str, Sequence[int]]) -> Any:
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name], strict=False):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    return fixed


def _infer(model: Any, symbolic: bool) -> Any:
    import onnx

    if not symbolic:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    import contextlib
    import io
    import logging

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from core.fsutil import scratch_cwd

    quiet = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        with contextlib.redirect_stdout(io.StringIO()), scratch_cwd():  # its failure writes files into the cwd
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    finally:
        quiet.setLevel(level)


def _count_macs(model: Any, shapes: Mapping[str, Sequence[int]], symbolic: bool = False) -> MacCount:
    """The multiply-accumulates, and the arithmetic ops left out: those with an output shape inference could not
    find, and those (by name: Conv, MatMul, Gemm, Attention) whose arithmetic ``_node_macs`` does not count."""
    try:
        inferred = _infer(_fixed(model, shapes), symbolic)
    except Exception:
        inferred = None
    if inferred is None:
        return MacCount(None, ("shape inference failed",), len(model.graph.node) + 1)
    known = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    known.update({t.name: list(t.dims) for t in model.graph.initializer})
    counts = [(n.op_type, _node_macs(n, known)) for n in inferred.graph.node]
    unshaped = [op for op, m in counts if m is None]
    opaque = [op for op, _ in counts if op not in _CONV | _MATMUL and any(w in op for w in _ARITHMETIC)]
    total = sum(m or 0 for _, m in counts)
    return MacCount(total or None, tuple(sorted({*unshaped, *opaque})), len(unshaped))


def _node_macs(node: Any, known: Mapping[str, list[int] | None]) -> int | None:
    """The op's multiply-accumulates; None for a counted op whose shapes are unknown; 0 for any other op."""
    if node.op_type not in _CONV | _MATMUL:
        return 0
    if node.op_type in _GEMM:  # from its operands: a QGemm's output has no shape either inference can find
        a, b = known.get(node.input[0]), known.get(node.input[3 if node.op_type == "QGemm" else 1])
        if not a or not b or len(a) != 2 or len(b) != 2:
            return None
        trans_a, trans_b = (any(at.name == t and at.i for at in node.attribute) for t in ("transA", "transB"))
        return a[not trans_a] * a[trans_a] * b[not trans_b]  # M x K x N
    out = known.get(node.output[0]) if node.output else None
    if out is None:
        return None
    if node.op_type in _CONV:
        w = known.get(node.input[3 if node.op_type == "QLinearConv" else 1])
        if not w or len(w) < 3:
            return None
        if node.op_type == "ConvTranspose":  # weights [Cin, Cout/group, k...]: each input element x w[1:]
            x = known.get(node.input[0])
            return int(np.prod(x)) * int(np.prod(w[1:])) if x else None
        return int(np.prod(out)) * int(np.prod(w[1:]))  # weights [Cout, Cin/group, k...] per output element
    a = known.get(node.input[0])
    return int(np.prod(out)) * a[-1] if a else None  # [..., M, K] x [..., K, N]: K per output element


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


#: our compute precision -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def openvino_config(hint: str, threads: int | None, precision: str = "fp32") -> dict[str, Any]:
    """OpenVINO CPU compile settings: the performance hint, the thread count, and the compute precision (f32 unless
    a row asks for bf16/fp16). OpenVINO's CPU plugin computes an FP32 model in bf16 by default where the CPU has bf16
    units (AMX): an "fp32" row would be bf16 (about 2x the GEMM rate, 3e-3 relative error:
    benchmarks/run_openvino_precision.py on a Xeon with AMX), so f32 is pinned, and bf16 is a row of its own."""
    return {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision]} | (
        {"INFERENCE_NUM_THREADS": threads} if threads else {})


def _openvino_matmul(n: int, threads: int | None) -> Callable[[dict[str, Any]], object] | None:
    return _openvino_run(_matmul_model(n), threads)


def _openvino_run(model: Any, threads: int | None, precision: str = "fp32") -> Callable[[dict[str, Any]], object] | None:
    """``model`` (ONNX) compiled by OpenVINO for the CPU with bench's settings, computing in ``precision``; None when
    OpenVINO is absent, or computes in another precision (its CPU plugin falls back to f32 without bf16/f16 units)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    import tempfile

    import onnx

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        onnx.save(model, str(path))
        config = openvino_config("LATENCY", threads, precision)
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        if compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() != OPENVINO_PRECISIONS[precision]:
            return None
        request = compiled.create_infer_request()
    return lambda feed: request.infer(feed)


#: the INT8 GEMM kernels ``int8_matmul_peaks`` measures: how ONNX Runtime and OpenVINO run an INT8 model's
#: products (u8 activations; s8 weights as convert writes them by default, u8 weights as its u8u8 layouts do)
INT8_KERNELS = ("onnxruntime MatMulInteger u8s8", "onnxruntime MatMulInteger u8u8", "onnxruntime QDQ MatMul u8s8",
                "openvino QDQ MatMul u8s8")


@functools.cache
def int8_matmul_peaks(threads: int | None = None, n: int = 1024, repeats: int = 16) -> dict[str, float]:
    """GOP/s (2 x multiply-accumulates per second) of an n x n INT8 product, the best of ``repeats``, by each kernel
    of INT8_KERNELS that is installed; measured as ``matmul_peaks`` measures FP32 (same size, repeats, threads, and
    once per process). The weights are the graph's constants, as an INT8 model's are (its runtime packs them once
    at load). ONNX Runtime's QDQ MatMul is fused at load into its INT8 kernels and OpenVINO's into an u8 x i8
    FullyConnected; both include quantizing the n x n input (n^2 against n^3: under 0.5% at n = 1024)."""
    return {name: _best_gflops(call, n, repeats) for name in INT8_KERNELS
            if (call := int8_matmul_call(name, n, threads)) is not None}


def int8_matmul_call(kernel: str, n: int = 1024, threads: int | None = None,
                     operands: tuple[np.ndarray, np.ndarray] | None = None) -> Callable[[], object] | None:
    """One n x n INT8 product by ``kernel`` (one of INT8_KERNELS) as a call to time; None when its library is not
    installed. ``operands``: (A as uint8, B as int8 or uint8 per the kernel's name; default: random ones). The QDQ
    kernels take A as float and quantize it with scale 1 and zero point 0, so whole numbers 0..255 stay exact, and
    return A @ B in float."""
    library, form, types = kernel.split(" ", 1)[0], kernel.split()[1], kernel.split()[-1]
    weight_dtype = np.uint8 if types == "u8u8" else np.int8
    rng = np.random.default_rng(0)
    a, b = operands if operands is not None else (
        rng.integers(0, 256, (n, n)).astype(np.uint8),
        rng.integers(np.iinfo(weight_dtype).min, np.iinfo(weight_dtype).max + 1, (n, n)).astype(weight_dtype))
    model = _int8_matmul_model(np.asarray(b, weight_dtype), qdq=form == "QDQ")
    feed = {"A": a.astype(np.float32) if form == "QDQ" else a.astype(np.uint8)}
    if library == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or 0
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return functools.partial(sess.run, None, feed)
    run = _openvino_run(model, threads)
    return None if run is None else functools.partial(run, feed)


def _int8_matmul_model(b: np.ndarray, qdq: bool) -> Any:
    """A [n, n] x the constant B: MatMulInteger (u8 A), or float A through QuantizeLinear/DequantizeLinear (u8, scale
    1) times B through DequantizeLinear (the QDQ form convert writes)."""
    from onnx import TensorProto, helper, numpy_helper

    n, m = b.shape
    consts = [numpy_helper.from_array(b, "B")]
    if qdq:
        consts += [numpy_helper.from_array(np.array(1.0, np.float32), "scale"),
                   numpy_helper.from_array(np.array(0, np.uint8), "a_zero"),
                   numpy_helper.from_array(np.array(0, b.dtype), "b_zero")]
        nodes = [helper.make_node("QuantizeLinear", ["A", "scale", "a_zero"], ["Aq"]),
                 helper.make_node("DequantizeLinear", ["Aq", "scale", "a_zero"], ["Ad"]),
                 helper.make_node("DequantizeLinear", ["B", "scale", "b_zero"], ["Bd"]),
                 helper.make_node("MatMul", ["Ad", "Bd"], ["C"])]
        io = (TensorProto.FLOAT, TensorProto.FLOAT)
    else:
        nodes, io = [helper.make_node("MatMulInteger", ["A", "B"], ["C"])], (TensorProto.UINT8, TensorProto.INT32)
    graph = helper.make_graph(nodes, "int8_matmul", [helper.make_tensor_value_info("A", io[0], [None, n])],
                              [helper.make_tensor_value_info("C", io[1], [None, m])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


#: the reduced float precisions ``reduced_matmul_peaks`` measures -> PyTorch's dtype name
REDUCED_FLOATS = {"bf16": "bfloat16", "fp16": "float16"}


@functools.cache
def reduced_matmul_peaks(precision: str, threads: int | None = None, n: int = 1024,
                         repeats: int = 16) -> dict[str, float]:
    """GFLOP/s of an n x n product computed in ``precision`` (bf16 or fp16), the best of ``repeats``, by PyTorch
    (``torch.mm`` on tensors of that dtype: oneDNN's AMX/AVX512 kernels) and OpenVINO (the FP32 MatMul compiled with
    that INFERENCE_PRECISION_HINT, left out where OpenVINO falls back to f32); measured once per process, as FP32's.
    Asked for only where a bf16/fp16 row was measured, i.e. on a CPU with units for it (``calibration.cpu``): on one
    without, PyTorch emulates the precision and the rate is the emulation's."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dtype = getattr(torch, REDUCED_FLOATS[precision])
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = {"torch": _best_gflops(functools.partial(torch.mm, a, b), n, repeats)}
        if (run := _openvino_run(_matmul_model(n), threads, precision)) is not None:
            feed = {"A": np.random.default_rng(0).standard_normal((n, n), np.float32),
                    "B": np.random.default_rng(1).standard_normal((n, n), np.float32)}
            out["openvino"] = _best_gflops(functools.partial(run, feed), n, repeats)
        return out
    finally:
        torch.set_num_threads(before)


#: precision -> the measurement of its matrix-multiply peak by library/kernel (G(FL)OP/s); a precision not here
#: (mixed, int4) has no peak measured on a CPU, and its rows no fraction
PEAK_MEASURES: dict[str, Callable[[int | None], dict[str, float]]] = {
    "fp32": matmul_peaks, "int8": int8_matmul_peaks,
    "bf16": functools.partial(reduced_matmul_peaks, "bf16"), "fp16": functools.partial(reduced_matmul_peaks, "fp16")}


@dataclass(frozen=True)
class Peak:
    """The matrix-multiply peak of one precision on this machine: the fastest library's rate."""

    precision: str
    library: str
    rate: float  # GFLOP/s (floats) or GOP/s (integers): 2 x multiply-accumulates per second, / 1e9

    @property
    def unit(self) -> str:
        return "GOP/s" if self.precision.startswith(("int", "uint")) else "GFLOP/s"

    @property
    def basis(self) -> str:
        """What a row's fraction is divided by, e.g. 'int8 GEMM (onnxruntime QDQ MatMul u8s8) 205 GOP/s'."""
        return f"{self.precision} GEMM ({self.library}) {self.rate:.0f} {self.unit}"


def measured_peaks(threads: int | None = None, precisions: Iterable[str] | None = None) -> dict[str, Peak]:
    """The peak of each of ``precisions`` that has a measurement (PEAK_MEASURES; default: all), the fastest of its
    libraries; each measured once per process and thread count."""
    out = {}
    for precision, measure in PEAK_MEASURES.items():
        if precisions is not None and precision not in precisions:
            continue
        if rates := measure(threads):
            library = max(rates, key=lambda k: rates[k])
            out[precision] = Peak(precision, library, rates[library])
    return out


def row_peak(precision: str, peaks: Mapping[str, Peak], where: str = "this CPU") -> tuple[Peak | None, str]:
    """The peak a row of ``precision`` is read against (only its own precision's, never FP32's for an INT8 row), and
    its basis; without one: None, and why."""
    peak = peaks.get(precision)
    return (peak, peak.basis) if peak is not None else (None, f"no {precision} peak measured on {where}")


def peak_fraction(macs: int | None, p50_ms: float, peak_gflops: float | None) -> tuple[float | None, float | None]:
    """(GFLOP per call, achieved fraction of the matrix-multiply peak) for a call of ``macs`` taking ``p50_ms``."""
    if not macs or p50_ms <= 0:
        return None, None
    gflop = 2 * macs / 1e9
    return gflop, (gflop / (p50_ms / 1e3) / peak_gflops if peak_gflops else None)
