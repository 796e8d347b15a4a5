"""The low-bit writer: weight-only plan entries -> ONNX Runtime's ``MatMulNBits`` (packed
2/4/8-bit codes, so the file really shrinks) and ``GatherBlockQuantized`` (embedding
tables). It renders the plan's group parameters and decides nothing."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lowbit.backends.onnx.graph import GraphIndex
from lowbit.backends.onnx.graph_writer import GraphWriter
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weight_only import transpose_params
from lowbit.quant.groupwise import GroupQuantized, pack_codes, pack_zero_points, storage_bits
from lowbit.quant.plan import NodeQuant, QuantizationPlan, Treatment


def write_weight_only(fm: FloatModel, plan: QuantizationPlan, writer: GraphWriter) -> None:
    """Replace every weight-only node of ``plan`` in ``writer``'s graph."""
    index = GraphIndex(fm.proto, fm.weights)
    for item in plan.nodes_with(Treatment.WEIGHT_ONLY):
        node = writer.by_name[item.name]
        if node.op_type == "Gather":
            _gather(writer, node, item, plan, index)
        else:
            _matmul(writer, node, item, plan, index)


def _quantized_nk(item: NodeQuant, plan: QuantizationPlan, index: GraphIndex,
                  transposed: bool) -> GroupQuantized:
    """The plan's codes of a weight as (N, K) (MatMul stores (K, N))."""
    name = str(item.weight)
    stored = plan.values_of(name, index.constant).astype(np.float32, copy=False)
    params = plan.tensors[name]
    if transposed:
        stored, params = stored.T, transpose_params(params)
    return GroupQuantized.from_params(np.ascontiguousarray(stored), params)


def _matmul(w: GraphWriter, node: onnx.NodeProto, item: NodeQuant, plan: QuantizationPlan,
            index: GraphIndex) -> None:
    params = plan.tensors[str(item.weight)]
    transposed = params.axis == 0  # groups along axis 0: the weight is stored (K, N)
    q = _quantized_nk(item, plan, index, transposed)
    n, k = q.codes.shape[0], q.k
    stored = storage_bits(q.bits)
    base = str(item.weight)
    inputs = [node.input[0], w.const(f"{base}_q{q.bits}", pack_codes(q.codes, stored, q.group_size)),
              w.const(f"{base}_scales", q.scales.reshape(-1).astype(np.float32))]
    default_zp = 2 ** (stored - 1)
    if not (q.symmetric and stored == q.bits and np.all(q.zero_points == default_zp)):
        inputs.append(w.const(f"{base}_zero_points", pack_zero_points(q.zero_points, stored)))
    if item.bias is not None:
        bias = np.asarray(index.constant(item.bias), np.float32).reshape(-1)
        inputs += [""] * (5 - len(inputs))
        inputs.append(w.const(f"{base}_bias", np.broadcast_to(bias, (n,)).astype(np.float32)))
    w.remove(node)
    w.add(helper.make_node("MatMulNBits", inputs, [node.output[0]], domain="com.microsoft",
                           name=w.names(f"{item.name}_MatMulNBits"), K=k, N=n, bits=stored,
                           block_size=q.group_size, accuracy_level=int(item.accuracy_level or 0)))


def _gather(w: GraphWriter, node: onnx.NodeProto, item: NodeQuant, plan: QuantizationPlan,
            index: GraphIndex) -> None:
    q = _quantized_nk(item, plan, index, transposed=False)  # the table is (rows, dim)
    codes = q.codes
    data = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if q.bits == 4 else codes
    table = str(item.weight)
    inputs = [w.const(f"{table}_q{q.bits}", data), node.input[1],
              w.const(f"{table}_scales", q.scales.astype(np.float32))]
    if not np.all(q.zero_points == 2 ** (q.bits - 1)):  # not the kernel's default zero point
        zp = q.zero_points.astype(np.uint8)  # (rows, blocks)
        if q.bits == 4:
            zp = np.pad(zp, ((0, 0), (0, zp.shape[1] % 2)))
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        inputs.append(w.const(f"{table}_zero_points", zp))
    w.remove(node)
    w.add(helper.make_node("GatherBlockQuantized", inputs, list(node.output),
                           domain="com.microsoft", name=w.names(f"{item.name}_GatherBlockQuantized"),
                           gather_axis=0, quantize_axis=1, block_size=q.group_size, bits=q.bits))
