"""The one place that decides whether a Conv/Gemm/MatMul (or com.microsoft Attention) has a
usable constant weight.

Quantization planners, weight-only quantization, SmoothQuant, pruning,
clustering, the fine-tuning bridge and the reports all ask ``weighted_nodes``;
none of them re-derives it. (Gemm's alpha/beta are folded into its constants
when the model is loaded, so no one handles them here either.)
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from lowbit.backends.onnx.graph import GraphIndex, attr, node_name
from lowbit.backends.onnx.registry import MS_DOMAIN, rule_for
from lowbit.backends.onnx.store import FloatModel

FLOAT = onnx.TensorProto.FLOAT
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# com.microsoft Attention: input (B, S, H) x weight (H, 3H), the Q/K/V projections in one
CONTRIB_WEIGHTED_OPS = ("Attention",)


@dataclass(frozen=True)
class WeightedNode:
    """A node with a constant float weight: names, and the weight's axes as stored."""

    name: str  # node name (``Op_i`` when the node has none)
    node: onnx.NodeProto
    weight: str  # initializer name
    bias: str | None  # constant bias initializer, if any
    out_axis: int  # the weight's output-channel axis: Conv 0, MatMul/Attention 1, Gemm 0/1
    in_axis: int  # the reduction (input-feature) axis of a 2-D weight; Conv: 1

    @property
    def op_type(self) -> str:
        return self.node.op_type


def weight_problem(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Why ``node``'s weight cannot be used as a constant, or None if it can."""
    rule = rule_for(node.op_type, node.domain)
    if rule is None or rule.weight_input is None:
        return f"{node.op_type} has no registered weight input"
    if len(node.input) <= rule.weight_input:
        return "has no weight input"
    w = node.input[rule.weight_input]
    if w not in index.initializers:
        if node.op_type == "MatMul" and node.input[0] in index.initializers:
            return "constant is the left operand (not supported)"
        return f"weight '{w}' is not a constant (e.g. attention scores)"
    if index.initializers[w].data_type != FLOAT:
        return f"weight '{w}' is not float32"
    dims = list(index.initializers[w].dims)
    if node.op_type in ("MatMul", "Gemm", "Attention") and len(dims) != 2:
        return f"weight '{w}' is {len(dims)}-D (only 2-D {node.op_type} weights)"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA=1 (not supported)"
    b = _bias_name(node)
    if b is not None and b not in index.initializers:
        return f"bias '{b}' is not a constant"
    if index.elem_type(node.input[0]) not in (FLOAT, None):
        return "activation input is not float32"
    return None


def _bias_name(node: onnx.NodeProto) -> str | None:
    rule = rule_for(node.op_type, node.domain)
    k = rule.bias_input if rule is not None else None
    return node.input[k] if k is not None and len(node.input) > k and node.input[k] else None


def is_weighted_op(node: onnx.NodeProto) -> bool:
    """Whether ``node``'s op type is one that has a weight (Conv, Gemm, MatMul, Attention)."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type in WEIGHTED_OPS
    return node.domain == MS_DOMAIN and node.op_type in CONTRIB_WEIGHTED_OPS


def weighted_node(node: onnx.NodeProto, position: int, index: GraphIndex) -> WeightedNode | str:
    """The ``WeightedNode`` for ``node``, or the reason it has no usable constant weight."""
    if not is_weighted_op(node):
        return f"{node.op_type} is not a weighted layer (Conv, Gemm, MatMul, Attention)"
    problem = weight_problem(node, index)
    if problem is not None:
        return problem
    if node.op_type == "Conv":
        out_axis, in_axis = 0, 1
    elif node.op_type == "Gemm" and attr(node, "transB", 0):
        out_axis, in_axis = 0, 1  # (N, K)
    else:
        out_axis, in_axis = 1, 0  # (K, N)
    return WeightedNode(node_name(node, position), node, node.input[1], _bias_name(node),
                        out_axis, in_axis)


def weighted_nodes(fm: FloatModel) -> tuple[list[WeightedNode], dict[str, str]]:
    """(every Conv/Gemm/MatMul/Attention with a usable constant weight, {node name: why
    not} for the other such nodes), in graph order."""
    index = GraphIndex(fm.proto, fm.weights)
    found: list[WeightedNode] = []
    refused: dict[str, str] = {}
    for i, node in enumerate(fm.proto.graph.node):
        if not is_weighted_op(node):
            continue
        item = weighted_node(node, i, index)
        if isinstance(item, str):
            refused[node_name(node, i)] = item
        else:
            found.append(item)
    return found, refused


def weight_initializers(fm: FloatModel, *, biases: bool = False) -> list[str]:
    """Initializer names of the usable constant weights (and biases), each once."""
    names: list[str] = []
    for w in weighted_nodes(fm)[0]:
        for n in ([w.weight] + ([w.bias] if biases and w.bias else [])):
            if n not in names:
                names.append(n)
    return names
