"""Emitters for the ops without weights: layout (Transpose, Reshape, Flatten, Squeeze),
elementwise arithmetic, activations, Concat, Pad, Softmax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.graph import attr
from lowbit.backends.tflite.tensors import identity, inverse, scalar
from lowbit.errors import UnsupportedOpError
from lowbit.quant.plan import Treatment

QUANTIZED = (Treatment.STATIC, Treatment.PASSTHROUGH)
UNARY = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH", "HardSwish": "HARD_SWISH",
         "Exp": "EXP", "Abs": "ABS", "Sqrt": "SQRT", "Neg": "NEG", "Elu": "ELU"}
ELU_ALPHA = 1.0  # TFLite's ELU has alpha 1
BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Max": "MAXIMUM",
          "Min": "MINIMUM"}
BINARY_OPTIONS = {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions",
                  "DIV": "DivOptions"}


def identity_op(w: Any, node: onnx.NodeProto, name: str) -> None:
    w.t.alias(node.output[0], node.input[0])


def transpose(w: Any, node: onnx.NodeProto, name: str) -> None:
    """Only relabels: physical_out = physical_in (see tensors.py)."""
    x = node.input[0]
    rank = len(w.t.shapes[x])
    p = tuple(attr(node, "perm", list(reversed(range(rank)))))
    q_inv = inverse(w.t.layout(x))
    s = tuple(q_inv[p[i]] for i in range(rank))
    w.t.alias(node.output[0], x, inverse(s))


def reshape(w: Any, node: onnx.NodeProto, name: str) -> None:
    """Reshape / Flatten / Squeeze / Unsqueeze on the logical order. A 4-D NHWC tensor
    flattened for weighted consumers only is reshaped as stored; the consumers' weight
    columns follow (``Writer.row_perm``), so no TRANSPOSE runs."""
    x, out = node.input[0], node.output[0]
    shape_in, shape_out = w.t.shapes[x], w.t.shapes[out]
    users = w.consumers.get(out, [])
    absorbable = (len(shape_in) == 4 and len(shape_out) == 2 and w.t.layout(x) != identity(4)
                  and shape_out[1] == int(np.prod(shape_in[1:])) and out not in w.outputs
                  and users and all(u.op_type in ("Gemm", "MatMul") and u.input[0] == out
                                    and w.constant(u.input[1]) is not None for u in users))
    have = w.t.int8.get(x)
    q = have[1] if have is not None and w.treatment(name) in QUANTIZED else None
    dtype = "int8" if q is not None else "float32"
    if absorbable:
        perm = w.t.layout(x)
        idx = np.arange(int(np.prod(shape_in[1:]))).reshape(shape_in[1:])
        idx = idx.transpose([p - 1 for p in perm[1:]]).reshape(-1)
        src = w.t.int8_of(x, q) if q is not None else w.t.float_of(x)
        w.row_perm[out] = idx
    else:
        src = w.t.to_layout(x, identity(len(shape_in)), dtype, q)
    target = [-1 if (i == 0 and out in w.t.dynamic_batch) else d for i, d in enumerate(shape_out)]
    w.t.perm[out] = identity(len(shape_out))
    y = w.t.new(out, dtype, q)
    shape_t = w.b.constant(f"{name}/shape", np.asarray(target, dtype=np.int32))
    w.b.op("RESHAPE", [src, shape_t], [y], *w.b.options("ReshapeOptions", newShape=target))
    if q is not None:
        w.t.set_int8(out, y, q)
    else:
        w.t.set_float(out, y)



def unary(w: Any, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    if node.op_type == "Elu" and float(attr(node, "alpha", 1.0)) != ELU_ALPHA:
        raise UnsupportedOpError(f"{w.source}: node {name!r} (Elu) with alpha "
                                 f"{attr(node, 'alpha', 1.0)}: TFLite's ELU has alpha 1")
    kind = UNARY[node.op_type]
    xin = w.t.float_of(x)
    y = w.t.new_float(out, w.t.layout(x))
    w.b.op(kind, [xin], [y])


def clip(w: Any, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    lo = scalar(w.constant(node.input[1])) if len(node.input) > 1 and node.input[1] else None
    hi = scalar(w.constant(node.input[2])) if len(node.input) > 2 and node.input[2] else None
    xin = w.t.float_of(x)
    perm = w.t.layout(x)
    if (lo, hi) == (0.0, 6.0):
        w.b.op("RELU6", [xin], [w.t.new_float(out, perm)])
        return
    cur = xin
    for bound, kind in ((lo, "MAXIMUM"), (hi, "MINIMUM")):
        if bound is None:
            continue
        c = w.b.constant(f"{name}/{kind.lower()}", np.asarray(bound, np.float32))
        last = kind == "MINIMUM" or hi is None
        y = w.t.new_float(out, perm) if last else w.b.tensor(
            f"{out}/lo", w.t.physical_shape(x), "float32")
        w.b.op(kind, [cur, c], [y])
        cur = y
    if cur == xin:
        w.t.alias(out, x)


def leaky_relu(w: Any, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    xin = w.t.float_of(x)
    y = w.t.new_float(out, w.t.layout(x))
    w.b.op("LEAKY_RELU", [xin], [y], *w.b.options("LeakyReluOptions",
                                                  alpha=float(attr(node, "alpha", 0.01))))


def _operand(w: Any, x: str, perm: tuple[int, ...], rank: int) -> int:
    """Input ``x`` of an elementwise op whose result has layout ``perm`` (rank ``rank``):
    constants are broadcast-aligned and permuted; activations brought to ``perm``."""
    value = w.constant(x)
    if value is None:
        if len(w.t.shapes[x]) != rank:
            return w.t.float_of(x) if w.t.layout(x) == identity(len(w.t.shapes[x])) else \
                w.t.to_layout(x, identity(len(w.t.shapes[x])))
        return w.t.to_layout(x, perm)
    arr = np.asarray(value, np.float32)
    if arr.ndim and arr.size > 1:
        arr = arr.reshape((1,) * (rank - arr.ndim) + arr.shape).transpose(perm)
    return w.t.const(("operand", x, perm), lambda: w.b.constant(x, np.ascontiguousarray(arr)))


def binary(w: Any, node: onnx.NodeProto, name: str) -> None:
    a, b = node.input[0], node.input[1]
    out = node.output[0]
    rank = len(w.t.shapes[out])
    lead = next((x for x in (a, b) if w.constant(x) is None and len(w.t.shapes[x]) == rank), a)
    perm = w.t.layout(lead) if w.t.has(lead) else identity(rank)
    if any(w.constant(x) is None and len(w.t.shapes[x]) != rank for x in (a, b)):
        perm = identity(rank)
    ia, ib = _operand(w, a, perm, rank), _operand(w, b, perm, rank)
    kind = BINARY[node.op_type]
    y = w.t.new_float(out, perm)
    opts = w.b.options(BINARY_OPTIONS[kind]) if kind in BINARY_OPTIONS else (None, 0)
    w.b.op(kind, [ia, ib], [y], *opts)


def concat(w: Any, node: onnx.NodeProto, name: str) -> None:
    out = node.output[0]
    rank = len(w.t.shapes[out])
    axis = int(attr(node, "axis")) % rank
    first = next((x for x in node.input if w.constant(x) is None), node.input[0])
    perm = w.t.layout(first)
    ins = [_operand(w, x, perm, rank) if w.constant(x) is not None else w.t.to_layout(x, perm)
           for x in node.input]
    y = w.t.new_float(out, perm)
    w.b.op("CONCATENATION", ins, [y], *w.b.options("ConcatenationOptions",
                                                   axis=perm.index(axis)))


def resize(w: Any, node: onnx.NodeProto, name: str) -> None:
    """Nearest-neighbour upsampling of H and W (asymmetric coordinates, floor), as Keras'
    UpSampling2D: RESIZE_NEAREST_NEIGHBOR to the output's size."""
    x, out = node.input[0], node.output[0]
    mode = attr(node, "mode", b"nearest")
    coords = attr(node, "coordinate_transformation_mode", b"half_pixel")
    nearest = attr(node, "nearest_mode", b"round_prefer_floor")
    mode, coords, nearest = (v.decode() if isinstance(v, bytes) else v
                             for v in (mode, coords, nearest))
    shape_in, shape_out = w.t.shapes[x], w.t.shapes[out]
    whole = len(shape_in) == 4 and shape_out[:2] == shape_in[:2] and all(
        o % i == 0 for i, o in zip(shape_in[2:], shape_out[2:]))
    # with whole upsampling factors, half-pixel coordinates rounded to nearest pick the
    # same source pixels as asymmetric ones floored (TFLite's nearest neighbour)
    same = (coords, nearest) == ("asymmetric", "floor") or (
        coords in ("half_pixel", "pytorch_half_pixel")
        and nearest in ("round_prefer_floor", "round_prefer_ceil"))
    if mode != "nearest" or not whole or not same:
        raise UnsupportedOpError(f"{w.source}: node {name!r} (Resize): only nearest "
                                 "upsampling of H and W by whole factors")
    xin = w.t.to_layout(x, (0, 2, 3, 1))
    y = w.t.new_float(out, (0, 2, 3, 1))
    size = w.b.constant(f"{name}/size", np.asarray(w.t.shapes[out][2:], np.int32))
    w.b.op("RESIZE_NEAREST_NEIGHBOR", [xin, size], [y],
           *w.b.options("ResizeNearestNeighborOptions", alignCorners=False))


