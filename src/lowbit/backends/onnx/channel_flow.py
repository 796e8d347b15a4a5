"""Which channels of a Conv/Gemm/MatMul can be removed, and every constant slice that
implies: follows each producer's output through channel-preserving ops to the
consumers whose input channels shrink with it (see ``structured``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from lowbit.backends.onnx.graph import GraphIndex, attr
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import weighted_node

# Ops that apply the same function to every element (any channel axis works).
_ELEMENTWISE = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Dropout", "Identity"}
# Ops that keep channels on axis 1 of an (N, C, ...) tensor.
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool"}
# Binary ops: a bias/scale if the other operand is a constant, a residual join otherwise.
_BINARY = {"Add", "Sub", "Mul", "Div"}
PRODUCERS = {"Conv", "Gemm", "MatMul"}


@dataclass(frozen=True)
class _Flow:
    """Where the pruned channels live in a tensor: ``axis`` (-1: last, rank unknown),
    ``rank`` if known, and after a Flatten, ``block`` consecutive features per channel
    (H*W from NCHW) repeated ``repeat`` times (H*W from NHWC: channel c owns features
    c, C + c, 2C + c, ...)."""

    axis: int
    rank: int | None
    block: int = 1
    repeat: int = 1

    def on_axis_one(self) -> bool:
        return self.axis == 1 or (self.rank is not None and self.axis % self.rank == 1)

    def on_last_axis(self) -> bool:
        return self.axis == -1 or (self.rank is not None and self.axis == self.rank - 1)


@dataclass
class Prunable:
    """A producer that can lose channels, and every constant slice that implies."""

    node: onnx.NodeProto
    channels: int
    weight: str
    weight_axis: int  # the producer weight's output-channel axis
    slices: list[tuple[str, int, int, int]]  # (initializer, axis, block, repeat) sliced
    next_bn: onnx.NodeProto | None  # a BatchNormalization directly after the producer


class Refused(Exception):
    """Internal: a producer cannot be pruned; the message is the reason."""


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the nodes of ``graph`` (and their subgraphs) read."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for a in node.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                names |= _names_read(sub)
    return names


# ---------------------------------------------------------------- analysis


class ChannelAnalyser:
    def __init__(self, fm: FloatModel) -> None:
        self.fm = fm
        self.index = GraphIndex(fm.proto, fm.weights)
        self.outputs = set(self.index.graph_outputs)
        self.inputs = set(self.index.graph_inputs)
        self.uses: dict[str, int] = {}
        self.in_subgraph: set[str] = set()  # outer names read inside If/Loop/Scan bodies
        for node in fm.proto.graph.node:
            for name in set(node.input):
                self.uses[name] = self.uses.get(name, 0) + 1
            for a in node.attribute:
                for sub in [a.g] if a.HasField("g") else list(a.graphs):
                    self.in_subgraph |= _names_read(sub)
        for name in self.in_subgraph:
            self.uses[name] = self.uses.get(name, 0) + 1

    def constant(self, name: str) -> np.ndarray:
        """A constant initializer used by exactly one node (safe to slice), or refuse."""
        arr = self.index.constant(name) if name else None
        if arr is None:
            raise Refused(f"input '{name}' is not a constant initializer")
        if name in self.inputs:
            raise Refused(f"initializer '{name}' is also a graph input (it could be overridden)")
        if self.uses.get(name, 0) != 1:
            raise Refused(f"initializer '{name}' is shared by {self.uses.get(name, 0)} nodes")
        return arr

    def analyse(self, node: onnx.NodeProto) -> Prunable:
        item = weighted_node(node, 0, self.index)  # the one "has a constant weight" rule
        if isinstance(item, str):
            raise Refused(item)
        if node.op_type == "Conv" and attr(node, "group", 1) != 1:
            raise Refused(f"grouped Conv (group={attr(node, 'group', 1)}): "
                          "its groups would need pruning alike; refused")
        w = self.constant(item.weight)  # slicing also needs it unshared and not an input
        channels = int(w.shape[item.out_axis])
        slices = [(item.weight, item.out_axis, 1, 1)]
        if node.op_type == "MatMul":  # (K, N): channels are columns, on the output's last axis
            shape = self.index.shape(node.output[0])
            flow = _Flow(axis=-1 if shape is None else len(shape) - 1,
                         rank=None if shape is None else len(shape))
        else:  # Conv (out, in, kh, kw) and Gemm: channels on axis 1 of the output
            flow = _Flow(axis=1, rank=w.ndim if node.op_type == "Conv" else 2)
        if item.bias is not None:
            c = self.constant(item.bias)
            if c.ndim >= 1 and c.shape[-1] == channels:
                slices.append((item.bias, c.ndim - 1, 1, 1))
            elif c.size != 1 and not (c.ndim >= 1 and c.shape[-1] == 1):
                raise Refused(f"{node.op_type} bias shape {list(c.shape)} does not broadcast "
                              "per channel")
        consumers = self.index.consumers.get(node.output[0], [])
        next_bn = consumers[0] if len(consumers) == 1 and \
            consumers[0].op_type == "BatchNormalization" else None
        slices += self._trace(node.output[0], flow, channels)
        return Prunable(node, channels, item.weight, item.out_axis, slices, next_bn)

    def _trace(self, start: str, start_flow: _Flow, channels: int
               ) -> list[tuple[str, int, int, int]]:
        """Follow the channels from ``start`` to the consumers; every slice it implies."""
        slices: list[tuple[str, int, int, int]] = []
        pending = [(start, start_flow)]
        while pending:
            tensor, flow = pending.pop()
            if tensor in self.in_subgraph:
                raise Refused(f"output '{tensor}' is read inside a subgraph (If/Loop/Scan); refused")
            if tensor in self.outputs:
                raise Refused(f"output reaches graph output '{tensor}': "
                               "pruning would change the model's output shape; refused")
            for node in self.index.consumers.get(tensor, []):
                pending += self._step(node, tensor, flow, channels, slices)
        return slices

    def _step(self, node: onnx.NodeProto, tensor: str, flow: _Flow, channels: int,
              slices: list[tuple[str, int, int, int]]) -> list[tuple[str, _Flow]]:
        """One consumer of the channel-carrying ``tensor``: the tensors it passes the
        channels on to (empty at a consumer that absorbs them), or refuse."""
        op, label = node.op_type, node_label(node)
        width = channels * flow.block * flow.repeat
        if op in _ELEMENTWISE:
            if node.input[0] != tensor or tensor in node.input[1:]:
                raise Refused(f"output is a parameter of {label}; refused")
            if op == "Dropout" and len(node.output) > 1 and node.output[1]:
                raise Refused(f"output feeds {label} whose mask output is used; refused")
            return [(node.output[0], flow)]
        if op == "BatchNormalization":
            if node.input[0] != tensor or any(node.output[1:]):
                raise Refused(f"output feeds {label} in training mode; refused")
            if not flow.on_axis_one():
                raise Refused(f"output feeds {label}, which normalises axis 1 but the "
                               "channels are on another axis; refused")
            for name in node.input[1:5]:
                if self.constant(name).shape != (width,):
                    raise Refused(f"{label} parameter '{name}' does not have {width} entries")
                slices.append((name, 0, flow.block, flow.repeat))
            return [(node.output[0], flow)]
        if op in _POOLS:
            if not flow.on_axis_one() or flow.block != 1:
                raise Refused(f"output feeds {label} but the channels are not on axis 1; refused")
            if len(node.output) > 1 and node.output[1]:
                raise Refused(f"output feeds {label} whose indices output is used; refused")
            return [(node.output[0], flow)]
        if op in _BINARY:
            return [(node.output[0], self._binary(node, tensor, flow, width, slices))]
        if op == "Flatten":
            return [(node.output[0], self._flatten(node, flow))]
        if op == "Transpose" and flow.rank is not None and flow.block == flow.repeat == 1:
            perm = list(attr(node, "perm", list(reversed(range(flow.rank)))))
            return [(node.output[0], _Flow(axis=perm.index(flow.axis % flow.rank),
                                           rank=flow.rank))]
        if op == "Conv":
            if node.input[0] != tensor or tensor in node.input[1:]:
                raise Refused(f"output is a parameter of {label}; refused")
            if attr(node, "group", 1) != 1:
                raise Refused(f"output feeds grouped Conv {node.name} "
                               f"(group={attr(node, 'group', 1)}): its groups would need "
                               "pruning alike; refused")
            if not flow.on_axis_one() or flow.block != 1:
                raise Refused(f"output feeds {label} but the channels are not on axis 1; refused")
            self._consumer_weight(node, node.input[1], 1, width, flow, slices)
            return []
        if op == "Gemm":
            if node.input[0] != tensor or tensor in node.input[1:] or attr(node, "transA", 0):
                raise Refused(f"output feeds {label} other than as its untransposed input A; refused")
            axis = 1 if attr(node, "transB", 0) else 0  # (N, K) or (K, N): input features
            self._consumer_weight(node, node.input[1], axis, width, flow, slices)
            return []
        if op == "MatMul":
            if node.input[0] != tensor or tensor in node.input[1:]:
                raise Refused(f"output feeds {label} as its right operand; refused")
            if not flow.on_last_axis():
                raise Refused(f"output feeds {label}, which contracts the last axis, but the "
                               "channels are on another axis; refused")
            if self.index.constant(node.input[1]) is None:
                raise Refused(f"output feeds {label} whose weight is not constant; refused")
            self._consumer_weight(node, node.input[1], 0, width, flow, slices)
            return []
        reasons = {
            "Concat": "channels would shift in the concatenated tensor",
            "Reshape": "a reshape regroups the channels",
            "Transpose": "a transpose moves the channel axis",
            "Softmax": "softmax normalises across the channels",
        }
        why = reasons.get(op, "lowbit cannot slice channels through it")
        raise Refused(f"output feeds {label}: {why}; refused")

    def _consumer_weight(self, node: onnx.NodeProto, name: str, axis: int, width: int,
                         flow: _Flow, slices: list[tuple[str, int, int, int]]) -> None:
        w = self.constant(name)
        if w.ndim != 2 and node.op_type != "Conv":
            raise Refused(f"{node_label(node)} weight has rank {w.ndim}, expected 2; refused")
        if w.shape[axis] != width:
            raise Refused(f"{node_label(node)} weight axis {axis} has {w.shape[axis]} entries, "
                           f"expected {width}; refused")
        slices.append((name, axis, flow.block, flow.repeat))

    def _binary(self, node: onnx.NodeProto, tensor: str, flow: _Flow, width: int,
                slices: list[tuple[str, int, int, int]]) -> _Flow:
        """Add/Sub/Mul/Div with a constant operand is a per-channel bias/scale; with two
        computed operands it joins branches (a residual) and is refused."""
        other = [x for x in node.input if x != tensor]
        const = self.index.constant(other[0]) if len(other) == 1 else None
        if const is None:
            raise Refused(f"output feeds {node_label(node)} (residual): pruning would need both "
                           "branches pruned alike; refused")
        const = self.constant(other[0])
        if flow.rank is not None and const.ndim > flow.rank:
            raise Refused(f"output feeds {node_label(node)} whose constant raises the rank; refused")
        if flow.axis == -1:
            at = const.ndim - 1
        elif flow.rank is None:
            raise Refused(f"output feeds {node_label(node)} and the tensor's rank is unknown; refused")
        else:
            at = flow.axis % flow.rank - (flow.rank - const.ndim)
        if at >= 0 and const.shape[at] == width:
            slices.append((other[0], at, flow.block, flow.repeat))
        elif at >= 0 and const.shape[at] != 1:
            raise Refused(f"output feeds {node_label(node)} whose constant has shape "
                           f"{list(const.shape)}, not per channel; refused")
        return flow

    def _flatten(self, node: onnx.NodeProto, flow: _Flow) -> _Flow:
        shape = self.index.shape(node.input[0])
        if shape is None:
            raise Refused(f"output feeds {node_label(node)} and its input shape is unknown "
                           "(shape inference could not tell H*W); refused")
        axis = attr(node, "axis", 1) % max(len(shape), 1)
        at = flow.axis % len(shape) if flow.rank is not None else -1
        if axis != 1 or at < 1 or flow.block != 1 or flow.repeat != 1:
            raise Refused(f"output feeds {node_label(node)} whose axis does not start at the "
                           "channels; refused")
        inner, outer = shape[at + 1:], shape[1:at]
        if not all(isinstance(d, int) for d in (*inner, *outer)):
            raise Refused(f"output feeds {node_label(node)} and H*W is not known "
                           f"(input shape {shape}); refused")
        return _Flow(axis=1, rank=2, block=math.prod(inner), repeat=math.prod(outer))
