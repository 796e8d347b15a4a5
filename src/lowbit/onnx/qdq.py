"""The one ONNX writer for INT8: QDQ (static) and dynamic MatMul/Gemm rewrites.

It consumes a ``QuantPlan`` and ``TensorQuantParams`` records and emits
standard ONNX (QuantizeLinear, DequantizeLinear, MatMulInteger,
DynamicQuantizeLinear); ONNX Runtime fuses these patterns into its integer
kernels (QLinearConv, QGemm, DynamicQuantizeMatMul, ...).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.onnx.graph import (
    GraphIndex,
    NameFactory,
    attr,
    drop_unused_initializers,
    ensure_opset,
    topological_sort,
)
from lowbit.onnx.plan import QuantPlan, node_name, weight_axis
from lowbit.onnx.store import FloatModel, embed_weights, is_reference
from lowbit.quant import affine
from lowbit.quant.scheme import Granularity, TensorQuantParams, WeightGranularity

_NP_TO_ONNX = {np.dtype(np.int8): onnx.TensorProto.INT8,
               np.dtype(np.uint8): onnx.TensorProto.UINT8,
               np.dtype(np.int32): onnx.TensorProto.INT32}


def _storage_dtype(params: TensorQuantParams) -> np.dtype[Any]:
    if params.bits == 32:
        return np.dtype(np.int32)
    return np.dtype(np.int8 if params.signed else np.uint8)


class _Writer:
    def __init__(self, fm: FloatModel) -> None:
        self.fm = fm
        self.model = onnx.ModelProto()
        self.model.CopyFrom(fm.proto)  # light: large weights live in fm.weights
        self.graph = self.model.graph
        self.names = NameFactory(self.model)
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.weight_notes: dict[str, str] = {}  # node -> weight granularity used

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.names(base)
        self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def params_inputs(self, base: str, params: TensorQuantParams) -> tuple[str, str]:
        dtype = _storage_dtype(params)
        scale = self.const(f"{base}_scale", np.asarray(params.scale, dtype=np.float32))
        zp = self.const(f"{base}_zero_point", np.asarray(params.zero_point).astype(dtype))
        return scale, zp

    def dequantized_constant(self, tensor: str, values: np.ndarray,
                             params: TensorQuantParams) -> str:
        """Store ``values`` quantized with ``params``; return the name of its DQ output."""
        q = affine.quantize(values, params, dtype=_storage_dtype(params))
        q_name = self.const(f"{tensor}_quantized", q)
        scale, zp = self.params_inputs(tensor, params)
        out = self.names(f"{tensor}_dequantized")
        attrs: dict[str, Any] = (
            {"axis": params.axis} if params.granularity is Granularity.CHANNEL else {})
        self.new_nodes.append(helper.make_node(
            "DequantizeLinear", [q_name, scale, zp], [out],
            name=self.names(f"{tensor}_DequantizeLinear"), **attrs))
        return out

    def qdq_activation(self, tensor: str, params: TensorQuantParams, is_graph_input: bool) -> None:
        """Insert Q -> DQ on an activation. Consumers keep reading ``tensor`` unless it
        is a graph input (then they are rewired to the DQ output)."""
        scale, zp = self.params_inputs(tensor, params)
        q_out = self.names(f"{tensor}_quantized")
        if is_graph_input:
            source, dq_out = tensor, self.names(f"{tensor}_dequantized")
            for node in self.graph.node:
                for k, x in enumerate(node.input):
                    if x == tensor:
                        node.input[k] = dq_out
        else:
            source, dq_out = self.names(f"{tensor}_prequant"), tensor
            for node in list(self.graph.node) + self.new_nodes:
                for k, x in enumerate(node.output):
                    if x == tensor:
                        node.output[k] = source
        self.new_nodes.append(helper.make_node(
            "QuantizeLinear", [source, scale, zp], [q_out], name=self.names(f"{tensor}_QuantizeLinear")))
        self.new_nodes.append(helper.make_node(
            "DequantizeLinear", [q_out, scale, zp], [dq_out],
            name=self.names(f"{tensor}_DequantizeLinear")))

    def finish(self, decisions: list[dict[str, str]], extra_meta: dict[str, Any],
               infer_shapes: bool = True) -> onnx.ModelProto:
        self.graph.node.extend(self.new_nodes)
        self.graph.initializer.extend(self.new_inits)
        drop_unused_initializers(self.graph)
        if any(is_reference(t) for t in self.graph.initializer):
            self.model = embed_weights(self.model, self.fm.weights)
            self.graph = self.model.graph
        del self.graph.value_info[:]  # stale after renames; shape inference redoes it
        topological_sort(self.graph)
        ensure_opset(self.model, "", 13)
        meta = {"lowbit.decisions": json.dumps(decisions, separators=(",", ":")),
                **{f"lowbit.{k}": json.dumps(v) for k, v in extra_meta.items()}}
        existing = {p.key: p for p in self.model.metadata_props}
        for key, value in meta.items():
            if key in existing:
                existing[key].value = value
            else:
                self.model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        return onnx.shape_inference.infer_shapes(self.model) if infer_shapes else self.model


def _setattr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _normalise_gemm(node: onnx.NodeProto, index: GraphIndex, w: np.ndarray,
                    bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Fold Gemm's alpha into the weight and beta into the bias; set both to 1."""
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    if alpha != 1.0:
        w = (w * alpha).astype(np.float32)
        _setattr(node, "alpha", 1.0)
    if bias is not None and beta != 1.0:
        bias = (bias * beta).astype(np.float32)
        _setattr(node, "beta", 1.0)
    return w, bias


