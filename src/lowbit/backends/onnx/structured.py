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

from lowbit.backends.onnx.channel_flow import PRODUCERS, ChannelAnalyser, Prunable, Refused, node_label
from lowbit.backends.onnx.graph import node_name
from lowbit.backends.onnx.store import FloatModel
from lowbit.config import ChannelImportance, parse_enum
from lowbit.errors import ValidationError
from lowbit.runtime.environment import cpu_info


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


# ---------------------------------------------------------------- plan


def _validate_options(ratio: float, importance: Any, min_channels: int) -> ChannelImportance:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0.0 <= float(ratio) < 1.0:
        raise ValidationError(f"ratio must be a number in [0, 1), got {ratio!r}")
    mode = parse_enum(ChannelImportance, importance, "importance")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValidationError(f"min_channels must be an integer >= 1, got {min_channels!r}")
    return mode


def _channel_scores(fm: FloatModel, item: Prunable, mode: ChannelImportance) -> np.ndarray:
    """One score per output channel (higher = more important)."""
    if mode is ChannelImportance.BN:
        if item.next_bn is None:
            raise Refused(f"importance 'bn' needs a BatchNormalization directly after "
                           f"{node_label(item.node)}; none found")
        gamma = fm.constant(item.next_bn.input[1])  # (C,)
        return np.abs(np.asarray(gamma, dtype=np.float64))
    w = np.moveaxis(np.asarray(fm.constant(item.weight), dtype=np.float64), item.weight_axis, 0)
    flat = w.reshape(w.shape[0], -1)  # (channels, everything else)
    if mode is ChannelImportance.L1:
        return np.abs(flat).sum(axis=1)
    return np.sqrt((flat * flat).sum(axis=1))


def _prunable_nodes(fm: FloatModel) -> list[tuple[str, onnx.NodeProto]]:
    return [(node_name(n, i), n) for i, n in enumerate(fm.proto.graph.node)]


def conv_channel_block() -> int:
    """The channel block of ONNX Runtime's fast float convolutions on this CPU (its NCHWc
    layout: 16 floats per vector with AVX-512, else 8). A Conv whose channel count is a
    multiple of it runs that path; measured on the 28x28 digits CNN (batch 64, 1
    thread, AVX2), 8 and 16 channels ran 3.2x and 1.7x the 32-channel model's speed,
    while 9-14 channels ran only 1.1-1.4x."""
    return 16 if cpu_info().get("avx512") else 8


def kept_channels(n: int, ratio: float, min_channels: int, block: int) -> int:
    """How many of ``n`` channels stay when ``ratio`` go: rounded to a multiple of
    ``block`` (at least one block) when ``n`` is a multiple of two blocks or more."""
    n_keep = min(n, max(min_channels, n - math.floor(ratio * n + 0.5)))
    if block > 1 and n % block == 0 and n >= 2 * block and ratio > 0:
        n_keep = min(n, max(block, min_channels, int(round(n_keep / block)) * block))
    return n_keep


def plan_channel_pruning(fm: FloatModel, *, ratio: float, importance: str = "l1",
                         min_channels: int = 1, layers: set[str] | None = None,
                         channel_block: int = 1) -> ChannelPlan:
    """Choose which output channels of each prunable layer to keep.

    ``ratio`` of each layer's channels go (rounded, at least ``min_channels`` stay),
    the least important first. ``layers`` limits the producers considered. A Conv keeps
    a multiple of ``channel_block`` channels (``kept_channels``; 1: exactly the ratio).

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
    analyser = ChannelAnalyser(fm)
    keep: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for key, node in nodes:
        if layers is not None and key not in layers:
            continue
        if node.op_type not in PRODUCERS:
            if layers is not None:
                skipped[key] = f"{node.op_type} is not a prunable producer (Conv, Gemm, MatMul)"
            continue
        try:
            item = analyser.analyse(node)
            scores = _channel_scores(fm, item, mode)
        except Refused as exc:
            skipped[key] = str(exc)
            continue
        n = item.channels
        n_keep = kept_channels(n, ratio, min_channels,
                               channel_block if node.op_type == "Conv" else 1)
        order = np.argsort(-scores, kind="stable")  # most important first; ties: lower index
        keep[key] = np.sort(order[:n_keep]).astype(np.int64)
    return ChannelPlan(keep=keep, skipped=skipped)


# ---------------------------------------------------------------- apply


def _expand(kept: np.ndarray, block: int, repeat: int, channels: int) -> np.ndarray:
    """Feature indices of the kept channels when each channel owns ``block`` consecutive
    features, in each of ``repeat`` groups of ``channels * block`` (``channel_flow._Flow``)."""
    if block == 1 and repeat == 1:
        return kept
    one = (kept[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return (np.arange(repeat)[:, None] * (channels * block) + one[None, :]).reshape(-1)


def apply_channel_pruning(fm: FloatModel, plan: ChannelPlan) -> FloatModel:
    """A new, smaller FloatModel with only ``plan.keep``'s channels; ``fm`` is untouched."""
    by_key = dict(_prunable_nodes(fm))
    analyser = ChannelAnalyser(fm)
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key, kept in plan.keep.items():
        node = by_key.get(key)
        if node is None:
            raise ValidationError(f"plan names node {key!r}, which is not in the model")
        try:
            item = analyser.analyse(node)
        except Refused as exc:
            raise ValidationError(f"plan prunes {key!r}, which cannot be pruned: {exc}") from None
        kept = np.asarray(kept, dtype=np.int64)
        if kept.ndim != 1 or kept.size == 0 or np.any(np.diff(kept) <= 0) \
                or kept[0] < 0 or kept[-1] >= item.channels:
            raise ValidationError(f"plan for {key!r}: kept channels must be sorted, unique, "
                                  f"non-empty indices below {item.channels}")
        if kept.size == item.channels:
            continue
        for name, axis, block, repeat in item.slices:
            cuts.setdefault(name, []).append((axis, _expand(kept, block, repeat, item.channels)))

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
        tensor.CopyFrom(out.tensor(tensor.name, np.ascontiguousarray(arr)))
    del proto.graph.value_info[:]  # stale channel counts; inferred afresh below
    out.proto = onnx.shape_inference.infer_shapes(proto)
    return out
