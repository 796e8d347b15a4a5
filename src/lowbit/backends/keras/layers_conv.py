"""Converters for Keras' image layers: convolutions, pools, padding, upsampling and
BatchNormalization. They run channels-first (``NCHW``): a channels-last input is
transposed once by ``Graph.get``; a ``data_format="channels_first"`` layer runs on the
tensor as Keras holds it."""

from __future__ import annotations

import numpy as np

from lowbit.backends.keras.call import Call, converts, pads_for
from lowbit.backends.keras.graph import KERAS, NCHW, Value, norm_axis


def _image_layout(call: Call) -> str:
    """The layout holding this layer's input channels-first, and a check of its rank."""
    fmt = getattr(call.layer, "data_format", "channels_last")
    if call.x.rank != 4:
        raise call.fail(f"a rank-{call.x.rank} input (only 2-D images, rank 4, are supported)")
    return NCHW if fmt == "channels_last" else KERAS


def _spatial(value: Value, layout: str) -> tuple[int | None, int | None]:
    """(height, width) of a rank-4 value from its Keras shape."""
    s = value.shape
    return (s[1], s[2]) if layout == NCHW else (s[2], s[3])


def _window_attrs(call: Call, layout: str, source: Value, kernel: tuple[int, ...],
                  strides: tuple[int, ...], dilations: tuple[int, ...],
                  padding: str, extra: list[int] | None = None) -> dict:
    if padding not in ("valid", "same"):
        raise call.fail(f"padding={padding!r} (valid and same are supported)")
    pads = pads_for(padding, _spatial(source, layout), kernel, strides, dilations)
    attrs: dict = {"kernel_shape": list(kernel), "strides": list(strides)}
    if pads is None:
        attrs["auto_pad"] = "SAME_UPPER"
    else:
        attrs["pads"] = [p + e for p, e in zip(pads, extra or [0] * 4)]
    return attrs


def _conv(call: Call, weight: np.ndarray, bias: np.ndarray | None, *, group: int,
          base: str, x: Value | None = None, strides: tuple[int, ...] | None = None,
          dilations: tuple[int, ...] | None = None, padding: str | None = None) -> str:
    """One ONNX Conv of ``weight`` (O, I/group, kh, kw) on ``x`` (default: the call's
    input), absorbing a ZeroPadding2D in front of a "valid" convolution."""
    layer = call.layer
    layout = _image_layout(call)
    x = call.x if x is None else x
    strides = tuple(layer.strides) if strides is None else strides
    dilations = tuple(layer.dilation_rate) if dilations is None else dilations
    padding = layer.padding if padding is None else padding
    extra = None
    if x.padded is not None and padding == "valid":
        x, extra = x.padded
    attrs = _window_attrs(call, layout, x, tuple(weight.shape[2:]), strides, dilations,
                          padding, extra)
    inputs = [call.g.get(x, layout), call.g.const(weight, f"{base}.weight")]
    if bias is not None:
        inputs.append(call.g.const(bias, f"{base}.bias"))
    return call.g.node("Conv", inputs, base, dilations=list(dilations), group=group, **attrs)


def _bias(call: Call) -> np.ndarray | None:
    return call.weight(call.layer.bias) if call.layer.use_bias else None


@converts("Conv2D")
def conv2d(call: Call) -> list[Value]:
    kernel = call.weight(call.layer.kernel)  # (kh, kw, in / groups, out)
    out = _conv(call, kernel.transpose(3, 2, 0, 1), _bias(call),
                group=int(getattr(call.layer, "groups", 1)), base=call.name)
    return [call.activation(call.out(out, _image_layout(call)))]


def _depthwise_weight(kernel: np.ndarray) -> np.ndarray:
    """(kh, kw, in, multiplier) -> (in * multiplier, 1, kh, kw): output channel
    c * multiplier + m reads input channel c, as TensorFlow orders them."""
    kh, kw, cin, mult = kernel.shape
    return kernel.reshape(kh, kw, cin * mult, 1).transpose(2, 3, 0, 1)


@converts("DepthwiseConv2D")
def depthwise_conv2d(call: Call) -> list[Value]:
    kernel = call.weight(call.layer.kernel)
    out = _conv(call, _depthwise_weight(kernel), _bias(call), group=kernel.shape[2],
                base=call.name)
    return [call.activation(call.out(out, _image_layout(call)))]


@converts("SeparableConv2D")
def separable_conv2d(call: Call) -> list[Value]:
    layer, layout = call.layer, _image_layout(call)
    depthwise = call.weight(layer.depthwise_kernel)
    pointwise = call.weight(layer.pointwise_kernel)  # (1, 1, in * multiplier, out)
    mid = _conv(call, _depthwise_weight(depthwise), None, group=depthwise.shape[2],
                base=f"{call.name}_depthwise")
    shape = list(call.out_shapes[0])
    shape[3 if layout == NCHW else 1] = pointwise.shape[2]
    mid_value = call.g.result(mid, layout, tuple(shape))
    out = _conv(call, pointwise.transpose(3, 2, 0, 1), _bias(call), group=1, base=call.name,
                x=mid_value, strides=(1, 1), dilations=(1, 1), padding="valid")
    return [call.activation(call.out(out, layout))]


