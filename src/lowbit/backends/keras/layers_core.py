"""Converters for Keras' core layers: Dense, shapes (Flatten, Reshape, Permute), inference
identities (Dropout and friends), activations, merges, Rescaling, LayerNormalization and
Embedding. Layers that depend on the element order (Flatten, Reshape, Dense on N-D
input, Permute, LayerNormalization) run on the tensor in Keras' own order."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from lowbit.backends.keras.call import Call, converts
from lowbit.backends.keras.graph import KERAS, NCHW, Value, norm_axis


@converts("Dense")
def dense(call: Call) -> list[Value]:
    layer, g = call.layer, call.g
    kernel = call.weight(layer.kernel)  # (in, out)
    bias = call.weight(layer.bias) if layer.use_bias else None
    x = g.get(call.x, KERAS)
    if call.x.rank == 2:  # Gemm with the (out, in) weight, as torch's Linear exports
        inputs = [x, g.const(kernel.T.copy(), f"{call.name}.weight")]
        if bias is not None:
            inputs.append(g.const(bias, f"{call.name}.bias"))
        out = g.node("Gemm", inputs, call.name, transB=1)
    else:  # the last axis: MatMul, then the bias Add
        out = g.node("MatMul", [x, g.const(kernel, f"{call.name}.weight")],
                     call.name if bias is None else f"{call.name}_matmul")
        if bias is not None:
            out = g.node("Add", [out, g.const(bias, f"{call.name}.bias")], call.name)
    return [call.activation(call.out(out, KERAS))]


@converts("Flatten")
def flatten(call: Call) -> list[Value]:
    g, x = call.g, call.x
    src = g.get(x, KERAS)
    if getattr(call.layer, "data_format", "channels_last") == "channels_first" and x.rank > 2:
        perm = [0, *range(2, x.rank), 1]  # Keras moves the channels last first
        src = g.node("Transpose", [src], f"{call.name}_channels_last", perm=perm)
    return [call.out(g.node("Flatten", [src], call.name, axis=1), KERAS)]


@converts("Reshape")
def reshape(call: Call) -> list[Value]:
    target = tuple(call.layer.target_shape)
    if len(target) == 3 and target[:2] == (1, 1) and call.x.rank == 2:
        # (N, C) -> (N, 1, 1, C), e.g. a squeeze-excite block: the same elements are
        # (N, C, 1, 1) channels-first, so the Conv after it needs no Transpose
        shape = np.array([0, target[2], 1, 1], dtype=np.int64)
        out = call.g.node("Reshape", [call.g.get(call.x, KERAS),
                                      call.g.const(shape, f"{call.name}.shape")], call.name)
        return [call.out(out, NCHW)]
    shape = np.array([0, *target], dtype=np.int64)  # 0: keep the batch
    out = call.g.node("Reshape", [call.g.get(call.x, KERAS),
                                  call.g.const(shape, f"{call.name}.shape")], call.name)
    return [call.out(out, KERAS)]


@converts("Permute")
def permute(call: Call) -> list[Value]:
    perm = [0, *(int(d) for d in call.layer.dims)]
    return [call.out(call.g.node("Transpose", [call.g.get(call.x, KERAS)], call.name,
                                 perm=perm), KERAS)]


@converts("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
          "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization",
          "Identity")
def identity(call: Call) -> list[Value]:
    return [call.x]  # no-ops at inference


@converts("Activation")
def activation(call: Call) -> list[Value]:
    return [call.activation(call.x)]


@converts("ReLU")
def relu(call: Call) -> list[Value]:
    layer, g, x = call.layer, call.g, call.x
    if float(layer.threshold or 0.0) != 0.0:
        raise call.fail(f"threshold={layer.threshold} (only 0 is supported)")
    layout = g.layout(x)
    src = g.get(x, layout)
    slope = float(layer.negative_slope or 0.0)
    top = None if layer.max_value is None else float(layer.max_value)
    f32 = np.float32
    if slope == 0.0 and top is not None:
        out = g.node("Clip", [src, g.const(f32(0.0), f"{call.name}.min"),
                              g.const(f32(top), f"{call.name}.max")], call.name)
        return [call.out(out, layout)]
    out = g.node("Relu", [src], call.name) if slope == 0.0 else \
        g.node("LeakyRelu", [src], call.name, alpha=slope)
    if top is not None:
        out = g.node("Clip", [out, "", g.const(f32(top), f"{call.name}.max")],
                     f"{call.name}_clip")
    return [call.out(out, layout)]


@converts("LeakyReLU")
def leaky_relu(call: Call) -> list[Value]:
    layout = call.g.layout(call.x)
    alpha = float(call.layer.negative_slope)
    return [call.out(call.g.node("LeakyRelu", [call.g.get(call.x, layout)], call.name,
                                 alpha=alpha), layout)]


@converts("ELU")
def elu(call: Call) -> list[Value]:
    layout = call.g.layout(call.x)
    return [call.out(call.g.node("Elu", [call.g.get(call.x, layout)], call.name,
                                 alpha=float(call.layer.alpha)), layout)]


@converts("PReLU")
def prelu(call: Call) -> list[Value]:
    layout = call.g.layout(call.x)
    slope = call.g.const_for(call.weight(call.layer.alpha), layout, call.x.rank,
                             f"{call.name}.alpha")
    return [call.out(call.g.node("PRelu", [call.g.get(call.x, layout), slope], call.name),
                     layout)]


@converts("Softmax")
def softmax(call: Call) -> list[Value]:
    axis = call.layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise call.fail(f"axis={axis} (one axis is supported)")
        axis = axis[0]
    layout = call.g.layout(call.x)
    out = call.g.node("Softmax", [call.g.get(call.x, layout)], call.name,
                      axis=call.g.axis(layout, int(axis), call.x.rank))
    return [call.out(out, layout)]


_MERGE_OPS = {"Add": "Add", "Subtract": "Sub", "Multiply": "Mul", "Maximum": "Max",
              "Minimum": "Min", "Average": "Mean"}


@converts(*_MERGE_OPS)
def merge(call: Call) -> list[Value]:
    g, op = call.g, _MERGE_OPS[type(call.layer).__name__]
    layout = g.common_layout(call.ins)
    names = [g.get(v, layout) for v in call.ins]
    if op in ("Add", "Mul") and len(names) > 2:  # pairwise: what quantizers know best
        out = names[0]
        for i, other in enumerate(names[1:], 1):
            out = g.node(op, [out, other], call.name if i == len(names) - 1 else
                         f"{call.name}_{i}")
    else:
        out = g.node(op, names, call.name)
    return [call.out(out, layout)]


@converts("Concatenate")
def concatenate(call: Call) -> list[Value]:
    g = call.g
    layout = g.common_layout(call.ins)
    axis = g.axis(layout, int(call.layer.axis), call.x.rank)
    out = g.node("Concat", [g.get(v, layout) for v in call.ins], call.name, axis=axis)
    return [call.out(out, layout)]


@converts("Rescaling")
def rescaling(call: Call) -> list[Value]:
    g, x = call.g, call.x
    layout = g.layout(x)
    scale = np.asarray(call.layer.scale, dtype=np.float32)
    offset = np.asarray(call.layer.offset, dtype=np.float32)
    out = g.node("Mul", [g.get(x, layout), g.const_for(scale, layout, x.rank,
                                                       f"{call.name}.scale")],
                 call.name if not offset.any() else f"{call.name}_scale")
    if offset.any():
        out = g.node("Add", [out, g.const_for(offset, layout, x.rank, f"{call.name}.offset")],
                     call.name)
    return [call.out(out, layout)]


@converts("LayerNormalization")
def layer_norm(call: Call) -> list[Value]:
    layer, g, x = call.layer, call.g, call.x
    if getattr(layer, "rms_scaling", False):
        raise call.fail("rms_scaling=True is not supported")
    axes = sorted(norm_axis(int(a), x.rank) for a in (
        layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]))
    if axes != list(range(axes[0], x.rank)):
        raise call.fail(f"axis={layer.axis} (the last axes are supported)")
    norm_shape = tuple(int(x.shape[a]) for a in axes)  # type: ignore[arg-type]
    gamma = call.weight(layer.gamma).reshape(norm_shape) if layer.scale else \
        np.ones(norm_shape, np.float32)
    beta = call.weight(layer.beta).reshape(norm_shape) if layer.center else \
        np.zeros(norm_shape, np.float32)
    out = g.node("LayerNormalization", [g.get(x, KERAS), g.const(gamma, f"{call.name}.gamma"),
                                        g.const(beta, f"{call.name}.beta")], call.name,
                 axis=axes[0], epsilon=float(layer.epsilon))
    return [call.out(out, KERAS)]


@converts("Embedding")
def embedding(call: Call) -> list[Value]:
    g, x = call.g, call.x
    if getattr(call.layer, "mask_zero", False):
        raise call.fail("mask_zero=True (masks are not converted)")
    ids = g.get(x, KERAS)
    if x.dtype not in (TensorProto.INT32, TensorProto.INT64):
        ids = g.node("Cast", [ids], f"{call.name}_ids", to=TensorProto.INT64)
    table = g.const(call.weight(call.layer.embeddings), f"{call.name}.weight")
    return [call.out(g.node("Gather", [table, ids], call.name, axis=0), KERAS,
                     dtype=TensorProto.FLOAT)]


@converts("Normalization")
def normalization(call: Call) -> list[Value]:
    layer, g, x = call.layer, call.g, call.x
    if getattr(layer, "invert", False):
        raise call.fail("invert=True is not supported")
    import keras

    mean, var = call.weight(layer.mean), call.weight(layer.variance)  # broadcast shapes
    std = np.maximum(np.sqrt(var), np.float32(keras.backend.epsilon())).astype(np.float32)
    layout = g.layout(x)
    centred = g.node("Sub", [g.get(x, layout), g.const_for(mean, layout, x.rank,
                                                           f"{call.name}.mean")],
                     f"{call.name}_centre")
    out = g.node("Div", [centred, g.const_for(std, layout, x.rank, f"{call.name}.std")],
                 call.name)
    return [call.out(out, layout)]
