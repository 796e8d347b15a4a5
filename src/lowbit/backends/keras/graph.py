"""The ONNX graph both converters (Keras layers, SavedModel ops) write, with each tensor's
layout.

Keras and TensorFlow keep images channels-last (NHWC); ONNX's Conv and pools, and so
lowbit's NCHW machinery, want channels-first. A converted tensor (a ``Value``) is held in
one or both orders: ``KERAS`` (the source's own order) and, for rank-4 tensors, ``NCHW``.
A layer asks ``Graph.get`` for the order it needs and a Transpose is written the first
time that order is asked for (then reused), so the graph's inputs and outputs keep the
source's shapes, convolutions run channels-first, and Flatten/Reshape/Dense see the
source's element order exactly."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KERAS = "keras"  # the source's own axis order (NHWC for images)
NCHW = "nchw"  # channels first, for a rank-4 tensor
TO_NCHW = (0, 3, 1, 2)
TO_KERAS = (0, 2, 3, 1)
OPSET = 17
IR_VERSION = 8  # the IR version of opset 17


@dataclass
class Value:
    """One tensor of the source model: its ONNX names by layout, its source (Keras)
    shape with None for a dynamic dimension, and its ONNX element type. ``padded``: a
    ZeroPadding's input and its NCHW pads, so a Conv can absorb the padding."""

    names: dict[str, str]
    shape: tuple[int | None, ...]
    dtype: int = TensorProto.FLOAT
    padded: tuple[Value, list[int]] | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return len(self.shape)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def nchw_axis(axis: int, rank: int) -> int:
    """Where the source's axis ``axis`` of a rank-4 tensor sits in NCHW order."""
    return TO_NCHW.index(norm_axis(axis, rank))


def dynamic_dims(shape: tuple[int | None, ...], name: str) -> list[int | str]:
    return [d if isinstance(d, int) and d > 0 else ("batch" if i == 0 else f"{name}_d{i}")
            for i, d in enumerate(shape)]


