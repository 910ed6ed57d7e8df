"""INT8 Q/DQ for TensorRT (``int8_trt``): the explicit-quantization rules, and a check that a model follows them.

The same calibration ranges as the CPU variants give a Q/DQ model that follows TensorRT's rules:
signed symmetric INT8 activations and weights with zero point 0, per-channel weights, FP32 bias, the
full 8-bit range. TensorRT 11 removed implicit INT8 calibration, so that Q/DQ model is how an INT8
engine gets its scales on TensorRT 10 and 11.
"""

from __future__ import annotations

from pathlib import Path

from convert.config import CalibMethod, QuantConfig
from convert.ort_quant import ort_qtype, quantize_qdq

#: Op types whose inputs ``int8_trt`` quantizes: the weighted layers TensorRT runs in INT8, and Add so
#: that a residual add fuses into the preceding INT8 convolution.
TRT_QDQ_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


def trt_op_types(static_ops: list[str]) -> list[str]:
    """The op types ``int8_trt`` quantizes: ``TRT_QDQ_OP_TYPES`` among those static INT8 quantizes (``static_ops``,
    :func:`convert.ort_quant.static_op_types`: --int8-ops and --exclude-op-types). Where the graph has attention that
    leaves the Adds out: a ViT's residual Adds quantized cost torchvision's vit_b_16 19.8 points, without them 0.35
    (simulated Q/DQ, random init, the held-out photos; ``benchmarks/results/int8_ops_cpu.md``)."""
    return [t for t in TRT_QDQ_OP_TYPES if t in static_ops]


def quantize_trt_file(model: Path, out: Path, method: CalibMethod, cache: Path, cfg: QuantConfig,
                      fp32_nodes: list[str], op_types: list[str]) -> None:
    """Q/DQ by TensorRT's explicit-quantization rules, from the same saved ranges as the CPU variants.

    Signed INT8 with zero point 0 on both activations and weights (TensorRT's parser refuses any
    other zero point), FP32 bias (it refuses an INT32 DequantizeLinear and fuses the bias itself),
    the full 8-bit range (no reduce_range: that is a CPU workaround), inputs of ``op_types`` (:func:`trt_op_types`).
    """
    quantize_qdq(model, out, method, cache, fp32_nodes, cfg, "TensorRT Q/DQ quantization",
                 op_types_to_quantize=op_types, reduce_range=False, activation_type=ort_qtype("int8"),
                 weight_type=ort_qtype("int8"),
                 extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})


def trt_qdq_problems(model: Path) -> list[str]:
    """Why TensorRT's explicit quantization would refuse this Q/DQ model; [] when it follows the rules.

    Checked: every Quantize/DequantizeLinear has a positive scale and a signed INT8 zero point of 0,
    and no DequantizeLinear takes an INT32 tensor (ONNX Runtime's default quantized bias).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model), load_external_data=False).graph
    consts: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    found: dict[str, list[str]] = {}

    def note(kind: str, node: onnx.NodeProto) -> None:
        found.setdefault(kind, []).append(node.name or node.output[0])

    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in consts and \
                consts[node.input[0]].data_type == onnx.TensorProto.INT32:
            note("an INT32 input to DequantizeLinear (quantized bias; TensorRT needs FP32 bias)", node)
        scale = consts.get(node.input[1]) if len(node.input) > 1 else None
        if scale is not None and not bool(np.all(numpy_helper.to_array(scale) > 0)):
            note("a scale that is not positive", node)
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            continue
        if zp.data_type != onnx.TensorProto.INT8:
            note(f"a {onnx.TensorProto.DataType.Name(zp.data_type)} zero point (TensorRT needs signed INT8)", node)
        elif np.any(numpy_helper.to_array(zp) != 0):
            note("a non-zero zero point (TensorRT needs symmetric quantization)", node)
    return [f"{len(nodes)} Q/DQ node(s) with {kind}, e.g. {nodes[0]!r}" for kind, nodes in found.items()]