def softmax(w: Any, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    rank = len(w.t.shapes[x])
    axis = int(attr(node, "axis", -1)) % rank
    perm = w.t.layout(x)
    if perm[-1] != axis:
        perm = identity(rank)
        if axis != rank - 1:
            raise UnsupportedOpError(f"{w.source}: node {name!r} (Softmax) over axis {axis} "
                                     "of a tensor whose last axis is another")
    xin = w.t.to_layout(x, perm)
    y = w.t.new_float(out, perm)
    if node.op_type == "LogSoftmax":
        w.b.op("LOG_SOFTMAX", [xin], [y])
    else:
        w.b.op("SOFTMAX", [xin], [y], *w.b.options("SoftmaxOptions", beta=1.0))


def pad(w: Any, node: onnx.NodeProto, name: str) -> None:
    x, out = node.input[0], node.output[0]
    mode = attr(node, "mode", b"constant")
    pads = w.constant(node.input[1]) if len(node.input) > 1 else None
    value = w.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if (mode not in ("constant", "reflect") or pads is None
            or (value is not None and float(value) != 0.0)):
        raise UnsupportedOpError(f"{w.source}: node {name!r} (Pad): only constant zero or "
                                 "reflect padding with constant amounts")
    rank = len(w.t.shapes[x])
    pads = np.asarray(pads, np.int64).reshape(2, rank).T  # (rank, 2) logical
    perm = w.t.layout(x)
    amounts = np.ascontiguousarray(pads[list(perm)], dtype=np.int32)
    xin = w.t.float_of(x)
    y = w.t.new_float(out, perm)
    pads_t = w.b.constant(f"{name}/pads", amounts)
    if mode == "reflect":
        w.b.op("MIRROR_PAD", [xin, pads_t], [y], *w.b.options("MirrorPadOptions", mode=0))
    else:
        w.b.op("PAD", [xin, pads_t], [y])


REDUCE = {"ReduceMean": "MEAN", "ReduceMax": "REDUCE_MAX", "ReduceSum": "SUM"}


def reduce(w: Any, node: onnx.NodeProto, name: str) -> None:
    """ReduceMean/Max/Sum over constant axes, on the stored layout (axes renumbered)."""
    x, out = node.input[0], node.output[0]
    rank = len(w.t.shapes[x])
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = w.constant(node.input[1])
    if axes is None:
        axes = list(range(rank))
    axes = sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))
    keep = bool(attr(node, "keepdims", 1))
    perm = w.t.layout(x)
    physical = sorted(perm.index(a) for a in axes)
    if keep:
        out_perm = perm
    else:
        left = [perm[j] for j in range(rank) if j not in physical]
        out_perm = tuple(a - sum(1 for r in axes if r < a) for a in left)
    xin = w.t.float_of(x)
    y = w.t.new_float(out, out_perm)
    w.b.op(REDUCE[node.op_type], [xin, w.b.constant(f"{name}/axes", np.asarray(
        physical, np.int32))], [y], *w.b.options("ReducerOptions", keepDims=keep))


SHAPE_EMITTERS: dict[str, Callable[[Any, onnx.NodeProto, str], None]] = {
    "Identity": identity_op, "Dropout": identity_op, "Transpose": transpose,
    "Reshape": reshape, "Flatten": reshape, "Squeeze": reshape, "Unsqueeze": reshape,
    "Clip": clip, "LeakyRelu": leaky_relu, "Concat": concat, "Softmax": softmax, "Pad": pad,
    "LogSoftmax": softmax, "Resize": resize,
    **{k: unary for k in UNARY}, **{k: binary for k in BINARY}, **{k: reduce for k in REDUCE},
}
