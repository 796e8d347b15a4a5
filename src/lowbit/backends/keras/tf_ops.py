"""TensorFlow graph ops (of a frozen SavedModel signature) as ONNX nodes.

Each converter takes the converter state ``cv`` (``savedmodel._Converter``: ``g``, the
Graph; ``value(t)``, a converted tensor; ``const(t)``, a folded constant or None;
``consumers(t)``; ``fail``) and the ``tf.Operation``, and returns its outputs' Values.
Images are NHWC in TensorFlow (the ``KERAS`` layout) and run channels-first in ONNX."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.backends.keras.call import pads_for
from lowbit.backends.keras.graph import KERAS, NCHW, TO_NCHW, Value, norm_axis

OPS: dict[str, Callable[[Any, Any], list[Value | None]]] = {}  # None: a constant output


def _op(*types: str) -> Callable[[Callable[[Any, Any], list[Value]]], Callable]:
    def register(fn: Callable[[Any, Any], list[Value]]) -> Callable:
        for t in types:
            OPS[t] = fn
        return fn
    return register


def _shape(tensor: Any) -> tuple[int | None, ...]:
    return tuple(tensor.shape.as_list())


def _out(cv: Any, op: Any, name: str, layout: str, i: int = 0) -> Value:
    return cv.g.result(name, layout, _shape(op.outputs[i]))


def _attr(op: Any, name: str, default: Any = None) -> Any:
    try:
        value = op.get_attr(name)
    except ValueError:
        return default
    return value.decode() if isinstance(value, bytes) else value


def _image_layout(cv: Any, op: Any) -> str:
    fmt = _attr(op, "data_format", "NHWC")
    if fmt not in ("NHWC", "NCHW") or op.inputs[0].shape.rank != 4:
        raise cv.fail(op, f"data_format {fmt} on a rank-{op.inputs[0].shape.rank} input")
    return NCHW if fmt == "NHWC" else KERAS


def _base(op: Any) -> str:
    """A node name from the op's: without the wrapper scopes of a saved function."""
    parts = [p for p in op.name.split("/") if p != "StatefulPartitionedCall"]
    return "/".join(parts) or op.name


def _window(cv: Any, op: Any, layout: str, kernel: tuple[int, ...]
            ) -> tuple[dict, tuple[int, ...]]:
    """Conv/pool attributes from TF's 4-D strides/dilations and padding."""
    pick = (1, 2) if layout == NCHW else (2, 3)  # the spatial axes in TF's own order
    strides = tuple(int(_attr(op, "strides")[a]) for a in pick)
    dilations = tuple(int((_attr(op, "dilations") or [1] * 4)[a]) for a in pick)
    padding = _attr(op, "padding")
    size = tuple(_shape(op.inputs[0])[a] for a in pick)
    if padding == "EXPLICIT":
        flat = list(_attr(op, "explicit_paddings"))
        pads = [flat[2 * a] for a in pick] + [flat[2 * a + 1] for a in pick]
    elif padding in ("SAME", "VALID"):
        pads = pads_for(padding.lower(), size, kernel, strides, dilations)
    else:
        raise cv.fail(op, f"padding {padding}")
    attrs: dict = {"kernel_shape": list(kernel), "strides": list(strides)}
    if pads is None:
        attrs["auto_pad"] = "SAME_UPPER"
    else:
        attrs["pads"] = pads
    return attrs, dilations


def _weight(cv: Any, op: Any, i: int) -> np.ndarray:
    w = cv.const(op.inputs[i])
    if w is None:
        raise cv.fail(op, f"input {i} is computed, not a constant weight")
    return np.asarray(w, dtype=np.float32)


