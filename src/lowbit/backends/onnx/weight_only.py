"""Plan weight-only low-bit quantization (2-8 bits, group-wise) of MatMul/Gemm weights
and embedding tables; ``nbits`` writes the plan as MatMulNBits/GatherBlockQuantized.

Algorithms: ``rtn`` (round to nearest), ``gptq`` (Hessian error compensation from
calibration data), ``hqq`` (calibration-free half-quadratic zero-point fit). For
GPTQ the Hessians ``2 X^T X`` of each layer's input are accumulated batch by
batch through ONNX Runtime, a few layers at a time so that their Hessians fit a
memory budget (each group of layers costs one pass over the calibration data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx

from lowbit.backends.onnx.calibrate import expose_tensors
from lowbit.backends.onnx.graph import GraphIndex, attr, node_name
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import WeightedNode, weighted_node
from lowbit.config import WeightOnlyAlgorithm, WeightOnlyConfig
from lowbit.data import Dataset
from lowbit.errors import DataError, ValidationError
from lowbit.quant.gptq import gptq
from lowbit.quant.groupwise import GroupQuantized, rtn, storage_bits
from lowbit.quant.hqq import hqq
from lowbit.quant.plan import NodeQuant, QuantizationPlan, Treatment
from lowbit.quant.scheme import TensorQuantParams

HESSIAN_BUDGET_BYTES = 512 * 2**20
ProgressFn = Callable[[str, int, int], None]


def layer_group_size(k: int, group_size: int) -> int:
    """The group size used for a layer with K inputs: the requested one, or the smallest
    power of two >= K (at least 16) when K is smaller, so no row is padded past K."""
    if k >= group_size:
        return group_size
    return max(16, 1 << (k - 1).bit_length())


def linear_layers(fm: FloatModel, exclude: tuple[str, ...] = ()
                  ) -> tuple[list[WeightedNode], list[tuple[str, str, str]]]:
    """(MatMul/Gemm layers whose weight can go low-bit, (name, op type, why not) of the
    other MatMul/Gemm nodes)."""
    index = GraphIndex(fm.proto, fm.weights)
    chosen: list[WeightedNode] = []
    refused: list[tuple[str, str, str]] = []
    for i, node in enumerate(fm.proto.graph.node):
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        item = weighted_node(node, i, index)
        name = node_name(node, i)
        if isinstance(item, str):
            refused.append((name, node.op_type, item))
        elif name in exclude:
            refused.append((name, node.op_type, "excluded by option"))
        else:
            chosen.append(item)
    return chosen, refused


def transpose_params(p: TensorQuantParams) -> TensorQuantParams:
    """Group params of a 2-D weight, for its transpose."""
    import dataclasses

    return dataclasses.replace(p, scale=np.ascontiguousarray(np.asarray(p.scale).T),
                               zero_point=np.ascontiguousarray(np.asarray(p.zero_point).T),
                               axis=1 - int(p.axis or 0))


def _nk(item: WeightedNode, stored: np.ndarray) -> np.ndarray:
    """The weight as (N, K): MatMul and Gemm without transB store (K, N)."""
    return np.ascontiguousarray(stored if item.out_axis == 0 else stored.T, dtype=np.float32)


def iter_hessians(fm: FloatModel, items: list[WeightedNode], data: Dataset, *, batch_size: int,
                  threads: int, progress: ProgressFn | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """``2 X^T X / n`` of each layer's activation input, streamed: one pass over the data
    per group of inputs whose Hessians fit the budget; yields one group at a time so the
    caller quantizes those layers and drops their Hessians before the next pass."""
    index = GraphIndex(fm.proto, fm.weights)
    sizes: dict[str, int] = {}
    for item in items:
        sizes.setdefault(item.node.input[0], int(index.initializers[item.weight].dims[item.in_axis]))
    groups: list[list[str]] = [[]]
    used = 0
    for x, k in sizes.items():
        if groups[-1] and used + k * k * 8 > HESSIAN_BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(x)
        used += k * k * 8
    for gi, group in enumerate(groups):
        from_graph = [x for x in group if x not in index.graph_inputs]
        session = make_session(expose_tensors(fm, from_graph), threads=threads, lean=True,
                               name="model (GPTQ statistics)")
        acc = {x: np.zeros((sizes[x], sizes[x]), dtype=np.float64) for x in group}
        count = {x: 0 for x in group}
        for feed in data.batches(batch_size):
            values = dict(zip(from_graph, session.run(from_graph, feed))) if from_graph else {}
            for x in group:
                flat = np.asarray(feed[x] if x in feed else values[x], np.float32).reshape(-1, sizes[x])
                if not np.all(np.isfinite(flat)):
                    raise DataError(f"{data.source}: tensor '{x}' has NaN/inf on the calibration data")
                acc[x] += (flat.T @ flat).astype(np.float64)  # float32 BLAS, float64 sum
                count[x] += flat.shape[0]
        del session
        if progress is not None:
            progress("collecting GPTQ statistics", gi + 1, len(groups))
        yield {x: 2.0 * acc.pop(x) / max(1, count[x]) for x in group}


def plan_weight_only(fm: FloatModel, cfg: WeightOnlyConfig, data: Dataset | None, *,
                     threads: int = 1, progress: ProgressFn | None = None) -> QuantizationPlan:
    """The weight-only quantization plan of ``fm``'s MatMul/Gemm layers (and, with
    ``cfg.embeddings``, its embedding tables)."""
    plan = QuantizationPlan()
    items, refused = linear_layers(fm, cfg.exclude_nodes)
    for name, op, why in refused:
        plan.decide(name, op, Treatment.FLOAT, why)
    algorithm = cfg.algorithm
    if algorithm is WeightOnlyAlgorithm.GPTQ:
        if data is None:
            raise DataError("algorithm gptq needs calibration data (--data)")
        work: Iterator[tuple[WeightedNode, dict[str, np.ndarray]]] = (
            (item, h) for h in iter_hessians(fm, items, data, batch_size=cfg.batch_size,
                                              threads=threads, progress=progress)
            for item in items if item.node.input[0] in h)
    else:
        work = ((item, {}) for item in items)
    stored_bits = storage_bits(cfg.bits)
    for step, (item, hessians) in enumerate(work):
        w_nk = _nk(item, np.asarray(fm.constant(item.weight)))  # (N, K)
        _check_bias(fm, item, w_nk.shape[0])
        k = w_nk.shape[1]
        group = layer_group_size(k, cfg.group_size)
        if algorithm is WeightOnlyAlgorithm.GPTQ:
            q = gptq(w_nk, hessians[item.node.input[0]], bits=cfg.bits, group_size=group,
                     symmetric=cfg.is_symmetric)
        elif algorithm is WeightOnlyAlgorithm.HQQ:
            q = hqq(w_nk, bits=cfg.bits, group_size=group)
        else:
            q = rtn(w_nk, bits=cfg.bits, group_size=group, symmetric=cfg.is_symmetric)
        _record(plan, item.weight, q, w_nk, transposed=item.out_axis != 0,
                exact=algorithm is WeightOnlyAlgorithm.RTN, label=item.name)
        pad = f", K padded from {k} to a multiple of {group}" if k % group else ""
        if group != cfg.group_size:
            pad += f" (group {group}: K={k} is smaller than {cfg.group_size})"
        stored_note = f" (stored as {stored_bits}-bit codes: ONNX Runtime packs 2/4/8)" \
            if stored_bits != cfg.bits else ""
        plan.add_node(NodeQuant(item.name, item.op_type, Treatment.WEIGHT_ONLY, item.weight,
                                item.bias, accuracy_level=cfg.accuracy_level),
                      f"{algorithm.value}, group {group}, "
                      f"{'symmetric' if q.symmetric else 'asymmetric'}{pad}{stored_note}",
                      bits=cfg.bits)
        if progress is not None:
            progress(f"quantizing weights ({algorithm.value})", step + 1, len(items))
    if cfg.embeddings:
        plan_embeddings(fm, plan, bits=4 if cfg.bits <= 4 else 8, group_size=cfg.group_size,
                        exclude=cfg.exclude_nodes)
    return plan


def _record(plan: QuantizationPlan, weight: str, q: GroupQuantized, w_nk: np.ndarray, *,
            transposed: bool, exact: bool, label: str) -> None:
    """Put ``q`` into the plan as params (and values, unless plain rounding of the
    weight gives the codes) on the weight's stored layout."""
    params = q.to_params()  # on (N, K), axis 1
    values = None if exact else q.dequantize()  # (N, K); requantizes exactly to q's codes
    if transposed:
        params = transpose_params(params)
        values = None if values is None else np.ascontiguousarray(values.T)
    plan.tensors[weight] = params
    if values is not None:
        plan.weight_values[weight] = values
    plan.layer_error[label] = round(float(
        np.linalg.norm(q.dequantize() - w_nk) / max(float(np.linalg.norm(w_nk)), 1e-30)), 6)


