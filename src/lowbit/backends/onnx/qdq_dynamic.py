"""Writers of the INT8 nodes that take 8-bit activations from ONNX Runtime's own
quantizers or from a QuantizeLinear the plan placed: dynamic MatMul/Gemm
(DynamicQuantizeLinear + MatMulInteger, fused by ONNX Runtime into
DynamicQuantizeMatMul), LSTM (com.microsoft DynamicQuantizeLSTM) and com.microsoft
Attention (QAttention, dynamic or static input). They decide nothing: weights and their
parameters come from the plan.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lowbit.backends.onnx.graph import GraphIndex, attr
from lowbit.backends.onnx.graph_writer import GraphWriter
from lowbit.quant import affine
from lowbit.quant.plan import NodeQuant, QuantizationPlan


def write_dynamic(w: GraphWriter, node: onnx.NodeProto, item: NodeQuant,
                  plan: QuantizationPlan, index: GraphIndex) -> None:
    """One dynamic node of the plan (MatMul/Gemm, LSTM or Attention)."""
    if item.recurrence is not None:
        _dynamic_lstm(w, node, item, plan, index)
    elif node.op_type == "Attention":
        prefix = w.names(f"{node.name or 'Attention'}_dyn")
        x_q, x_s, x_zp = (w.names(f"{prefix}_x_quantized"), w.names(f"{prefix}_x_scale"),
                          w.names(f"{prefix}_x_zero_point"))
        w.add(helper.make_node("DynamicQuantizeLinear", [node.input[0]], [x_q, x_s, x_zp],
                               name=w.names(f"{prefix}_DQL")))
        write_qattention(w, node, item, plan, index, (x_q, x_s, x_zp))
    else:
        _dynamic_matmul(w, node, item, plan, index)


def write_qattention(w: GraphWriter, node: onnx.NodeProto, item: NodeQuant,
                     plan: QuantizationPlan, index: GraphIndex,
                     x_8bit: tuple[str, str, str]) -> None:
    """com.microsoft Attention -> QAttention on the 8-bit input ``x_8bit`` (tensor, scale,
    zero point): INT8 weight (H, 3H) per tensor or per column, the float bias (zeros if
    none), mask and past as given, the attributes QAttention shares with Attention."""
    weight = str(item.weight)
    values = plan.values_of(weight, index.constant)  # (H, 3H)
    params = plan.tensors[weight]
    w_q = w.const(f"{weight}_quantized", affine.quantize(values, params, dtype=np.int8))
    scale = np.asarray(params.scale, np.float32)
    w_s = w.const(f"{weight}_scale", scale)
    w_zp = w.const(f"{weight}_zero_point", np.zeros(scale.shape, np.int8))
    given = list(node.input) + [""] * (5 - len(node.input))
    bias = given[2] or w.const(f"{weight}_zero_bias", np.zeros(values.shape[1], np.float32))
    x_q, x_s, x_zp = x_8bit
    inputs = [x_q, w_q, bias, x_s, w_s, given[3], x_zp, w_zp, given[4]]
    while not inputs[-1]:
        inputs.pop()
    new = helper.make_node("QAttention", inputs, list(node.output),
                           name=node.name or w.names("QAttention"), domain="com.microsoft")
    keep = {"num_heads", "unidirectional", "scale", "mask_filter_value",
            "past_present_share_buffer", "do_rotary"}
    new.attribute.extend(a for a in node.attribute if a.name in keep)
    w.remove(node)
    w.add(new)


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
