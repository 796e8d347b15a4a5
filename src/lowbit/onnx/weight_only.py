"""Weight-only low-bit quantization (2-8 bits, group-wise) of MatMul/Gemm weights,
written as ONNX Runtime's ``MatMulNBits`` so the file really holds packed bits.

Algorithms: ``rtn`` (round to nearest), ``gptq`` (Hessian error compensation
from calibration data), ``hqq`` (calibration-free half-quadratic zero-point
fit). For GPTQ the Hessians ``2 X^T X`` of each layer's input are accumulated
batch by batch through ONNX Runtime, a few layers at a time so that their
Hessians fit a memory budget (each group of layers costs one pass over the
calibration data).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.data import Dataset
from lowbit.errors import DataError, ValidationError
from lowbit.onnx.calibrate import expose_tensors
from lowbit.onnx.graph import (
    GraphIndex,
    NameFactory,
    drop_unused_initializers,
    ensure_opset,
    topological_sort,
)
from lowbit.onnx.graph import attrs as node_attrs
from lowbit.onnx.plan import node_name
from lowbit.onnx.store import FloatModel, embed_weights
from lowbit.quant.gptq import gptq
from lowbit.quant.groupwise import (
    GroupQuantized,
    check_weight_only,
    pack_codes,
    pack_zero_points,
    rtn,
    storage_bits,
)
from lowbit.quant.hqq import hqq
from lowbit.runtime.session import make_session

ALGORITHMS = ("rtn", "gptq", "hqq")
HESSIAN_BUDGET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4
    group_size: int = 128
    algorithm: str = "rtn"
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits: 0 float math; 4 int8 activations (fast on VNNI)
    exclude_nodes: tuple[str, ...] = ()
    embeddings: bool = True  # also quantize Gather tables (GatherBlockQuantized)

    def __post_init__(self) -> None:
        check_weight_only(self.bits, self.group_size)
        if self.algorithm not in ALGORITHMS:
            raise ValidationError(f"option algorithm: {self.algorithm!r} is not one of "
                                  f"{', '.join(ALGORITHMS)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValidationError(f"option accuracy_level: {self.accuracy_level} must be 0-4")
        if self.algorithm == "hqq" and self.symmetric:
            object.__setattr__(self, "symmetric", False)  # HQQ fits zero points


@dataclass
class WeightOnlyOutcome:
    model: onnx.ModelProto
    decisions: list[dict[str, str]] = field(default_factory=list)
    layer_error: dict[str, float] = field(default_factory=dict)  # relative weight error


def _candidates(fm: FloatModel, cfg: WeightOnlyConfig) -> tuple[list[onnx.NodeProto], list[dict[str, str]]]:
    index = GraphIndex(fm.proto, fm.weights)
    chosen, decisions = [], []
    for i, node in enumerate(fm.proto.graph.node):
        name = node_name(node, i)
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        w = node.input[1] if len(node.input) > 1 else ""
        attrs = node_attrs(node)
        reason = None
        if name in cfg.exclude_nodes:
            reason = "excluded by option"
        elif w not in index.initializers:
            reason = f"weight '{w}' is not a constant (e.g. attention scores); kept in float"
        elif index.initializers[w].data_type != onnx.TensorProto.FLOAT or \
                len(index.initializers[w].dims) != 2:
            reason = f"weight '{w}' is not a 2-D float32 constant"
        elif node.op_type == "Gemm" and attrs.get("transA", 0):
            reason = "Gemm with transA=1"
        elif node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and \
                node.input[2] not in index.initializers:
            reason = "Gemm bias is not a constant"
        if reason:
            decisions.append({"name": name, "op_type": node.op_type, "treatment": "float",
                              "reason": reason})
        else:
            chosen.append(node)
    return chosen, decisions


def _weight_nk(node: onnx.NodeProto, index: GraphIndex) -> tuple[np.ndarray, np.ndarray | None]:
    """The weight as (N, K) and the bias (N,) or None, with Gemm's alpha/beta folded."""
    w = np.asarray(index.constant(node.input[1]), dtype=np.float32)
    attrs = node_attrs(node)
    bias = None
    if node.op_type == "MatMul":
        return np.ascontiguousarray(w.T), None  # (K, N) -> (N, K)
    w_nk = w if attrs.get("transB", 0) else w.T
    w_nk = np.ascontiguousarray(w_nk * float(attrs.get("alpha", 1.0)), dtype=np.float32)
    if len(node.input) > 2 and node.input[2]:
        c = np.asarray(index.constant(node.input[2]), dtype=np.float32) * float(attrs.get("beta", 1.0))
        bias = np.broadcast_to(c.reshape(-1), (w_nk.shape[0],)).astype(np.float32) \
            if c.size in (1, w_nk.shape[0]) else None
        if bias is None:
            raise ValidationError(f"Gemm {node.name}: bias of shape {list(c.shape)} is not per "
                                  "output feature; cannot write MatMulNBits")
    return w_nk, bias


