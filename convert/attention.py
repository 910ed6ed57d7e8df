"""Does a graph have attention? The one rule the INT8 steps share, over an OpenVINO model or an ONNX graph.

Attention multiplies two activations (its scores ``Q @ K^T`` and its context ``softmax(scores) @ V``) where a CNN's
or an MLP's MatMuls all have a weight side, and it has a Softmax. A MatMul (or an Einsum, as torchvision's MaxViT
writes its attention) is counted when neither input is computed from constants alone (a weight, a weight through
Convert/Transpose/Reshape). Fused attention (ONNX Runtime's ``com.microsoft`` Attention, MultiHeadAttention,
GroupQueryAttention; OpenVINO's ScaledDotProductAttention) counts as both. NNCF's model type
(:mod:`convert.int8_nncf`) and the op types ONNX Runtime's static INT8 quantizes (:mod:`convert.ort_quant`) are
chosen by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Ops whose two inputs are multiplied: attention's scores and context when both are activations
PRODUCT_OPS = frozenset({"MatMul", "Einsum"})
#: Attention's normalisation
SOFTMAX_OPS = frozenset({"Softmax"})
#: Fused attention, attention by itself: ONNX Runtime's contrib ops, OpenVINO's ScaledDotProductAttention
FUSED_ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "ScaledDotProductAttention"})
#: Ops that produce a value at run time though no input is an activation (OpenVINO's state reads)
RUNTIME_SOURCES = frozenset({"Parameter", "ReadValue"})


@dataclass(frozen=True)
class AttentionCount:
    matmuls: int  # MatMul/Einsum of two activations
    softmax: int  # Softmax (or fused attention)

    @property
    def found(self) -> bool:
        return bool(self.matmuls and self.softmax)

    def describe(self) -> str:
        return f"({self.matmuls} MatMul/Einsum of two activations, {self.softmax} Softmax)"


def count_attention(ops: Iterable[tuple[str, list[str], list[str]]], constants: Iterable[str] = ()) -> AttentionCount:
    """Count over ``ops``, each (op type, input names, output names) in topological order; ``constants`` names the
    values known constant before the first op (an ONNX file's initializers). An op's outputs are constant when it
    is a Constant, or has inputs and all of them are constant."""
    constant = set(constants)
    matmuls = softmax = 0
    for kind, inputs, outputs in ops:
        sources = [i for i in inputs if i]
        if kind == "Constant" or (sources and kind not in RUNTIME_SOURCES and all(s in constant for s in sources)):
            constant.update(outputs)
        fused = kind in FUSED_ATTENTION_OPS
        if fused or (kind in PRODUCT_OPS and len(sources) >= 2 and not any(s in constant for s in sources)):
            matmuls += 1
        softmax += kind in SOFTMAX_OPS or fused
    return AttentionCount(matmuls, softmax)


def ov_attention(model: Any) -> AttentionCount:
    """:func:`count_attention` over an ``openvino.Model`` (an op's one name stands for all its outputs)."""
    return count_attention((op.get_type_name(), [i.get_source_output().get_node().get_name() for i in op.inputs()],
                            [op.get_name()]) for op in model.get_ordered_ops())


def onnx_attention(graph: Any) -> AttentionCount:
    """:func:`count_attention` over an ONNX model's main graph (an ``onnx.GraphProto``)."""
    return count_attention(((n.op_type, list(n.input), list(n.output)) for n in graph.node),
                           constants=[t.name for t in graph.initializer])
