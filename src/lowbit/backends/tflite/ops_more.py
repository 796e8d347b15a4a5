"""Emitters for data-movement ops with constant operands: Slice, Split, DepthToSpace, Tile,
Gather, Expand. They run in float on the stored layout (``tensors.py``) where the op
allows it, else on the logical order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.graph import attr
from lowbit.backends.tflite.tensors import identity
from lowbit.errors import UnsupportedOpError

INT_MAX = 2**31 - 1


def _fail(w: Any, name: str, op: str, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"{w.source}: node {name!r} ({op}) cannot be written to TFLite: {why}")


def _const(w: Any, node: onnx.NodeProto, k: int) -> np.ndarray | None:
    return w.constant(node.input[k]) if len(node.input) > k and node.input[k] else None



def slice_(w: Any, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    shape = w.t.shapes[x]
    rank = len(shape)
    starts, ends = _const(w, node, 1), _const(w, node, 2)
    axes, steps = _const(w, node, 3), _const(w, node, 4)
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) \
            or (len(node.input) > 4 and node.input[4] and steps is None):
        raise _fail(w, name, "Slice", "starts, ends, axes and steps must be constants")
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(axes) if steps is None else [int(s) for s in steps]
    if any(s < 1 for s in steps) or (0 in axes and x in w.t.dynamic_batch):
        raise _fail(w, name, "Slice", "negative steps or a slice of the batch axis")
    perm = w.t.layout(x)
    begin, end, stride = [0] * rank, [0] * rank, [1] * rank
    full = (1 << rank) - 1  # begin/end masks: every physical axis whole unless sliced
    for a, s0, e0, st in zip(axes, starts, ends, steps):
        j = perm.index(a)
        n = shape[a]
        s0, e0 = int(s0), int(e0)
        s0 = min(max(s0 + n if s0 < 0 else s0, 0), n)
        e0 = min(max(e0 + n if e0 < 0 else e0, 0), n)
        begin[j], end[j], stride[j] = s0, e0, st
        full &= ~(1 << j)
    xin = w.t.float_of(x)
    y = w.t.new_float(out, perm)
    consts = [w.b.constant(f"{name}/{k}", np.asarray(v, np.int32))
              for k, v in (("begin", begin), ("end", end), ("strides", stride))]
    w.b.op("STRIDED_SLICE", [xin, *consts], [y], *w.b.options(
        "StridedSliceOptions", beginMask=full, endMask=full))


def split(w: Any, node: onnx.NodeProto, name: str) -> None:
    x = node.input[0]
    rank = len(w.t.shapes[x])
    axis = int(attr(node, "axis", 0)) % rank
    sizes = _const(w, node, 1)
    if sizes is None:
        sizes = attr(node, "split", None)
    if sizes is None:
        parts = len(node.output)
        if w.t.shapes[x][axis] % parts:
            raise _fail(w, name, "Split", "unequal parts without sizes")
        sizes = [w.t.shapes[x][axis] // parts] * parts
    if axis == 0 and x in w.t.dynamic_batch:
        raise _fail(w, name, "Split", "a split of the batch axis")
    perm = w.t.layout(x)
    xin = w.t.float_of(x)
    ys = [w.t.new_float(o, perm) for o in node.output]
    w.b.op("SPLIT_V", [xin, w.b.constant(f"{name}/sizes", np.asarray(sizes, np.int32)),
                       w.b.constant(f"{name}/axis", np.asarray(perm.index(axis), np.int32))],
           ys, *w.b.options("SplitVOptions", numSplits=len(node.output)))


def depth_to_space(w: Any, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    mode = attr(node, "mode", b"DCR")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "DCR":
        raise _fail(w, name, "DepthToSpace", "mode CRD (TFLite's is DCR)")
    nhwc = (0, 2, 3, 1)
    xin = w.t.to_layout(x, nhwc)
    y = w.t.new_float(out, nhwc)
    w.b.op("DEPTH_TO_SPACE", [xin], [y], *w.b.options(
        "DepthToSpaceOptions", blockSize=int(attr(node, "blocksize"))))


def tile(w: Any, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    repeats = _const(w, node, 1)
    if repeats is None:
        raise _fail(w, name, "Tile", "the repeats must be constant")
    perm = w.t.layout(x)
    physical = [int(repeats[a]) for a in perm]
    xin = w.t.float_of(x)
    y = w.t.new_float(out, perm)
    w.b.op("TILE", [xin, w.b.constant(f"{name}/multiples", np.asarray(physical, np.int32))], [y])


def gather(w: Any, node: onnx.NodeProto, name: str) -> None:
    """GATHER on the logical order (an embedding table, or constant indices)."""
    data, idx, out = node.input[0], node.input[1], node.output[0]
    rank = len(w.t.shapes[data])
    axis = int(attr(node, "axis", 0)) % rank
    table, indices = w.constant(data), w.constant(idx)
    if table is not None:
        params = w.float_weight(data, np.asarray(table, np.float32), (data, "table"))
    else:
        params = w.t.to_layout(data, identity(rank))
    if indices is not None:
        ind = w.b.constant(f"{name}/indices", np.asarray(indices, np.int32))
    else:
        ind = w.t.float_of(idx) if idx in w.t.float else w.t.int8[idx][0]
    y = w.t.new_float(out, identity(len(w.t.shapes[out])))
    w.b.op("GATHER", [params, ind], [y], *w.b.options("GatherOptions", axis=axis))


def expand(w: Any, node: onnx.NodeProto, name: str) -> None:
    """Expand as an ADD of zeros of the output's shape (broadcasting works with the
    dynamic batch, which BROADCAST_TO's fixed shape does not)."""
    x, out = node.input[0], node.output[0]
    rank = len(w.t.shapes[out])
    if len(w.t.shapes[x]) > rank:
        raise _fail(w, name, "Expand", "an input of higher rank than the output")
    zeros = np.zeros((1, *w.t.shapes[out][1:]), np.float32)
    xin = w.t.to_layout(x, identity(len(w.t.shapes[x])))
    y = w.t.new_float(out, identity(rank))
    w.b.op("ADD", [xin, w.b.constant(f"{name}/zeros", zeros)], [y], *w.b.options("AddOptions"))


MORE_EMITTERS: dict[str, Callable[[Any, onnx.NodeProto, str], None]] = {
    "Slice": slice_, "Split": split, "DepthToSpace": depth_to_space, "Tile": tile,
    "Gather": gather, "Expand": expand,
}