def iter_hessians(fm: FloatModel, nodes: list[onnx.NodeProto], data: Dataset, *,
                  batch_size: int, threads: int,
                  progress: Callable[[str, int, int], None] | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """``2 X^T X / n`` of each node's activation input, streamed: one pass over the data
    per group of inputs whose Hessians fit the budget; yields one group at a time so the
    caller quantizes those layers and drops their Hessians before the next pass."""
    index = GraphIndex(fm.proto, fm.weights)
    inputs = list(dict.fromkeys(n.input[0] for n in nodes))
    sizes = {}
    for x in inputs:
        node = next(n for n in nodes if n.input[0] == x)
        w = index.initializers[node.input[1]]
        attrs = node_attrs(node)
        k = w.dims[0] if node.op_type == "MatMul" or not attrs.get("transB", 0) else w.dims[1]
        sizes[x] = int(k)
    groups: list[list[str]] = [[]]
    used = 0
    for x in inputs:
        cost = sizes[x] ** 2 * 8
        if groups[-1] and used + cost > HESSIAN_BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(x)
        used += cost
    for gi, group in enumerate(groups):
        from_graph = [x for x in group if x not in index.graph_inputs]
        session = make_session(expose_tensors(fm, from_graph), threads=threads, lean=True,
                               name="model (GPTQ statistics)")
        acc = {x: np.zeros((sizes[x], sizes[x]), dtype=np.float64) for x in group}
        count = {x: 0 for x in group}
        for feed in data.batches(batch_size):
            values = dict(zip(from_graph, session.run(from_graph, feed))) if from_graph else {}
            for x in group:
                arr = feed[x] if x in feed else values[x]
                flat = np.asarray(arr, dtype=np.float32).reshape(-1, sizes[x])
                if not np.all(np.isfinite(flat)):
                    raise DataError(f"{data.source}: tensor '{x}' has NaN/inf on the calibration data")
                acc[x] += (flat.T @ flat).astype(np.float64)  # float32 BLAS, float64 sum
                count[x] += flat.shape[0]
        del session
        if progress is not None:
            progress("collecting GPTQ statistics", gi + 1, len(groups))
        yield {x: 2.0 * acc.pop(x) / max(1, count[x]) for x in group}


def quantize_weight_only(fm: FloatModel, cfg: WeightOnlyConfig, data: Dataset | None, *,
                         batch_size: int = 8, threads: int = 1,
                         progress: Callable[[str, int, int], None] | None = None) -> WeightOnlyOutcome:
    nodes, decisions = _candidates(fm, cfg)
    if cfg.algorithm == "gptq" and data is None:
        raise DataError("algorithm gptq needs calibration data (--data)")
    index = GraphIndex(fm.proto, fm.weights)
    if cfg.algorithm == "gptq" and data is not None:
        batches: Iterator[tuple[list[onnx.NodeProto], dict[str, np.ndarray]]] = (
            ([n for n in nodes if n.input[0] in h], h)
            for h in iter_hessians(fm, nodes, data, batch_size=batch_size, threads=threads,
                                   progress=progress))
    else:
        batches = iter([(nodes, {})])
    out = onnx.ModelProto()
    out.CopyFrom(fm.proto)
    names = NameFactory(out)
    by_name = {node_name(n, i): n for i, n in enumerate(out.graph.node)}
    original_names = [node_name(n, i) for i, n in enumerate(fm.proto.graph.node)]
    outcome = WeightOnlyOutcome(out)
    stored = storage_bits(cfg.bits)
    new_inits: list[onnx.TensorProto] = []
    work = ((node, hessians) for group, hessians in batches for node in group)
    for step, (node, hessians) in enumerate(work):
        name = original_names[list(fm.proto.graph.node).index(node)]
        target = by_name[name]
        w_nk, bias = _weight_nk(node, index)
        n, k = w_nk.shape
        group = layer_group_size(k, cfg.group_size)
        if cfg.algorithm == "gptq":
            q = gptq(w_nk, hessians[node.input[0]], bits=cfg.bits, group_size=group,
                     symmetric=cfg.symmetric)
        elif cfg.algorithm == "hqq":
            q = hqq(w_nk, bits=cfg.bits, group_size=group)
        else:
            q = rtn(w_nk, bits=cfg.bits, group_size=group, symmetric=cfg.symmetric)
        err = float(np.linalg.norm(q.dequantize() - w_nk) / max(np.linalg.norm(w_nk), 1e-30))
        outcome.layer_error[name] = round(err, 6)
        inputs = _write_node(q, stored, bias, target, names, new_inits)
        new = helper.make_node("MatMulNBits", inputs, [target.output[0]], domain="com.microsoft",
                               name=names(f"{name}_MatMulNBits"), K=k, N=n, bits=stored,
                               block_size=group, accuracy_level=cfg.accuracy_level)
        out.graph.node.remove(target)
        out.graph.node.append(new)
        pad = f", K padded from {k} to a multiple of {group}" if k % group else ""
        if group != cfg.group_size:
            pad += f" (group {group}: K={k} is smaller than {cfg.group_size})"
        stored_note = f" (stored as {stored}-bit codes: ONNX Runtime packs 2/4/8)" \
            if stored != cfg.bits else ""
        decisions.append({"name": name, "op_type": node.op_type, "treatment":
                          f"int{cfg.bits}-weight-only", "reason":
                          f"{cfg.algorithm}, group {group}, "
                          f"{'symmetric' if q.symmetric else 'asymmetric'}{pad}{stored_note}"})
        if progress is not None:
            progress(f"quantizing weights ({cfg.algorithm})", step + 1, len(nodes))
    if cfg.embeddings:
        _quantize_embeddings(fm, out, index, cfg, names, new_inits, decisions, outcome)
    out.graph.initializer.extend(new_inits)
    drop_unused_initializers(out.graph)
    out = embed_weights(out, fm.weights)
    del out.graph.value_info[:]
    topological_sort(out.graph)
    ensure_opset(out, "com.microsoft", 1)
    out.metadata_props.append(onnx.StringStringEntryProto(
        key="lowbit.decisions", value=json.dumps(decisions, separators=(",", ":"))))
    outcome.model = out
    outcome.decisions = decisions
    return outcome


def layer_group_size(k: int, group_size: int) -> int:
    """The group size used for a layer with K inputs: the requested one, or the smallest
    power of two >= K (at least 16) when K is smaller, so no row is padded past K."""
    if k >= group_size:
        return group_size
    return max(16, 1 << (k - 1).bit_length())


def _quantize_embeddings(fm: FloatModel, out: onnx.ModelProto, index: GraphIndex,
                         cfg: WeightOnlyConfig, names: NameFactory,
                         inits: list[onnx.TensorProto], decisions: list[dict[str, str]],
                         outcome: WeightOnlyOutcome) -> None:
    """Gather on a constant 2-D table (token/position embeddings) -> GatherBlockQuantized:
    blockwise symmetric INT4 (or INT8 when more than 4 bits were asked), dequantized at
    lookup, so the whole file shrinks, not only the MatMuls."""
    bits = 4 if cfg.bits <= 4 else 8
    nodes = list(out.graph.node)
    for i, node in enumerate(nodes):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"Gather_{i}"
        table = node.input[0]
        attrs = node_attrs(node)
        t = index.initializers.get(table)
        if t is None or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or \
                node.input[1] in index.initializers:
            continue
        rows, dim = int(t.dims[0]), int(t.dims[1])
        block = next((b for b in (cfg.group_size, 128, 64, 32, 16) if dim % b == 0), None)
        if attrs.get("axis", 0) != 0 or block is None or rows * dim < 4096:
            why = ("gather axis is not 0" if attrs.get("axis", 0) != 0 else
                   f"embedding width {dim} is not a multiple of 16" if block is None else
                   "table too small to matter")
            decisions.append({"name": name, "op_type": "Gather", "treatment": "float", "reason": why})
            continue
        w = np.asarray(index.constant(table), dtype=np.float32)
        q = rtn(w, bits=bits, group_size=block, symmetric=True)
        codes = q.codes
        data = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else codes
        d_name, s_name = names(f"{table}_q{bits}"), names(f"{table}_scales")
        inits += [numpy_helper.from_array(data, d_name),
                  numpy_helper.from_array(q.scales.astype(np.float32), s_name)]
        new = helper.make_node("GatherBlockQuantized", [d_name, node.input[1], s_name],
                               list(node.output), domain="com.microsoft",
                               name=names(f"{name}_GatherBlockQuantized"), gather_axis=0,
                               quantize_axis=1, block_size=block, bits=bits)
        out.graph.node.remove(node)
        out.graph.node.append(new)
        outcome.layer_error[name] = round(float(
            np.linalg.norm(q.dequantize() - w) / max(np.linalg.norm(w), 1e-30)), 6)
        decisions.append({"name": name, "op_type": "Gather", "treatment":
                          f"int{bits}-weight-only", "reason": f"embedding table, blockwise "
                          f"symmetric, block {block}, dequantized at lookup"})


def _write_node(q: GroupQuantized, stored: int, bias: np.ndarray | None, node: onnx.NodeProto,
                names: NameFactory, inits: list[onnx.TensorProto]) -> list[str]:
    base = node.input[1]
    b_name, s_name = names(f"{base}_q{q.bits}"), names(f"{base}_scales")
    inits.append(numpy_helper.from_array(pack_codes(q.codes, stored, q.group_size), b_name))
    inits.append(numpy_helper.from_array(q.scales.reshape(-1).astype(np.float32), s_name))
    inputs = [node.input[0], b_name, s_name]
    default_zp = 2 ** (stored - 1)
    if not (q.symmetric and stored == q.bits and np.all(q.zero_points == default_zp)):
        z_name = names(f"{base}_zero_points")
        inits.append(numpy_helper.from_array(pack_zero_points(q.zero_points, stored), z_name))
        inputs.append(z_name)
    if bias is not None:
        while len(inputs) < 5:
            inputs.append("")
        bias_name = names(f"{base}_bias")
        inits.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
        inputs.append(bias_name)
    return inputs