def write_quantized(
    model: FloatModel,
    plan: QuantPlan,
    activation_params: dict[str, TensorQuantParams],
    *,
    granularity: WeightGranularity = WeightGranularity.AUTO,
    metadata: dict[str, Any] | None = None,
    infer_shapes: bool = False,
) -> onnx.ModelProto:
    """Apply ``plan`` to ``model`` with the given activation parameters."""
    index = GraphIndex(model.proto, model.weights)
    w = _Writer(model)
    by_name = {node_name(n, i): n for i, n in enumerate(w.graph.node)}
    # 1. folds: the producer writes the activation's output; the activation goes.
    for fold in plan.folds:
        by_name[fold.producer].output[0] = fold.output
        w.graph.node.remove(by_name[fold.activation])
    # 2. weighted static nodes: INT8 weights per channel, INT32 bias.
    for name in plan.static_nodes:
        node = by_name[name]
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            _quantize_constant_operands(w, node, index)
            continue
        x = node.input[0]
        chosen = _static_weights(w, node, index, activation_params[plan.shared.get(x, x)],
                                 granularity)
        w.weight_notes[name] = chosen
    # 3. dynamic MatMul/Gemm.
    for name in plan.dynamic_nodes:
        _dynamic_matmul(w, by_name[name], index)
    # 4. activations.
    inputs = set(index.graph_inputs)
    for tensor in plan.activations:
        params = activation_params[plan.shared.get(tensor, tensor)]
        w.qdq_activation(tensor, params, tensor in inputs)
    decisions = [d.to_dict() for d in plan.decisions]
    for d in decisions:
        if d["name"] in w.weight_notes:
            d["weights"] = w.weight_notes[d["name"]]
        elif d["name"] in plan.dynamic_nodes:
            d["weights"] = "per-channel"
    return w.finish(decisions, metadata or {}, infer_shapes)


def _static_weights(w: _Writer, node: onnx.NodeProto, index: GraphIndex,
                    x_params: TensorQuantParams, granularity: WeightGranularity) -> str:
    """Quantize a weighted node's weight (and bias); return the weight granularity used."""
    weight_name = node.input[1]
    weight = index.constant(weight_name)
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = index.constant(bias_name) if bias_name else None
    if weight is None:
        raise ValueError(f"internal: weight of {node.name} vanished")
    if node.op_type == "Gemm":
        weight, bias = _normalise_gemm(node, index, weight, bias)
    axis = weight_axis(node)
    params = _choose_weight_params(node, weight, axis, granularity)
    node.input[1] = w.dequantized_constant(weight_name, weight, params)
    if bias is not None and bias_name is not None:
        n_out = weight.shape[axis]
        if bias.size == n_out:
            bias = bias.reshape(n_out)
            w_scale = np.broadcast_to(np.asarray(params.scale, np.float64), (n_out,))
            b_scale = (float(x_params.scale) * w_scale).astype(np.float32)
            b_scale = np.maximum(b_scale, np.float32(affine.MIN_SCALE))
            b_params = TensorQuantParams(
                bits=32, signed=True, symmetric=True, granularity=Granularity.CHANNEL,
                scale=b_scale, zero_point=np.zeros(n_out, np.int64), axis=0,
            )
            node.input[2] = w.dequantized_constant(bias_name, bias, b_params)
        elif not np.array_equal(bias, np.asarray(index.constant(bias_name))):
            node.input[2] = w.const(f"{bias_name}_scaled", bias.astype(np.float32))
    return "per-channel" if params.granularity is Granularity.CHANNEL else "per-tensor"


