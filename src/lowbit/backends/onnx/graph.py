"""Small graph utilities on ONNX protos: lookups, unique names, topological sort."""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


class GraphIndex:
    """Read-only lookups over a graph: producers, consumers, initializers, shapes."""

    def __init__(self, model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None) -> None:
        graph = model.graph
        self.model = model
        self.weights = weights or {}
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_inputs = [i.name for i in graph.input]
        self.graph_outputs = [o.name for o in graph.output]
        self.value_info = {
            v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)
        }

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.weights:
            return self.weights[name]
        tensor = self.initializers.get(name)
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(tensor)

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return int(self.initializers[name].data_type)
        info = self.value_info.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            return None
        return int(info.type.tensor_type.elem_type)

    def shape(self, name: str) -> list[int | str | None] | None:
        if name in self.initializers:
            return list(self.initializers[name].dims)
        info = self.value_info.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return dims_of(info.type.tensor_type)


def dims_of(tensor_type: onnx.TypeProto.Tensor) -> list[int | str | None]:
    """A tensor type's dims: ints, symbolic names, or None when unknown."""
    dims: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


class NameFactory:
    """Fresh tensor/node names that never collide with the graph's."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.used: set[str] = {t.name for t in g.initializer}
        self.used |= {i.name for i in g.input} | {o.name for o in g.output}
        for node in g.node:
            self.used.add(node.name)
            self.used.update(node.input)
            self.used.update(node.output)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node follows its producers (stable)."""
    nodes = list(graph.node)
    available = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    producer_of: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            producer_of[out] = i
    indegree = [0] * len(nodes)
    children: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        deps = {producer_of[x] for x in node.input if x not in available and x in producer_of}
        indegree[i] = len(deps)
        for d in deps:
            children[d].append(i)
    ready = deque(i for i in range(len(nodes)) if indegree[i] == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for c in sorted(children[i]):
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle or a dangling input; cannot sort")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def node_name(node: onnx.NodeProto, position: int) -> str:
    """A node's name, or ``OpType_position`` for an unnamed node (the one naming rule)."""
    return node.name or f"{node.op_type}_{position}"


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """One attribute of ``node`` as a Python value, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (replace) one attribute of ``node``."""
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def drop_unused_initializers(graph: onnx.GraphProto) -> set[str]:
    """Remove initializers no node or graph output reads; returns the names kept in use."""
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return used


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain == domain:
            imp.version = max(imp.version, version)
            return
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))


_SCORE_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "Gemm", "MatMul"})
_THROUGH_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Add", "Cast"})


def outputs_class_scores(model: onnx.ModelProto) -> bool:
    """Whether the first output looks like class scores: made by a Softmax/Sigmoid or a
    final Gemm/MatMul (+ bias), through reshapes. A pooled or normalised embedding (Div,
    ReduceMean, ...) is not, and arg-max agreement means nothing for it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = model.graph.output[0].name if model.graph.output else ""
    for _ in range(8):
        node = producer.get(name)
        if node is None or node.op_type not in _SCORE_OPS | _THROUGH_OPS:
            return False
        if node.op_type in _SCORE_OPS:
            return True
        name = node.input[0]
    return False
