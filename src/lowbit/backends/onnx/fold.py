"""Float graph simplifications done when a model is loaded.

BatchNormalization after a Conv is folded into the Conv's weight and bias
(inference-time BN is an affine per-channel map), so the Conv can be
quantized with BN's scale inside its per-channel weight scales. Gemm's alpha
and beta are folded into its constants.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.backends.onnx.graph import GraphIndex, NameFactory, attr, drop_unused_initializers, set_attr
from lowbit.backends.onnx.store import FloatModel


def fold_batchnorm(fm: FloatModel) -> int:
    """Fold Conv+BatchNormalization in ``fm`` (in place); return how many were folded."""
    out = fm.proto
    index = GraphIndex(out, fm.weights)
    names = NameFactory(out)
    graph = out.graph
    outputs = set(index.graph_outputs)
    folded = 0
    new_inits: list[onnx.TensorProto] = []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or any(bn.output[1:]):
            continue
        conv = index.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.output[0] in outputs:
            continue
        if len(index.consumers.get(conv.output[0], [])) != 1:
            continue
        consts = [index.constant(x) for x in bn.input[1:5]]
        w = index.constant(conv.input[1])
        if w is None or any(c is None for c in consts):
            continue
        gamma, beta, mean, var = (np.asarray(c, dtype=np.float64) for c in consts)  # (C,)
        eps = 1e-5
        for a in bn.attribute:
            if a.name == "epsilon":
                eps = a.f
        factor = gamma / np.sqrt(var + eps)  # (C,)
        b = index.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        b = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        new_w = (w.astype(np.float64) * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = ((b - mean) * factor + beta).astype(np.float32)
        w_name, b_name = names(f"{conv.input[1]}_bnfolded"), names(f"{bn.name or 'bn'}_bias_folded")
        new_inits += [fm.set_weight(w_name, new_w), numpy_helper.from_array(new_b, b_name)]
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, w_name, b_name])
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
        folded += 1
    if folded:
        graph.initializer.extend(new_inits)
        used = drop_unused_initializers(graph)
        fm.weights = {k: v for k, v in fm.weights.items() if k in used}
        del graph.value_info[:]
        fm.proto = onnx.shape_inference.infer_shapes(out)
    return folded


def fold_gemm_scalars(fm: FloatModel) -> int:
    """Fold each Gemm's alpha into its constant weight and beta into its constant bias
    (in place) and set them to 1, so nothing downstream has to handle them. Returns how
    many Gemms changed."""
    index = GraphIndex(fm.proto, fm.weights)
    names = NameFactory(fm.proto)
    changed = 0
    for node in fm.proto.graph.node:
        if node.op_type != "Gemm":
            continue
        for attr_name, k in (("alpha", 1), ("beta", 2)):
            factor = float(attr(node, attr_name, 1.0))
            value = index.constant(node.input[k]) if len(node.input) > k and node.input[k] else None
            if factor == 1.0 or value is None or value.dtype != np.float32:
                continue
            new_name = names(f"{node.input[k]}_{attr_name}_folded")
            scaled = (value * np.float32(factor)).astype(np.float32)
            fm.proto.graph.initializer.append(fm.tensor(new_name, scaled))
            node.input[k] = new_name
            set_attr(node, attr_name, 1.0)
            changed += 1
    if changed:
        used = drop_unused_initializers(fm.proto.graph)
        fm.weights = {k: v for k, v in fm.weights.items() if k in used}
    return changed