class Graph:
    """Nodes, initializers and unique names of one ONNX graph being written."""

    def __init__(self, name: str, reserved: tuple[str, ...] | list[str] = ()) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.used: set[str] = set(reserved)
        self.node_names: set[str] = set()
        self._consts: dict[tuple[str, str], str] = {}  # a shared layer's weights, stored once

    def fresh(self, base: str, used: set[str] | None = None) -> str:
        """A tensor name (or, with ``used``, a name in that set) not taken yet."""
        used = self.used if used is None else used
        base = base or "t"
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    def const(self, array: Any, base: str) -> str:
        """An initializer holding ``array``; the same values under the same base name (a
        layer called twice) are stored once."""
        arr = np.ascontiguousarray(array)
        key = (base, f"{arr.dtype}{arr.shape}{hashlib.sha1(arr.tobytes()).hexdigest()}")
        if key not in self._consts:
            self._consts[key] = name = self.fresh(base)
            self.initializers.append(numpy_helper.from_array(arr, name))
        return self._consts[key]

    def node(self, op: str, inputs: list[str], base: str, *, outputs: int = 1,
             **attrs: Any) -> Any:
        """Add one node; its output name (or names, with ``outputs`` > 1)."""
        name = self.fresh(base, self.node_names)  # a Keras layer's node keeps its name
        outs = [self.fresh(name)] if outputs == 1 else \
            [self.fresh(f"{name}:{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def set_const(self, name: str, array: Any, base: str) -> str:
        """``array`` in place of the initializer ``name`` (a folded weight): rewritten where
        nothing else reads it, else a new initializer; the name to read it by."""
        readers = sum(x == name for n in self.nodes for x in n.input)
        tensor = next((t for t in self.initializers if t.name == name), None)
        if tensor is None or readers != 1:
            return self.const(array, base)
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self._consts = {k: v for k, v in self._consts.items() if v != name}
        return name

    def const_value(self, name: str) -> np.ndarray | None:
        tensor = next((t for t in self.initializers if t.name == name), None)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def add_input(self, name: str, dtype: int, shape: tuple[int | None, ...]) -> Value:
        self.used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, dynamic_dims(shape, name)))
        return Value({KERAS: name}, tuple(shape), dtype)

    # ------------------------------------------------------------------ layouts

    def get(self, value: Value, layout: str) -> str:
        """``value``'s ONNX name in ``layout``, writing the Transpose the first time."""
        if layout in value.names:
            return value.names[layout]
        if value.rank != 4:
            raise ValueError(f"a rank-{value.rank} tensor has no NCHW layout")
        have = next(iter(value.names))
        perm = TO_NCHW if layout == NCHW else TO_KERAS
        base = value.names[have] + ("_nchw" if layout == NCHW else "_nhwc")
        value.names[layout] = self.node("Transpose", [value.names[have]], base, perm=list(perm))
        return value.names[layout]

    @staticmethod
    def layout(value: Value) -> str:
        """The layout a layout-free operation (an activation, a scale) runs ``value`` in:
        NCHW where it exists (keeps a conv stack channels-first), else the source's."""
        return NCHW if NCHW in value.names else KERAS

    @staticmethod
    def common_layout(values: list[Value]) -> str:
        if all(v.rank == 4 for v in values) and any(NCHW in v.names for v in values):
            return NCHW
        return KERAS

    @staticmethod
    def axis(layout: str, axis: int, rank: int) -> int:
        return nchw_axis(axis, rank) if layout == NCHW else norm_axis(axis, rank)

    def const_for(self, array: Any, layout: str, rank: int, base: str) -> str:
        """A constant that broadcasts against a rank-``rank`` tensor held in ``layout`` as
        ``array`` broadcasts against it in the source's order."""
        arr = np.asarray(array)
        if layout == NCHW and arr.ndim > 0:
            arr = arr.reshape((1,) * (rank - arr.ndim) + arr.shape).transpose(TO_NCHW)
        return self.const(arr, base)

    def result(self, name: str, layout: str, shape: tuple[int | None, ...],
               dtype: int = TensorProto.FLOAT) -> Value:
        return Value({layout: name}, tuple(shape), dtype)

    # ------------------------------------------------------------------ the model

    def finish(self, outputs: list[tuple[str, Value]], *, doc: str = "") -> onnx.ModelProto:
        """The checked model: ``outputs`` (name, value) in the source's layout, unused
        nodes and initializers dropped, shapes inferred."""
        graph_inputs = {i.name for i in self.inputs}
        renamed: dict[str, str] = {}
        infos = []
        for name, value in outputs:
            src = self.get(value, KERAS)
            producer = next((n for n in self.nodes if src in n.output), None)
            if src in graph_inputs or src in renamed or producer is None:
                self.nodes.append(helper.make_node("Identity", [src], [name],
                                                   name=self.fresh(f"{name}_identity", self.node_names)))
            else:
                renamed[src] = name
            infos.append(helper.make_tensor_value_info(name, value.dtype,
                                                       dynamic_dims(value.shape, name)))
        for node in self.nodes:
            node.input[:] = [renamed.get(x, x) for x in node.input]
            node.output[:] = [renamed.get(x, x) for x in node.output]
        nodes = self._live_nodes([name for name, _ in outputs])
        needed = {x for n in nodes for x in n.input}
        inits = [t for t in self.initializers if t.name in needed]
        graph = helper.make_graph(nodes, self.name, self.inputs, infos, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="lowbit", doc_string=doc)
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)

    def _live_nodes(self, outputs: list[str]) -> list[onnx.NodeProto]:
        wanted, live = set(outputs), []
        for node in reversed(self.nodes):  # nodes are written in topological order
            if any(o in wanted for o in node.output):
                live.append(node)
                wanted.update(x for x in node.input if x)
        return live[::-1]