# Per-tensor INT8 weights run 2-5% faster than per-channel in ONNX Runtime's QGemm
# (measured side by side, docs/NOTES.md). In auto granularity a static MatMul/Gemm
# takes per-tensor weights when that costs almost nothing, i.e. when the weight's
# own quantization noise stays far below the 8-bit activation noise next to it:
# per-tensor weight SQNR within PER_TENSOR_TOLERANCE_DB of per-channel, or at least
# PER_TENSOR_GOOD_ENOUGH_DB. Conv weights are always per channel.
PER_TENSOR_TOLERANCE_DB = 0.5
PER_TENSOR_GOOD_ENOUGH_DB = 38.0


def _choose_weight_params(node: onnx.NodeProto, weight: np.ndarray, axis: int,
                          granularity: WeightGranularity) -> TensorQuantParams:
    if granularity is WeightGranularity.TENSOR:
        return affine.weight_params_per_tensor(weight)
    channel = affine.weight_params_per_channel(weight, axis=axis)
    if node.op_type == "Conv" or granularity is WeightGranularity.CHANNEL:
        return channel
    tensor = affine.weight_params_per_tensor(weight)
    err_c = affine.quantization_sqnr_db(weight, channel)
    err_t = affine.quantization_sqnr_db(weight, tensor)
    good = err_t >= err_c - PER_TENSOR_TOLERANCE_DB or err_t >= PER_TENSOR_GOOD_ENOUGH_DB
    return tensor if good else channel


def _quantize_constant_operands(w: _Writer, node: onnx.NodeProto, index: GraphIndex) -> None:
    """Elementwise ops (Add, Concat, ...) with a constant operand: UINT8 per tensor."""
    for k, x in enumerate(node.input):
        value = index.constant(x) if x else None
        if value is None or value.dtype != np.float32:
            continue
        params = affine.activation_params(float(value.min(initial=0.0)), float(value.max(initial=0.0)))
        node.input[k] = w.dequantized_constant(x, value, params)


def _dynamic_matmul(w: _Writer, node: onnx.NodeProto, index: GraphIndex) -> None:
    """MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger + scale (+ bias)."""
    weight = index.constant(node.input[1])
    bias = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if weight is None:
        raise ValueError(f"internal: weight of {node.name} vanished")
    if node.op_type == "Gemm":
        weight, bias = _normalise_gemm(node, index, weight, bias)
        if attr(node, "transB", 0):
            weight = np.ascontiguousarray(weight.T)  # (N, K) -> (K, N)
    params = affine.weight_params_per_channel(weight, axis=1)  # per output column
    base = node.input[1]
    w_q = w.const(f"{base}_quantized", affine.quantize(weight, params, dtype=np.int8))
    w_scale = w.const(f"{base}_scale", np.asarray(params.scale, np.float32))
    x = node.input[0]
    prefix = w.names(f"{node.name or node.op_type}_dyn")
    x_q, x_s, x_zp = (w.names(f"{prefix}_x_quantized"), w.names(f"{prefix}_x_scale"),
                      w.names(f"{prefix}_x_zero_point"))
    acc, acc_f, scale = (w.names(f"{prefix}_int32"), w.names(f"{prefix}_float"),
                         w.names(f"{prefix}_scale"))
    out = node.output[0]
    scaled = out if bias is None else w.names(f"{prefix}_scaled")
    new = [
        helper.make_node("DynamicQuantizeLinear", [x], [x_q, x_s, x_zp], name=w.names(f"{prefix}_DQL")),
        helper.make_node("MatMulInteger", [x_q, w_q, x_zp], [acc], name=w.names(f"{prefix}_MatMulInteger")),
        helper.make_node("Cast", [acc], [acc_f], to=onnx.TensorProto.FLOAT, name=w.names(f"{prefix}_Cast")),
        helper.make_node("Mul", [x_s, w_scale], [scale], name=w.names(f"{prefix}_ScaleMul")),
        helper.make_node("Mul", [acc_f, scale], [scaled], name=w.names(f"{prefix}_Mul")),
    ]
    if bias is not None:
        b = w.const(f"{base}_bias", bias.astype(np.float32))
        new.append(helper.make_node("Add", [scaled, b], [out], name=w.names(f"{prefix}_BiasAdd")))
    w.graph.node.remove(node)
    w.new_nodes.extend(new)
