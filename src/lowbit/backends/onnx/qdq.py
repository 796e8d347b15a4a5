"""The INT8 writer: a ``QuantizationPlan`` -> QDQ (static) and dynamic MatMul/Gemm rewrites.

It decides nothing: every scale and zero point comes from the plan. It emits
standard ONNX (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear,
MatMulInteger) that ONNX Runtime fuses into its integer kernels (QLinearConv,
QGemm, DynamicQuantizeMatMul, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lowbit.backends.onnx.graph import GraphIndex, attr
from lowbit.backends.onnx.graph_writer import GraphWriter
from lowbit.backends.onnx.store import FloatModel
from lowbit.quant import affine
from lowbit.quant.plan import NodeQuant, QuantizationPlan, Treatment
from lowbit.quant.scheme import Granularity, TensorQuantParams


def _storage_dtype(params: TensorQuantParams) -> Any:
    if params.bits == 32:
        return np.int32
    return np.int8 if params.signed else np.uint8


def _dequantized_constant(w: GraphWriter, tensor: str, values: np.ndarray,
                          params: TensorQuantParams) -> str:
    """Store ``values`` quantized with ``params``; return the name of its DQ output."""
    dtype = _storage_dtype(params)
    q_name = w.const(f"{tensor}_quantized", affine.quantize(values, params, dtype=dtype))
    scale, zp = _params_inputs(w, tensor, params)
    out = w.names(f"{tensor}_dequantized")
    attrs = {"axis": params.axis} if params.granularity is Granularity.CHANNEL else {}
    w.add(helper.make_node("DequantizeLinear", [q_name, scale, zp], [out],
                           name=w.names(f"{tensor}_DequantizeLinear"), **attrs))
    return out


def _params_inputs(w: GraphWriter, base: str, params: TensorQuantParams) -> tuple[str, str]:
    scale = w.const(f"{base}_scale", np.asarray(params.scale, dtype=np.float32))
    zp = w.const(f"{base}_zero_point", np.asarray(params.zero_point).astype(_storage_dtype(params)))
    return scale, zp


def _qdq_activation(w: GraphWriter, tensor: str, params: TensorQuantParams,
                    is_graph_input: bool) -> None:
    """Insert Q -> DQ on an activation. Consumers keep reading ``tensor`` unless it is a
    graph input (then they are rewired to the DQ output)."""
    scale, zp = _params_inputs(w, tensor, params)
    q_out = w.names(f"{tensor}_quantized")
    if is_graph_input:
        source, dq_out = tensor, w.names(f"{tensor}_dequantized")
        w.rename_input(tensor, dq_out)
    else:
        source, dq_out = w.names(f"{tensor}_prequant"), tensor
        w.rename_output(tensor, source)
    w.add(helper.make_node("QuantizeLinear", [source, scale, zp], [q_out],
                           name=w.names(f"{tensor}_QuantizeLinear")))
    w.add(helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                           name=w.names(f"{tensor}_DequantizeLinear")))


def write_int8(fm: FloatModel, plan: QuantizationPlan, writer: GraphWriter) -> None:
    """Apply the INT8 part of ``plan`` (folds, static and dynamic nodes, activations)
    to ``writer``'s copy of ``fm``."""
    index = GraphIndex(fm.proto, fm.weights)
    by_name = writer.by_name
    for fold in plan.folds:  # the producer writes the activation's output; the activation goes
        by_name[fold.producer].output[0] = fold.output
        writer.remove(by_name[fold.activation])
    for item in plan.nodes_with(Treatment.STATIC):
        node = by_name[item.name]
        if item.weight is None:
            _constant_operands(writer, node, plan, index)
        else:
            _static_weights(writer, node, item, plan, index)
    for item in plan.nodes_with(Treatment.DYNAMIC):
        write = _dynamic_lstm if item.recurrence is not None else _dynamic_matmul
        write(writer, by_name[item.name], item, plan, index)
    inputs = set(index.graph_inputs)
    for tensor in plan.activations:
        _qdq_activation(writer, tensor, plan.activation_params(tensor), tensor in inputs)
    _shapes_from_8bit(writer)