@_op("Conv2D", "DepthwiseConv2dNative")
def conv2d(cv: Any, op: Any) -> list[Value]:
    layout = _image_layout(cv, op)
    kernel = _weight(cv, op, 1)  # (kh, kw, in / groups, out) or (kh, kw, in, multiplier)
    kh, kw, cin, cout = kernel.shape
    if op.type == "Conv2D":
        weight = kernel.transpose(3, 2, 0, 1)
        channels = _shape(op.inputs[0])[3 if layout == NCHW else 1]
        group = int(channels // cin) if channels else 1
    else:
        weight = kernel.reshape(kh, kw, cin * cout, 1).transpose(2, 3, 0, 1)
        group = cin
    attrs, dilations = _window(cv, op, layout, (kh, kw))
    x = cv.g.get(cv.value(op.inputs[0]), layout)
    base = _base(op)
    out = cv.g.node("Conv", [x, cv.g.const(weight, f"{base}.weight")], base,
                    dilations=list(dilations), group=group, **attrs)
    return [_out(cv, op, out, layout)]


@_op("MaxPool", "AvgPool")
def pool(cv: Any, op: Any) -> list[Value]:
    layout = _image_layout(cv, op)
    ksize = _attr(op, "ksize")
    kernel = (ksize[1], ksize[2]) if layout == NCHW else (ksize[2], ksize[3])
    attrs, _ = _window(cv, op, layout, kernel)
    x = cv.g.get(cv.value(op.inputs[0]), layout)
    if op.type == "MaxPool":
        out = cv.g.node("MaxPool", [x], _base(op), **attrs)
    else:
        out = cv.g.node("AveragePool", [x], _base(op), count_include_pad=0, **attrs)
    return [_out(cv, op, out, layout)]


def _fold_channelwise(cv: Any, op: Any, x: Value, const: np.ndarray, mul: bool) -> bool:
    """Fold ``x * const`` (``mul``) or ``x + const`` into the Conv or Gemm that made ``x``
    when only this op reads it and ``const`` is one value per output channel (a bias, a
    BatchNorm that Keras' export wrote as multiply-add): the weight or bias absorbs it."""
    vec = np.asarray(const, dtype=np.float32)
    if vec.ndim > x.rank or any(d != 1 for d in vec.shape[:-1]) \
            or cv.consumers(op.inputs[0]) != 1 or len(x.names) != 1:
        return False
    name = next(iter(x.names.values()))
    g = cv.g
    producer = next((n for n in reversed(g.nodes) if name in n.output), None)
    if producer is None or producer.op_type not in ("Conv", "Gemm") \
            or (producer.op_type == "Conv") != (NCHW in x.names):
        return False
    channels = x.shape[-1]
    vec = np.broadcast_to(vec.reshape(-1), (channels,)) if vec.size == 1 else vec.reshape(-1)
    weight = g.const_value(producer.input[1])
    if vec.shape[0] != channels or weight is None or weight.shape[0] != channels:
        return False  # (a Gemm's weight is (out, in): transB=1, as ``matmul`` writes it)
    bias = g.const_value(producer.input[2]) if len(producer.input) > 2 else None
    if bias is None and len(producer.input) > 2:
        return False
    if mul:
        scaled = weight * vec.reshape((-1,) + (1,) * (weight.ndim - 1))
        producer.input[1] = g.set_const(producer.input[1], scaled, f"{producer.name}.weight")
        bias = None if bias is None else bias * vec
    else:
        bias = vec.copy() if bias is None else bias + vec
    if bias is not None:
        if len(producer.input) > 2:
            producer.input[2] = g.set_const(producer.input[2], bias, f"{producer.name}.bias")
        else:
            producer.input.append(g.const(bias, f"{producer.name}.bias"))
    return True


_BINARY = {"AddV2": "Add", "Add": "Add", "BiasAdd": "Add", "Mul": "Mul", "Sub": "Sub",
           "RealDiv": "Div", "Maximum": "Max", "Minimum": "Min"}


@_op(*_BINARY)
def binary(cv: Any, op: Any) -> list[Value]:
    g = cv.g
    a, b = op.inputs[0], op.inputs[1]
    ca, cb = cv.const(a), cv.const(b)
    rank = len(_shape(op.outputs[0]))
    if ca is None and cb is None:
        va, vb = cv.value(a), cv.value(b)
        layout = g.common_layout([va, vb]) if va.rank == vb.rank else KERAS
        names = [g.get(va, layout), g.get(vb, layout)]
    else:
        data = cv.value(a if ca is None else b)
        const = cb if ca is None else ca
        if op.type == "BiasAdd" and _attr(op, "data_format", "NHWC") != "NHWC":
            raise cv.fail(op, "a channels-first BiasAdd")
        if op.type in ("AddV2", "Add", "BiasAdd", "Mul") and (ca is None or op.type == "Mul") \
                and _fold_channelwise(cv, op, data, const, mul=op.type == "Mul"):
            return [data]
        layout = g.layout(data) if data.rank == rank else KERAS
        c = g.const_for(np.asarray(const, dtype=np.float32), layout, rank, f"{_base(op)}.const")
        names = [g.get(data, layout), c] if ca is None else [c, g.get(data, layout)]
    return [_out(cv, op, g.node(_BINARY[op.type], names, _base(op)), layout)]


@_op("MatMul", "BatchMatMulV2")
def matmul(cv: Any, op: Any) -> list[Value]:
    g = cv.g
    ta = _attr(op, "transpose_a", _attr(op, "adj_x", False))
    tb = _attr(op, "transpose_b", _attr(op, "adj_y", False))
    w = cv.const(op.inputs[1])
    if ta or w is None or w.ndim != 2:
        raise cv.fail(op, "only x @ constant weight (rank 2) is supported")
    x = cv.value(op.inputs[0])
    w = np.asarray(w, dtype=np.float32)
    if x.rank == 2:  # Gemm with the (out, in) weight
        weight = w if tb else w.T.copy()
        out = g.node("Gemm", [g.get(x, KERAS), g.const(weight, f"{_base(op)}.weight")], _base(op),
                     transB=1)
    else:
        weight = w.T.copy() if tb else w
        out = g.node("MatMul", [g.get(x, KERAS), g.const(weight, f"{_base(op)}.weight")], _base(op))
    return [_out(cv, op, out, KERAS)]


_UNARY = {"Relu": "Relu", "Sigmoid": "Sigmoid", "Tanh": "Tanh", "Elu": "Elu", "Selu": "Selu",
          "Softplus": "Softplus", "Erf": "Erf", "Exp": "Exp", "Sqrt": "Sqrt", "Neg": "Neg",
          "Abs": "Abs"}


@_op(*_UNARY, "Relu6", "LeakyRelu", "Identity", "IdentityN", "StopGradient", "Softmax")
def unary(cv: Any, op: Any) -> list[Value]:
    if op.type == "IdentityN":  # (a custom gradient's wrapper) constants pass as constants
        for t, out in zip(op.inputs, op.outputs):
            if cv.const(t) is not None:
                cv.consts[out.name] = cv.const(t)
        return [None if cv.const(t) is not None else cv.value(t) for t in op.inputs]
    x = cv.value(op.inputs[0])
    if op.type in ("Identity", "StopGradient"):
        return [x]
    g, layout = cv.g, cv.g.layout(x)
    src = g.get(x, layout)
    if op.type == "Relu6":
        out = g.node("Clip", [src, g.const(np.float32(0), f"{_base(op)}.min"),
                              g.const(np.float32(6), f"{_base(op)}.max")], _base(op))
    elif op.type == "LeakyRelu":
        out = g.node("LeakyRelu", [src], _base(op), alpha=float(_attr(op, "alpha", 0.2)))
    elif op.type == "Softmax":
        out = g.node("Softmax", [src], _base(op), axis=g.axis(layout, -1, x.rank))
    else:
        out = g.node(_UNARY[op.type], [src], _base(op))
    return [_out(cv, op, out, layout)]


@_op("Reshape")
def reshape(cv: Any, op: Any) -> list[Value]:
    shape = cv.const(op.inputs[1])
    if shape is None:  # computed (a Flatten's Shape -> Pack): TF's static shape instead
        dims = _shape(op.outputs[0])
        if sum(d is None for d in dims) > 1:
            raise cv.fail(op, f"the output shape {dims} has more than one unknown dimension")
        shape = np.array([-1 if d is None else d for d in dims])
    x = cv.g.get(cv.value(op.inputs[0]), KERAS)
    target = cv.g.const(np.asarray(shape, dtype=np.int64), f"{_base(op)}.shape")
    return [_out(cv, op, cv.g.node("Reshape", [x, target], _base(op)), KERAS)]


@_op("Mean", "Max")
def reduce(cv: Any, op: Any) -> list[Value]:
    x = cv.value(op.inputs[0])
    axes = cv.const(op.inputs[1])
    if axes is None:
        raise cv.fail(op, "the reduced axes are computed")
    axes = sorted({norm_axis(int(a), x.rank) for a in np.atleast_1d(axes)})
    keep = bool(_attr(op, "keep_dims", False))
    g = cv.g
    if x.rank == 4 and axes == [1, 2]:  # a global pool over NHWC's height and width
        pooled = g.node("GlobalAveragePool" if op.type == "Mean" else "GlobalMaxPool",
                        [g.get(x, NCHW)], _base(op))
        if keep:
            return [_out(cv, op, pooled, NCHW)]
        return [_out(cv, op, g.node("Flatten", [pooled], f"{_base(op)}_flatten", axis=1), KERAS)]
    out = g.node("ReduceMean" if op.type == "Mean" else "ReduceMax", [g.get(x, KERAS)],
                 _base(op), axes=axes, keepdims=int(keep))
    return [_out(cv, op, out, KERAS)]


@_op("ConcatV2")
def concat(cv: Any, op: Any) -> list[Value]:
    axis = cv.const(op.inputs[-1])
    if axis is None:
        raise cv.fail(op, "the axis is computed")
    values = [cv.value(t) for t in op.inputs[:-1]]
    layout = cv.g.common_layout(values)
    out = cv.g.node("Concat", [cv.g.get(v, layout) for v in values], _base(op),
                    axis=cv.g.axis(layout, int(axis), values[0].rank))
    return [_out(cv, op, out, layout)]


@_op("Pad", "PadV2")
def pad(cv: Any, op: Any) -> list[Value]:
    x = cv.value(op.inputs[0])
    paddings = cv.const(op.inputs[1])
    if paddings is None:
        raise cv.fail(op, "the paddings are computed")
    layout = cv.g.layout(x)
    order = TO_NCHW if layout == NCHW else tuple(range(x.rank))
    pads = [int(paddings[a][0]) for a in order] + [int(paddings[a][1]) for a in order]
    inputs = [cv.g.get(x, layout), cv.g.const(np.array(pads, np.int64), f"{_base(op)}.pads")]
    if op.type == "PadV2":
        inputs.append(cv.g.const(np.asarray(_weight(cv, op, 2)).reshape(()), f"{_base(op)}.value"))
    return [_out(cv, op, cv.g.node("Pad", inputs, _base(op), mode="constant"), layout)]


@_op("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def batch_norm(cv: Any, op: Any) -> list[Value]:
    if _attr(op, "is_training", False):
        raise cv.fail(op, "is_training=True")
    layout = _image_layout(cv, op)
    params = [cv.g.const(_weight(cv, op, i), f"{_base(op)}.{k}")
              for i, k in enumerate(("gamma", "beta", "mean", "var"), 1)]
    out = cv.g.node("BatchNormalization", [cv.g.get(cv.value(op.inputs[0]), layout), *params],
                    _base(op), epsilon=float(_attr(op, "epsilon", 1e-3)))
    return [_out(cv, op, out, layout)]


@_op("Squeeze")
def squeeze(cv: Any, op: Any) -> list[Value]:
    x = cv.value(op.inputs[0])
    dims = list(_attr(op, "squeeze_dims", []) or [])
    axes = [norm_axis(int(a), x.rank) for a in dims] or \
        [i for i, d in enumerate(x.shape) if d == 1]
    out = cv.g.node("Squeeze", [cv.g.get(x, KERAS),
                                cv.g.const(np.array(axes, np.int64), f"{_base(op)}.axes")], _base(op))
    return [_out(cv, op, out, KERAS)]


@_op("Transpose")
def transpose(cv: Any, op: Any) -> list[Value]:
    perm = cv.const(op.inputs[1])
    if perm is None:
        raise cv.fail(op, "the permutation is computed")
    out = cv.g.node("Transpose", [cv.g.get(cv.value(op.inputs[0]), KERAS)], _base(op),
                    perm=[int(p) for p in perm])
    return [_out(cv, op, out, KERAS)]
