"""Structured (channel) pruning that physically shrinks an ONNX float model.

A *producer* (Conv with group 1, or Gemm/MatMul with a constant weight) loses
whole output channels: its weight rows and bias entries are sliced away, so are
the matching entries of every BatchNormalization and constant bias/scale on the
way, and the matching input channels of every *consumer* (Conv weight axis 1,
Gemm/MatMul input-feature axis, and through Flatten the H*W-wide block of
features each channel owns). The smaller model computes exactly what the
original computes with those channels (and their BN shift) zeroed.

A layer is pruned only when every path from its output reaches such a consumer
through channel-preserving ops; anything else (a graph output, a residual Add,
Concat, Reshape, grouped Conv, ...) puts it in ``ChannelPlan.skipped`` with the
reason, so output shapes never change.

Written by hand because onnx/onnxruntime have no channel pruning, and the
torch-side tools (torch-pruning, NNCF) work on modules, not on ONNX graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.backends.onnx.graph import GraphIndex, attr, node_name
from lowbit.backends.onnx.store import SPLIT_MIN_BYTES, FloatModel
from lowbit.config import ChannelImportance, parse_enum
from lowbit.errors import ValidationError

# Ops that apply the same function to every element (any channel axis works).
_ELEMENTWISE = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Dropout", "Identity"}
# Ops that keep channels on axis 1 of an (N, C, ...) tensor.
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool"}
# Binary ops: a bias/scale if the other operand is a constant, a residual join otherwise.
_BINARY = {"Add", "Sub", "Mul", "Div"}
_PRODUCERS = {"Conv", "Gemm", "MatMul"}


@dataclass(frozen=True)
class ChannelPlan:
    """``keep``: producer node -> sorted kept output-channel indices;
    ``skipped``: node -> why it is not pruned."""

    keep: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"keep": {k: [int(i) for i in v] for k, v in self.keep.items()},
                "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelPlan:
        keep = {k: np.asarray(v, dtype=np.int64) for k, v in data.get("keep", {}).items()}
        return cls(keep=keep, skipped=dict(data.get("skipped", {})))


@dataclass(frozen=True)
class _Flow:
    """Where the pruned channels live in a tensor: ``axis`` (-1: last, rank unknown),
    ``rank`` if known, and ``block`` features per channel (H*W after Flatten)."""

    axis: int
    rank: int | None
    block: int = 1

    def on_axis_one(self) -> bool:
        return self.axis == 1 or (self.rank is not None and self.axis % self.rank == 1)

    def on_last_axis(self) -> bool:
        return self.axis == -1 or (self.rank is not None and self.axis == self.rank - 1)


@dataclass
class _Prunable:
    """A producer that can lose channels, and every constant slice that implies."""

    node: onnx.NodeProto
    channels: int
    weight: str
    weight_axis: int  # the producer weight's output-channel axis
    slices: list[tuple[str, int, int]]  # (initializer, axis, block) sliced along the channels
    next_bn: onnx.NodeProto | None  # a BatchNormalization directly after the producer


class _Refused(Exception):
    """Internal: a producer cannot be pruned; the message is the reason."""


def _label(node: onnx.NodeProto) -> str:
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


class _Analyser:
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
            raise _Refused(f"input '{name}' is not a constant initializer")
        if name in self.inputs:
            raise _Refused(f"initializer '{name}' is also a graph input (it could be overridden)")
        if self.uses.get(name, 0) != 1:
            raise _Refused(f"initializer '{name}' is shared by {self.uses.get(name, 0)} nodes")
        return arr

    def analyse(self, node: onnx.NodeProto) -> _Prunable:
        op = node.op_type
        if op == "Conv":
            if attr(node, "group", 1) != 1:
                raise _Refused(f"grouped Conv (group={attr(node, 'group', 1)}): "
                               "its groups would need pruning alike; refused")
            w = self.constant(node.input[1])  # (out, in, kh, kw)
            channels, weight_axis = int(w.shape[0]), 0
            flow = _Flow(axis=1, rank=w.ndim)
            slices = [(node.input[1], 0, 1)]
            if len(node.input) > 2 and node.input[2]:
                self.constant(node.input[2])  # (out,)
                slices.append((node.input[2], 0, 1))
        elif op == "Gemm":
            w = self.constant(node.input[1])
            if w.ndim != 2:
                raise _Refused(f"Gemm weight has rank {w.ndim}, expected 2")
            weight_axis = 0 if attr(node, "transB", 0) else 1  # (N, K) or (K, N)
            channels = int(w.shape[weight_axis])
            flow = _Flow(axis=1, rank=2)
            slices = [(node.input[1], weight_axis, 1)]
            if len(node.input) > 2 and node.input[2]:
                c = self.constant(node.input[2])
                if c.ndim >= 1 and c.shape[-1] == channels:
                    slices.append((node.input[2], c.ndim - 1, 1))
                elif c.size != 1 and not (c.ndim >= 1 and c.shape[-1] == 1):
                    raise _Refused(f"Gemm bias shape {list(c.shape)} does not broadcast per channel")
        elif op == "MatMul":
            w = self.constant(node.input[1])
            if w.ndim != 2:
                raise _Refused(f"MatMul weight has rank {w.ndim}, expected a 2-D (K, N) weight")
            channels, weight_axis = int(w.shape[1]), 1  # (K, N): channels are columns
            shape = self.index.shape(node.output[0])
            flow = _Flow(axis=-1 if shape is None else len(shape) - 1,
                         rank=None if shape is None else len(shape))
            slices = [(node.input[1], 1, 1)]
        else:
            raise _Refused(f"{op} is not a prunable producer (Conv, Gemm, MatMul)")
        consumers = self.index.consumers.get(node.output[0], [])
        next_bn = consumers[0] if len(consumers) == 1 and \
            consumers[0].op_type == "BatchNormalization" else None
        slices += self._trace(node.output[0], flow, channels)
        return _Prunable(node, channels, node.input[1], weight_axis, slices, next_bn)

    def _trace(self, start: str, start_flow: _Flow, channels: int) -> list[tuple[str, int, int]]:
        """Follow the channels from ``start`` to the consumers; every slice it implies."""
        slices: list[tuple[str, int, int]] = []
        pending = [(start, start_flow)]
        while pending:
            tensor, flow = pending.pop()
            if tensor in self.in_subgraph:
                raise _Refused(f"output '{tensor}' is read inside a subgraph (If/Loop/Scan); refused")
            if tensor in self.outputs:
                raise _Refused(f"output reaches graph output '{tensor}': "
                               "pruning would change the model's output shape; refused")
            for node in self.index.consumers.get(tensor, []):
                pending += self._step(node, tensor, flow, channels, slices)
        return slices

    def _step(self, node: onnx.NodeProto, tensor: str, flow: _Flow, channels: int,
              slices: list[tuple[str, int, int]]) -> list[tuple[str, _Flow]]:
        """One consumer of the channel-carrying ``tensor``: the tensors it passes the
        channels on to (empty at a consumer that absorbs them), or refuse."""
        op, label = node.op_type, _label(node)
        width = channels * flow.block
        if op in _ELEMENTWISE:
            if node.input[0] != tensor or tensor in node.input[1:]:
                raise _Refused(f"output is a parameter of {label}; refused")
            if op == "Dropout" and len(node.output) > 1 and node.output[1]:
                raise _Refused(f"output feeds {label} whose mask output is used; refused")
            return [(node.output[0], flow)]
        if op == "BatchNormalization":
            if node.input[0] != tensor or any(node.output[1:]):
                raise _Refused(f"output feeds {label} in training mode; refused")
            if not flow.on_axis_one():
                raise _Refused(f"output feeds {label}, which normalises axis 1 but the "
                               "channels are on another axis; refused")
            for name in node.input[1:5]:
                if self.constant(name).shape != (width,):
                    raise _Refused(f"{label} parameter '{name}' does not have {width} entries")
                slices.append((name, 0, flow.block))
            return [(node.output[0], flow)]
        if op in _POOLS:
            if not flow.on_axis_one() or flow.block != 1:
                raise _Refused(f"output feeds {label} but the channels are not on axis 1; refused")
            if len(node.output) > 1 and node.output[1]:
                raise _Refused(f"output feeds {label} whose indices output is used; refused")
            return [(node.output[0], flow)]
        if op in _BINARY:
            return [(node.output[0], self._binary(node, tensor, flow, width, slices))]
        if op == "Flatten":
            return [(node.output[0], self._flatten(node, flow))]
        if op == "Conv":
            if node.input[0] != tensor or tensor in node.input[1:]:
                raise _Refused(f"output is a parameter of {label}; refused")
            if attr(node, "group", 1) != 1:
                raise _Refused(f"output feeds grouped Conv {node.name} "
                               f"(group={attr(node, 'group', 1)}): its groups would need "
                               "pruning alike; refused")
            if not flow.on_axis_one() or flow.block != 1:
                raise _Refused(f"output feeds {label} but the channels are not on axis 1; refused")
            self._consumer_weight(node, node.input[1], 1, width, flow, slices)
            return []
        if op == "Gemm":
            if node.input[0] != tensor or tensor in node.input[1:] or attr(node, "transA", 0):
                raise _Refused(f"output feeds {label} other than as its untransposed input A; refused")
            axis = 1 if attr(node, "transB", 0) else 0  # (N, K) or (K, N): input features
            self._consumer_weight(node, node.input[1], axis, width, flow, slices)
            return []
        if op == "MatMul":
            if node.input[0] != tensor or tensor in node.input[1:]:
                raise _Refused(f"output feeds {label} as its right operand; refused")
            if not flow.on_last_axis():
                raise _Refused(f"output feeds {label}, which contracts the last axis, but the "
                               "channels are on another axis; refused")
            if self.index.constant(node.input[1]) is None:
                raise _Refused(f"output feeds {label} whose weight is not constant; refused")
            self._consumer_weight(node, node.input[1], 0, width, flow, slices)
            return []
        reasons = {
            "Concat": "channels would shift in the concatenated tensor",
            "Reshape": "a reshape regroups the channels",
            "Transpose": "a transpose moves the channel axis",
            "Softmax": "softmax normalises across the channels",
        }
        why = reasons.get(op, "lowbit cannot slice channels through it")
        raise _Refused(f"output feeds {label}: {why}; refused")

    def _consumer_weight(self, node: onnx.NodeProto, name: str, axis: int, width: int,
                         flow: _Flow, slices: list[tuple[str, int, int]]) -> None:
        w = self.constant(name)
        if w.ndim != 2 and node.op_type != "Conv":
            raise _Refused(f"{_label(node)} weight has rank {w.ndim}, expected 2; refused")
        if w.shape[axis] != width:
            raise _Refused(f"{_label(node)} weight axis {axis} has {w.shape[axis]} entries, "
                           f"expected {width}; refused")
        slices.append((name, axis, flow.block))

    def _binary(self, node: onnx.NodeProto, tensor: str, flow: _Flow, width: int,
                slices: list[tuple[str, int, int]]) -> _Flow:
        """Add/Sub/Mul/Div with a constant operand is a per-channel bias/scale; with two
        computed operands it joins branches (a residual) and is refused."""
        other = [x for x in node.input if x != tensor]
        const = self.index.constant(other[0]) if len(other) == 1 else None
        if const is None:
            raise _Refused(f"output feeds {_label(node)} (residual): pruning would need both "
                           "branches pruned alike; refused")
        const = self.constant(other[0])
        if flow.rank is not None and const.ndim > flow.rank:
            raise _Refused(f"output feeds {_label(node)} whose constant raises the rank; refused")
        if flow.axis == -1:
            at = const.ndim - 1
        elif flow.rank is None:
            raise _Refused(f"output feeds {_label(node)} and the tensor's rank is unknown; refused")
        else:
            at = flow.axis % flow.rank - (flow.rank - const.ndim)
        if at >= 0 and const.shape[at] == width:
            slices.append((other[0], at, flow.block))
        elif at >= 0 and const.shape[at] != 1:
            raise _Refused(f"output feeds {_label(node)} whose constant has shape "
                           f"{list(const.shape)}, not per channel; refused")
        return flow

    def _flatten(self, node: onnx.NodeProto, flow: _Flow) -> _Flow:
        shape = self.index.shape(node.input[0])
        if shape is None:
            raise _Refused(f"output feeds {_label(node)} and its input shape is unknown "
                           "(shape inference could not tell H*W); refused")
        axis = attr(node, "axis", 1) % max(len(shape), 1)
        if axis != 1 or not flow.on_axis_one():
            raise _Refused(f"output feeds {_label(node)} whose axis does not start at the "
                           "channels; refused")
        rest = shape[2:]
        if not all(isinstance(d, int) for d in rest):
            raise _Refused(f"output feeds {_label(node)} and H*W is not known "
                           f"(input shape {shape}); refused")
        return _Flow(axis=1, rank=2, block=flow.block * math.prod(rest))


# ---------------------------------------------------------------- plan


def _validate_options(ratio: float, importance: Any, min_channels: int) -> ChannelImportance:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0.0 <= float(ratio) < 1.0:
        raise ValidationError(f"ratio must be a number in [0, 1), got {ratio!r}")
    mode = parse_enum(ChannelImportance, importance, "importance")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValidationError(f"min_channels must be an integer >= 1, got {min_channels!r}")
    return mode


def _channel_scores(fm: FloatModel, item: _Prunable, mode: ChannelImportance) -> np.ndarray:
    """One score per output channel (higher = more important)."""
    if mode is ChannelImportance.BN:
        if item.next_bn is None:
            raise _Refused(f"importance 'bn' needs a BatchNormalization directly after "
                           f"{_label(item.node)}; none found")
        gamma = fm.constant(item.next_bn.input[1])  # (C,)
        return np.abs(np.asarray(gamma, dtype=np.float64))
    w = np.moveaxis(np.asarray(fm.constant(item.weight), dtype=np.float64), item.weight_axis, 0)
    flat = w.reshape(w.shape[0], -1)  # (channels, everything else)
    if mode is ChannelImportance.L1:
        return np.abs(flat).sum(axis=1)
    return np.sqrt((flat * flat).sum(axis=1))


def _prunable_nodes(fm: FloatModel) -> list[tuple[str, onnx.NodeProto]]:
    return [(node_name(n, i), n) for i, n in enumerate(fm.proto.graph.node)]


def plan_channel_pruning(fm: FloatModel, *, ratio: float, importance: str = "l1",
                         min_channels: int = 1, layers: set[str] | None = None) -> ChannelPlan:
    """Choose which output channels of each prunable layer to keep.

    ``ratio`` of each layer's channels go (rounded, at least ``min_channels`` stay),
    the least important first. ``layers`` limits the producers considered.

    Example::

        plan = plan_channel_pruning(fm, ratio=0.5)
        small = apply_channel_pruning(fm, plan)
    """
    mode = _validate_options(ratio, importance, min_channels)
    nodes = _prunable_nodes(fm)
    if layers is not None:
        unknown = sorted(set(layers) - {k for k, _ in nodes})
        if unknown:
            raise ValidationError(f"layers: no node named {', '.join(map(repr, unknown))}")
    analyser = _Analyser(fm)
    keep: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for key, node in nodes:
        if layers is not None and key not in layers:
            continue
        if node.op_type not in _PRODUCERS:
            if layers is not None:
                skipped[key] = f"{node.op_type} is not a prunable producer (Conv, Gemm, MatMul)"
            continue
        try:
            item = analyser.analyse(node)
            scores = _channel_scores(fm, item, mode)
        except _Refused as exc:
            skipped[key] = str(exc)
            continue
        n = item.channels
        n_keep = min(n, max(min_channels, n - math.floor(ratio * n + 0.5)))
        order = np.argsort(-scores, kind="stable")  # most important first; ties: lower index
        keep[key] = np.sort(order[:n_keep]).astype(np.int64)
    return ChannelPlan(keep=keep, skipped=skipped)


# ---------------------------------------------------------------- apply


def _expand(kept: np.ndarray, block: int) -> np.ndarray:
    """Feature indices of the kept channels when each channel owns ``block`` features."""
    if block == 1:
        return kept
    return (kept[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def apply_channel_pruning(fm: FloatModel, plan: ChannelPlan) -> FloatModel:
    """A new, smaller FloatModel with only ``plan.keep``'s channels; ``fm`` is untouched."""
    by_key = dict(_prunable_nodes(fm))
    analyser = _Analyser(fm)
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key, kept in plan.keep.items():
        node = by_key.get(key)
        if node is None:
            raise ValidationError(f"plan names node {key!r}, which is not in the model")
        try:
            item = analyser.analyse(node)
        except _Refused as exc:
            raise ValidationError(f"plan prunes {key!r}, which cannot be pruned: {exc}") from None
        kept = np.asarray(kept, dtype=np.int64)
        if kept.ndim != 1 or kept.size == 0 or np.any(np.diff(kept) <= 0) \
                or kept[0] < 0 or kept[-1] >= item.channels:
            raise ValidationError(f"plan for {key!r}: kept channels must be sorted, unique, "
                                  f"non-empty indices below {item.channels}")
        if kept.size == item.channels:
            continue
        for name, axis, block in item.slices:
            cuts.setdefault(name, []).append((axis, _expand(kept, block)))

    proto = onnx.ModelProto()
    proto.CopyFrom(fm.proto)
    out = FloatModel(proto, dict(fm.weights))
    if not cuts:
        return out
    for tensor in proto.graph.initializer:
        if tensor.name not in cuts:
            continue
        arr = fm.constant(tensor.name)
        for axis, idx in cuts[tensor.name]:
            arr = np.take(arr, idx, axis=axis)
        arr = np.ascontiguousarray(arr)
        if arr.nbytes >= SPLIT_MIN_BYTES:
            tensor.CopyFrom(out.set_weight(tensor.name, arr))
        else:
            out.weights.pop(tensor.name, None)
            tensor.CopyFrom(numpy_helper.from_array(arr, tensor.name))
    del proto.graph.value_info[:]  # stale channel counts; inferred afresh below
    out.proto = onnx.shape_inference.infer_shapes(proto)
    return out