def _shapes_from_8bit(w: GraphWriter) -> None:
    """A Shape that reads a DequantizeLinear output reads its 8-bit input instead (same
    shape), so no tensor is dequantized only to learn its shape."""
    nodes = w.nodes()
    source = {n.output[0]: n.input[0] for n in nodes if n.op_type == "DequantizeLinear"}
    for node in nodes:
        if node.op_type == "Shape" and node.input[0] in source:
            node.input[0] = source[node.input[0]]


def _static_weights(w: GraphWriter, node: onnx.NodeProto, item: NodeQuant,
                    plan: QuantizationPlan, index: GraphIndex) -> None:
    weight = str(item.weight)
    if node.op_type == "MatMul" and item.bias is not None:
        _static_matmul_as_gemm(w, node, item, plan, index)
        return
    node.input[1] = _dequantized_constant(w, weight, plan.values_of(weight, index.constant),
                                          plan.tensors[weight])
    if item.bias is not None and item.bias in plan.tensors:
        bias = plan.values_of(item.bias, index.constant)
        node.input[2] = _dequantized_constant(w, item.bias, bias.reshape(-1),
                                              plan.tensors[item.bias])


def _static_matmul_as_gemm(w: GraphWriter, node: onnx.NodeProto, item: NodeQuant,
                           plan: QuantizationPlan, index: GraphIndex) -> None:
    """A static MatMul whose bias Add the plan folded -> Gemm(transB=1) with the bias, which
    ONNX Runtime runs as one QGemm (bias and a folded Relu inside). An input of rank other
    than 2 is reshaped to [rows, K] and the result back to [..., N]; the Q/DQ pairs around
    the reshapes repeat the neighbours' parameters, so the reshapes run on 8-bit data."""
    weight, bias = str(item.weight), str(item.bias)
    values = plan.values_of(weight, index.constant)  # (K, N), channels on axis 1
    params = dataclasses.replace(plan.tensors[weight], axis=0)
    w_dq = _dequantized_constant(w, weight, np.ascontiguousarray(values.T), params)
    b_dq = _dequantized_constant(w, bias, plan.values_of(bias, index.constant).reshape(-1),
                                 plan.tensors[bias])
    x, out = node.input[0], node.output[0]
    prefix = w.names(f"{node.name or 'MatMul'}_gemm")
    gemm = helper.make_node("Gemm", [x, w_dq, b_dq], [out], name=node.name or prefix, transB=1)
    w.remove(node)
    w.add(gemm)
    if len(index.shape(x) or ()) == 2:
        return
    k, n = values.shape
    x2d, y2d = w.names(f"{prefix}_x2d"), w.names(f"{prefix}_y2d")
    shape, lead, target = (w.names(f"{prefix}_shape"), w.names(f"{prefix}_lead"),
                           w.names(f"{prefix}_target"))
    gemm.input[0], gemm.output[0] = x2d, y2d
    for new in (
        helper.make_node("Reshape", [x, w.const(f"{prefix}_rows", np.asarray([-1, k], np.int64))],
                         [x2d], name=w.names(f"{prefix}_Reshape_in")),
        helper.make_node("Shape", [x], [shape], name=w.names(f"{prefix}_Shape")),
        helper.make_node("Slice", [shape, w.const(f"{prefix}_zero", np.asarray([0], np.int64)),
                                   w.const(f"{prefix}_last", np.asarray([-1], np.int64))],
                         [lead], name=w.names(f"{prefix}_Slice")),
        helper.make_node("Concat", [lead, w.const(f"{prefix}_n", np.asarray([n], np.int64))],
                         [target], axis=0, name=w.names(f"{prefix}_Concat")),
        helper.make_node("Reshape", [y2d, target], [out], name=w.names(f"{prefix}_Reshape_out")),
    ):
        w.add(new)
    if x in plan.tensors or x in plan.shared:
        _qdq_activation(w, x2d, plan.activation_params(x), False)
    if out in plan.tensors or out in plan.shared:
        _qdq_activation(w, y2d, plan.activation_params(out), False)


def _constant_operands(w: GraphWriter, node: onnx.NodeProto, plan: QuantizationPlan,
                       index: GraphIndex) -> None:
    """Constant inputs of an 8-bit elementwise op (e.g. Concat) that the plan quantizes."""
    for k, x in enumerate(node.input):
        if x and x in index.initializers and x in plan.tensors:
            node.input[k] = _dequantized_constant(w, x, plan.values_of(x, index.constant), plan.tensors[x])


