"""SmoothQuant-style scale migration (Xiao et al., 2023) for dynamic INT8 MatMuls.

Activations of transformers carry a few outlier channels; one per-tensor INT8
scale then leaves every other channel a handful of levels. For each MatMul
input X (shared by all MatMuls that read it) with per-channel absmax a_j, and
the consumers' weight rows with absmax w_j, s_j = a_j^alpha / w_j^(1-alpha):
X is divided by s (an inserted Mul) and each weight row j multiplied by s_j.
The float function is unchanged; the outliers move into the weights, which
are quantized per output channel and absorb them far better.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.backends.onnx.calibrate import expose_tensors
from lowbit.backends.onnx.graph import (
    GraphIndex,
    NameFactory,
    attr,
    drop_unused_initializers,
    topological_sort,
)
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import weighted_nodes
from lowbit.data import Dataset


def _matmul_consumers(fm: FloatModel) -> dict[str, list[onnx.NodeProto]]:
    """MatMul/Gemm layers with a usable constant weight, grouped by their input."""
    constants = {t.name for t in fm.proto.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for item in weighted_nodes(fm)[0]:
        if item.op_type in ("MatMul", "Gemm") and item.node.input[0] not in constants:
            groups.setdefault(item.node.input[0], []).append(item.node)
    return groups


def _trans_b(node: onnx.NodeProto) -> bool:
    return node.op_type == "Gemm" and bool(attr(node, "transB", 0))


def channel_absmax(fm: FloatModel, tensors: list[str], data: Dataset, batch_size: int = 16,
                   threads: int = 1) -> dict[str, np.ndarray]:
    index = GraphIndex(fm.proto, fm.weights)
    from_graph = [t for t in tensors if t not in index.graph_inputs]
    session = make_session(expose_tensors(fm, from_graph), threads=threads, lean=True,
                           name="model (SmoothQuant statistics)")
    out: dict[str, np.ndarray] = {}
    for feed in data.batches(batch_size):
        values = dict(zip(from_graph, session.run(from_graph, feed))) if from_graph else {}
        values.update({t: feed[t] for t in tensors if t in feed})  # graph inputs
        for name, value in values.items():
            arr = np.asarray(value, dtype=np.float32)
            v = np.abs(arr).reshape(-1, arr.shape[-1]).max(axis=0)
            out[name] = v if name not in out else np.maximum(out[name], v)
    return out


def smoothing_statistics(fm: FloatModel, data: Dataset, *, threads: int = 1
                         ) -> dict[str, np.ndarray]:
    """Per-channel absmax of every MatMul/Gemm input that ``smooth`` would scale (one
    pass over ``data``, shared by every alpha tried)."""
    groups = _matmul_consumers(fm)
    return channel_absmax(fm, list(groups), data, threads=threads) if groups else {}


def smooth(fm: FloatModel, data: Dataset, *, alpha: float = 0.5, threads: int = 1,
           statistics: dict[str, np.ndarray] | None = None) -> tuple[FloatModel, int]:
    """A numerically equivalent float model with activation outliers moved into weights.
    Returns (model, number of smoothed MatMul inputs). ``statistics``: from
    ``smoothing_statistics`` on the same model, to skip the pass over ``data``."""
    groups = _matmul_consumers(fm)
    if not groups:
        return fm, 0
    amax = statistics if statistics is not None else \
        channel_absmax(fm, list(groups), data, threads=threads)
    proto = onnx.ModelProto()
    proto.CopyFrom(fm.proto)
    out = FloatModel(proto, dict(fm.weights))
    names = NameFactory(proto)
    index = GraphIndex(fm.proto, fm.weights)
    new_nodes, new_inits, smoothed = [], [], 0
    for x, nodes in groups.items():
        a = amax.get(x)
        if a is None:
            continue
        ws = [np.asarray(index.constant(n.input[1]), dtype=np.float32) for n in nodes]
        ws = [w.T if _trans_b(n) else w for n, w in zip(nodes, ws)]  # all (K, N)
        w_max = np.max(np.stack([np.abs(w).max(axis=1) for w in ws]), axis=0)  # (K,)
        s = np.power(np.maximum(a, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-3, 1e3).astype(np.float32)
        inv = names(f"{x}_smooth_inv")
        y = names(f"{x}_smoothed")
        new_inits.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        new_nodes.append(helper.make_node("Mul", [x, inv], [y], name=names(f"{x}_SmoothMul")))
        for node, w in zip(nodes, ws):
            target = proto.graph.node[[i for i, n in enumerate(fm.proto.graph.node) if n is node][0]]
            scaled = (w * s[:, None]).astype(np.float32)
            if _trans_b(node):
                scaled = np.ascontiguousarray(scaled.T)
            w_name = names(f"{node.input[1]}_smoothed")
            new_inits.append(out.tensor(w_name, scaled))
            target.input[0], target.input[1] = y, w_name
        smoothed += 1
    proto.graph.node.extend(new_nodes)
    proto.graph.initializer.extend(new_inits)
    used = drop_unused_initializers(proto.graph)
    out.weights = {k: v for k, v in out.weights.items() if k in used}
    topological_sort(proto.graph)
    return out, smoothed
