"""What every ONNX writer shares: a working copy of the graph, fresh names, and the
finishing steps (drop dead constants, embed weights, sort, opsets, metadata)."""

from __future__ import annotations

import json
from typing import Any

import onnx
from onnx import numpy_helper

from lowbit.backends.onnx.graph import (
    NameFactory,
    drop_unused_initializers,
    ensure_opset,
    node_name,
    topological_sort,
)
from lowbit.backends.onnx.store import FloatModel, embed_weights, is_reference
from lowbit.quant.plan import QuantizationPlan


class GraphWriter:
    def __init__(self, fm: FloatModel) -> None:
        self.fm = fm
        self.model = onnx.ModelProto()
        self.model.CopyFrom(fm.proto)  # light: large weights live in fm.weights
        self.graph = self.model.graph
        self.names = NameFactory(self.model)
        self.by_name = {node_name(n, i): n for i, n in enumerate(self.graph.node)}
        self._new_nodes: list[onnx.NodeProto] = []
        self._new_inits: list[onnx.TensorProto] = []

    def const(self, base: str, value: Any) -> str:
        name = self.names(base)
        self._new_inits.append(numpy_helper.from_array(value, name))
        return name

    def add(self, node: onnx.NodeProto) -> None:
        self._new_nodes.append(node)

    def nodes(self) -> list[onnx.NodeProto]:
        """The graph's nodes and those added so far."""
        return list(self.graph.node) + self._new_nodes

    def remove(self, node: onnx.NodeProto) -> None:
        self.graph.node.remove(node)

    def rename_input(self, old: str, new: str) -> None:
        """Every node reading ``old`` reads ``new`` instead."""
        for node in self.nodes():
            for k, x in enumerate(node.input):
                if x == old:
                    node.input[k] = new

    def rename_output(self, old: str, new: str) -> None:
        """The node producing ``old`` produces ``new`` instead."""
        for node in self.nodes():
            for k, x in enumerate(node.output):
                if x == old:
                    node.output[k] = new

    def finish(self, plan: QuantizationPlan) -> onnx.ModelProto:
        self.graph.node.extend(self._new_nodes)
        self.graph.initializer.extend(self._new_inits)
        self._new_nodes, self._new_inits = [], []
        drop_unused_initializers(self.graph)
        if any(is_reference(t) for t in self.graph.initializer):
            self.model = embed_weights(self.model, self.fm.weights)
            self.graph = self.model.graph
        del self.graph.value_info[:]  # stale after renames
        topological_sort(self.graph)
        ensure_opset(self.model, "", 13)
        if any(n.domain == "com.microsoft" for n in self.graph.node):
            ensure_opset(self.model, "com.microsoft", 1)
        meta = {"lowbit.decisions": json.dumps(plan.decision_dicts(), separators=(",", ":")),
                **{f"lowbit.{k}": json.dumps(v) for k, v in plan.metadata.items()}}
        existing = {p.key: p for p in self.model.metadata_props}
        for key, value in meta.items():
            if key in existing:
                existing[key].value = value
            else:
                self.model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        return self.model