def _dynamic_matmul(w: GraphWriter, node: onnx.NodeProto, item: NodeQuant,
                    plan: QuantizationPlan, index: GraphIndex) -> None:
    """MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger + scale (+ bias)."""
    base = str(item.weight)
    weight = plan.values_of(base, index.constant)
    params = plan.tensors[base]
    bias = plan.values_of(item.bias, index.constant) if item.bias else None
    q = affine.quantize(weight, params, dtype=np.int8)
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        q = np.ascontiguousarray(q.T)  # stored (N, K); MatMulInteger wants (K, N)
    w_q = w.const(f"{base}_quantized", q)
    w_scale = w.const(f"{base}_scale", np.asarray(params.scale, np.float32))
    prefix = w.names(f"{node.name or node.op_type}_dyn")
    x_q, x_s, x_zp = (w.names(f"{prefix}_x_quantized"), w.names(f"{prefix}_x_scale"),
                      w.names(f"{prefix}_x_zero_point"))
    acc, acc_f, scale = (w.names(f"{prefix}_int32"), w.names(f"{prefix}_float"),
                         w.names(f"{prefix}_scale"))
    out = node.output[0]
    scaled = out if bias is None else w.names(f"{prefix}_scaled")
    new = [
        helper.make_node("DynamicQuantizeLinear", [node.input[0]], [x_q, x_s, x_zp],
                         name=w.names(f"{prefix}_DQL")),
        helper.make_node("MatMulInteger", [x_q, w_q, x_zp], [acc],
                         name=w.names(f"{prefix}_MatMulInteger")),
        helper.make_node("Cast", [acc], [acc_f], to=onnx.TensorProto.FLOAT,
                         name=w.names(f"{prefix}_Cast")),
        helper.make_node("Mul", [x_s, w_scale], [scale], name=w.names(f"{prefix}_ScaleMul")),
        helper.make_node("Mul", [acc_f, scale], [scaled], name=w.names(f"{prefix}_Mul")),
    ]
    if bias is not None:
        b = w.const(f"{base}_bias", bias.astype(np.float32))
        new.append(helper.make_node("Add", [scaled, b], [out], name=w.names(f"{prefix}_BiasAdd")))
    w.remove(node)
    for n in new:
        w.add(n)


def _dynamic_lstm(w: GraphWriter, node: onnx.NodeProto, item: NodeQuant,
                  plan: QuantizationPlan, index: GraphIndex) -> None:
    """LSTM -> com.microsoft DynamicQuantizeLSTM: W [dirs, 4h, in] and R [dirs, 4h, h] as
    INT8, transposed to [dirs, in, 4h] / [dirs, h, 4h], one scale per (direction, gate
    channel); the plan's parameters are per row of the [dirs * 4h, in] view."""
    extra = []
    for tensor in (str(item.weight), str(item.recurrence)):
        values = plan.values_of(tensor, index.constant)
        params = plan.tensors[tensor]
        q = affine.quantize(values.reshape(-1, values.shape[-1]), params, dtype=np.int8)
        q = np.ascontiguousarray(q.reshape(values.shape).transpose(0, 2, 1))
        scale = np.asarray(params.scale, np.float32).reshape(values.shape[0], -1)
        extra.append((w.const(f"{tensor}_quantized", q), w.const(f"{tensor}_scale", scale),
                      w.const(f"{tensor}_zero_point", np.zeros(scale.shape, np.int8))))
    optional = [node.input[k] if len(node.input) > k else "" for k in range(3, 8)]
    (w_q, w_s, w_zp), (r_q, r_s, r_zp) = extra
    new = helper.make_node("DynamicQuantizeLSTM", [node.input[0], w_q, r_q, *optional, w_s, w_zp,
                                                   r_s, r_zp], list(node.output),
                           name=w.names(f"{node.name or 'LSTM'}_int8"), domain="com.microsoft")
    new.attribute.extend(a for a in node.attribute if a.name != "layout")
    w.remove(node)
    w.add(new)