@converts("MaxPooling2D", "AveragePooling2D")
def pool2d(call: Call) -> list[Value]:
    layer, layout = call.layer, _image_layout(call)
    kernel = tuple(layer.pool_size)
    strides = tuple(layer.strides) if layer.strides is not None else kernel
    attrs = _window_attrs(call, layout, call.x, kernel, strides, (1, 1), layer.padding)
    x = call.g.get(call.x, layout)
    if type(layer).__name__ == "MaxPooling2D":
        out = call.g.node("MaxPool", [x], call.name, **attrs)
    else:  # TensorFlow's "same" average leaves the padding out of the count
        out = call.g.node("AveragePool", [x], call.name, count_include_pad=0, **attrs)
    return [call.out(out, layout)]


@converts("GlobalAveragePooling2D", "GlobalMaxPooling2D")
def global_pool2d(call: Call) -> list[Value]:
    layout = _image_layout(call)
    op = "GlobalAveragePool" if "Average" in type(call.layer).__name__ else "GlobalMaxPool"
    pooled = call.g.node(op, [call.g.get(call.x, layout)], call.name)
    if getattr(call.layer, "keepdims", False):
        return [call.out(pooled, layout)]  # (N, C, 1, 1) is Keras' (N, 1, 1, C) channels-first
    return [call.out(call.g.node("Flatten", [pooled], f"{call.name}_flatten", axis=1), KERAS)]


@converts("GlobalAveragePooling1D", "GlobalMaxPooling1D")
def global_pool1d(call: Call) -> list[Value]:
    if call.x.rank != 3:
        raise call.fail(f"a rank-{call.x.rank} input (rank 3 expected)")
    axis = 2 if getattr(call.layer, "data_format", "channels_last") == "channels_first" else 1
    op = "ReduceMean" if "Average" in type(call.layer).__name__ else "ReduceMax"
    out = call.g.node(op, [call.g.get(call.x, KERAS)], call.name, axes=[axis],
                      keepdims=int(bool(getattr(call.layer, "keepdims", False))))
    return [call.out(out, KERAS)]


@converts("ZeroPadding2D")
def zero_padding2d(call: Call) -> list[Value]:
    layout = _image_layout(call)
    (top, bottom), (left, right) = (tuple(p) for p in call.layer.padding)
    pads = np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64)
    out = call.g.node("Pad", [call.g.get(call.x, layout), call.g.const(pads, f"{call.name}.pads")],
                      call.name, mode="constant")
    value = call.out(out, layout)
    value.padded = (call.x, [top, left, bottom, right])  # a following Conv may absorb it
    return [value]


@converts("UpSampling2D")
def upsampling2d(call: Call) -> list[Value]:
    layer, layout = call.layer, _image_layout(call)
    if layer.interpolation != "nearest":
        raise call.fail(f"interpolation={layer.interpolation!r} (only nearest is supported)")
    h, w = layer.size
    scales = call.g.const(np.array([1, 1, h, w], dtype=np.float32), f"{call.name}.scales")
    out = call.g.node("Resize", [call.g.get(call.x, layout), "", scales], call.name,
                      mode="nearest", coordinate_transformation_mode="asymmetric",
                      nearest_mode="floor")
    return [call.out(out, layout)]


@converts("BatchNormalization")
def batch_norm(call: Call) -> list[Value]:
    layer, x, g = call.layer, call.x, call.g
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if len(axes) != 1:
        raise call.fail(f"axis={layer.axis} (one channel axis is supported)")
    axis = norm_axis(int(axes[0]), x.rank)
    mean, var = call.weight(layer.moving_mean), call.weight(layer.moving_variance)
    gamma = call.weight(layer.gamma) if layer.scale else np.ones_like(mean)
    beta = call.weight(layer.beta) if layer.center else np.zeros_like(mean)
    if x.rank == 4 and axis == 3:
        layout = NCHW
    elif axis == 1 and x.rank >= 2:
        layout = KERAS
    else:  # the channel axis is not where ONNX's BatchNormalization wants it: scale + shift
        scale = gamma / np.sqrt(var + np.float32(layer.epsilon))
        shift = beta - mean * scale
        shape = (-1,) + (1,) * (x.rank - 1 - axis)
        src = g.get(x, KERAS)
        mul = g.node("Mul", [src, g.const(scale.reshape(shape), f"{call.name}.scale")],
                     f"{call.name}_scale")
        add = g.node("Add", [mul, g.const(shift.reshape(shape), f"{call.name}.shift")], call.name)
        return [call.out(add, KERAS)]
    inputs = [g.get(x, layout)] + [g.const(v, f"{call.name}.{k}") for k, v in
                                   (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
    return [call.out(g.node("BatchNormalization", inputs, call.name,
                            epsilon=float(layer.epsilon)), layout)]
