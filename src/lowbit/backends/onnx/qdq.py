"""The INT8 writer: a ``QuantizationPlan`` -> QDQ (static) and dynamic rewrites.

It decides nothing: every scale and zero point comes from the plan. It emits
standard ONNX (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear,
MatMulInteger) that ONNX Runtime fuses into its integer kernels (QLinearConv,
QGemm, DynamicQuantizeMatMul, ...), and writes 8-bit data straight into the few ops
it would not fuse (Pad, com.microsoft QAttention; ``qdq_dynamic``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lowbit.backends.onnx.graph import GraphIndex, attr
from lowbit.backends.onnx.graph_writer import GraphWriter
from lowbit.backends.onnx.qdq_dynamic import write_dynamic, write_qattention
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
                    is_graph_input: bool, *, source: str | None = None,
                    dequantize: bool = True) -> tuple[str, str, str]:
    """Insert Q -> DQ on an activation; return (8-bit tensor, scale, zero point). Consumers
    keep reading ``tensor`` unless it is a graph input (then they are rewired to the DQ
    output). ``source``: the Q reads this tensor instead (a Relu/Clip that becomes the Q's
    saturation, already removed). ``dequantize`` False: only 8-bit readers are left."""
    scale, zp = _params_inputs(w, tensor, params)
    q_out = w.names(f"{tensor}_quantized")
    if is_graph_input:
        source, dq_out = tensor, w.names(f"{tensor}_dequantized")
        w.rename_input(tensor, dq_out)
    elif source is not None:
        dq_out = tensor
    else:
        source, dq_out = w.names(f"{tensor}_prequant"), tensor
        w.rename_output(tensor, source)
    w.add(helper.make_node("QuantizeLinear", [source, scale, zp], [q_out],
                           name=w.names(f"{tensor}_QuantizeLinear")))
    if dequantize:
        w.add(helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                               name=w.names(f"{tensor}_DequantizeLinear")))
    return q_out, scale, zp


def write_int8(fm: FloatModel, plan: QuantizationPlan, writer: GraphWriter) -> None:
    """Apply the INT8 part of ``plan`` (folds, static and dynamic nodes, activations)
    to ``writer``'s copy of ``fm``."""
    index = GraphIndex(fm.proto, fm.weights)
    by_name = writer.by_name
    absorbed: dict[str, str] = {}  # Relu/Clip output -> its input, read by the output's Q
    for fold in plan.folds:  # the producer writes the activation's output; the activation goes
        act = by_name[fold.activation]
        if fold.producer == fold.activation:  # nothing before it to fold into
            absorbed[fold.output] = act.input[0]
        else:
            by_name[fold.producer].output[0] = fold.output
        writer.remove(act)
    attention = []  # static QAttention: written once its input's QuantizeLinear is there
    for item in plan.nodes_with(Treatment.STATIC):
        node = by_name[item.name]
        if item.op_type == "Attention":
            attention.append((node, item, node.input[0]))
        elif item.weight is None:
            _constant_operands(writer, node, plan, index)
        else:
            _static_weights(writer, node, item, plan, index)
    for item in plan.nodes_with(Treatment.DYNAMIC):
        write_dynamic(writer, by_name[item.name], item, plan, index)
    pads = {by_name[d.name].output[0]: (by_name[d.name], by_name[d.name].input[0])
            for d in plan.decisions if d.op_type == "Pad" and d.treatment is Treatment.PASSTHROUGH}
    direct = [n for n, _, _ in attention] + [n for n, _ in pads.values()]
    eight_bit = _write_activations(writer, plan, index, absorbed, pads, direct)
    for node, item, x in attention:
        write_qattention(writer, node, item, plan, index, eight_bit[x])
    _shapes_from_8bit(writer)


def _write_activations(w: GraphWriter, plan: QuantizationPlan, index: GraphIndex,
                       absorbed: dict[str, str],
                       pads: dict[str, tuple[onnx.NodeProto, str]],
                       direct: list[onnx.NodeProto]) -> dict[str, tuple[str, str, str]]:
    """Q -> DQ on every planned activation ({tensor: (8-bit tensor, scale, zero point)}).
    ``direct`` nodes read 8-bit tensors themselves (Pad, QAttention): a tensor only they
    read gets no DequantizeLinear. A Pad that runs on 8-bit data pads with the zero point
    (0.0 exactly) and needs no QuantizeLinear after it: ONNX Runtime 1.32 keeps a QDQ Pad
    in float."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in w.nodes():
        for x in node.input:
            readers[x].append(node)
    direct_ids = {id(n) for n in direct}
    needs_float = set(index.graph_outputs) | set(absorbed.values())
    inputs = set(index.graph_inputs)
    eight_bit: dict[str, tuple[str, str, str]] = {}
    for tensor in plan.activations:
        dequantize = tensor in needs_float or \
            any(id(n) not in direct_ids for n in readers.get(tensor, []))
        if tensor in pads:
            pad, x = pads[tensor]
            eight_bit[tensor] = _pad_8bit(w, pad, eight_bit[x], tensor, dequantize)
        else:
            eight_bit[tensor] = _qdq_activation(w, tensor, plan.activation_params(tensor),
                                                tensor in inputs, source=absorbed.get(tensor),
                                                dequantize=dequantize)
    return eight_bit


def _pad_8bit(w: GraphWriter, pad: onnx.NodeProto, source: tuple[str, str, str], tensor: str,
              dequantize: bool) -> tuple[str, str, str]:
    """``pad`` reads the 8-bit ``source`` and writes 8-bit data at its scale (the plan
    shares it), padding with the zero point; a DQ after it if float readers remain."""
    x_q, scale, zp = source
    out = w.names(f"{tensor}_quantized")
    inputs = list(pad.input)
    inputs[0] = x_q
    if len(inputs) > 2 or attr(pad, "mode", b"constant") in (b"constant", "constant"):
        inputs += [""] * (3 - len(inputs))
        inputs[2] = zp  # constant_value has the data's type; 0.0 is the zero point
    del pad.input[:]
    pad.input.extend(inputs)
    pad.output[0] = out
    if dequantize:
        w.add(helper.make_node("DequantizeLinear", [out, scale, zp], [tensor],
                               name=w.names(f"{tensor}_DequantizeLinear")))
    return out, scale, zp


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