def _check_bias(fm: FloatModel, item: WeightedNode, n: int) -> None:
    if item.bias is None:
        return
    size = int(np.asarray(fm.constant(item.bias)).size)
    if size not in (1, n):
        raise ValidationError(f"Gemm {item.name}: bias of {size} values is not per output "
                              "feature; cannot write MatMulNBits")


def plan_embeddings(fm: FloatModel, plan: QuantizationPlan, *, bits: int, group_size: int,
                    exclude: tuple[str, ...] = (),
                    cache: dict[str, GroupQuantized] | None = None) -> None:
    """Gather on a constant 2-D table (token/position embeddings): blockwise symmetric
    ``bits`` (4 or 8) codes, dequantized at lookup (GatherBlockQuantized). ``cache``
    keeps each table's codes for the next plan of the same model (auto's variants)."""
    cache = {} if cache is None else cache
    index = GraphIndex(fm.proto, fm.weights)
    tied = {n.weight for n in plan.nodes.values()}
    for i, node in enumerate(fm.proto.graph.node):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        name, table = node_name(node, i), node.input[0]
        if name in plan.nodes:  # the INT8 planner stores this table as 8-bit already
            continue
        if name in exclude:
            plan.decide(name, "Gather", Treatment.FLOAT, "excluded by option")
            continue
        if table in plan.tensors or table in tied:  # a MatMul/Gemm weight with its own grid
            plan.decide(name, "Gather", Treatment.FLOAT, f"table '{table}' is shared with a "
                        "quantized MatMul/Gemm and keeps its grid there; the lookup stays float")
            continue
        t = index.initializers.get(table)
        if t is None or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or \
                node.input[1] in index.initializers:
            continue
        rows, dim = int(t.dims[0]), int(t.dims[1])
        block = next((b for b in (group_size, 128, 64, 32, 16) if dim % b == 0), None)
        axis = attr(node, "axis", 0)
        if axis != 0 or block is None or rows * dim < 4096:
            why = ("gather axis is not 0" if axis != 0 else
                   f"embedding width {dim} is not a multiple of 16" if block is None else
                   "table too small to matter")
            plan.decide(name, "Gather", Treatment.FLOAT, why)
            continue
        w = np.asarray(index.constant(table), dtype=np.float32)  # (rows, dim)
        if table not in cache:
            cache[table] = rtn(w, bits=bits, group_size=block, symmetric=True)
        _record(plan, table, cache[table], w, transposed=False, exact=True, label=name)
        plan.add_node(NodeQuant(name, "Gather", Treatment.WEIGHT_ONLY, table),
                      f"embedding table, blockwise symmetric, block {block}, dequantized at "
                      "lookup", bits=bits)
