"""Keras activation functions as ONNX nodes (the ``activation=`` of a layer and the
``Activation`` layer)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.backends.keras.graph import Graph, Value

F32 = np.float32


def _scalar(g: Graph, value: float, base: str) -> str:
    return g.const(np.array(value, dtype=F32), base)


def _swish(g: Graph, x: str, base: str) -> str:
    return g.node("Mul", [x, g.node("Sigmoid", [x], f"{base}_sigmoid")], base)


def _gelu(g: Graph, x: str, base: str) -> str:
    # 0.5 * x * (1 + erf(x / sqrt(2))), the exact GELU (what opset-17 exporters write)
    scaled = g.node("Mul", [x, _scalar(g, 1 / math.sqrt(2), f"{base}.rsqrt2")], f"{base}_scaled")
    erf = g.node("Erf", [scaled], f"{base}_erf")
    one_plus = g.node("Add", [erf, _scalar(g, 1.0, f"{base}.one")], f"{base}_add")
    half_x = g.node("Mul", [x, _scalar(g, 0.5, f"{base}.half")], f"{base}_half")
    return g.node("Mul", [half_x, one_plus], base)


def _mish(g: Graph, x: str, base: str) -> str:
    soft = g.node("Softplus", [x], f"{base}_softplus")
    return g.node("Mul", [x, g.node("Tanh", [soft], f"{base}_tanh")], base)


def _relu6(g: Graph, x: str, base: str) -> str:
    return g.node("Clip", [x, _scalar(g, 0.0, f"{base}.min"), _scalar(g, 6.0, f"{base}.max")],
                  base)


# name -> (graph, ONNX input, base name, softmax axis) -> ONNX output; None: the identity
ACTIVATIONS: dict[str, Callable[[Graph, str, str, int], str] | None] = {
    "linear": None,
    "relu": lambda g, x, b, axis: g.node("Relu", [x], b),
    "relu6": lambda g, x, b, axis: _relu6(g, x, b),
    "sigmoid": lambda g, x, b, axis: g.node("Sigmoid", [x], b),
    "tanh": lambda g, x, b, axis: g.node("Tanh", [x], b),
    "softmax": lambda g, x, b, axis: g.node("Softmax", [x], b, axis=axis),
    "log_softmax": lambda g, x, b, axis: g.node("LogSoftmax", [x], b, axis=axis),
    "silu": lambda g, x, b, axis: _swish(g, x, b),
    "swish": lambda g, x, b, axis: _swish(g, x, b),
    "gelu": lambda g, x, b, axis: _gelu(g, x, b),
    "hard_sigmoid": lambda g, x, b, axis: g.node("HardSigmoid", [x], b, alpha=1 / 6, beta=0.5),
    "hard_silu": lambda g, x, b, axis: g.node("HardSwish", [x], b),
    "hard_swish": lambda g, x, b, axis: g.node("HardSwish", [x], b),
    "elu": lambda g, x, b, axis: g.node("Elu", [x], b, alpha=1.0),
    "selu": lambda g, x, b, axis: g.node("Selu", [x], b, alpha=1.6732632423543772,
                                          gamma=1.0507009873554805),
    "leaky_relu": lambda g, x, b, axis: g.node("LeakyRelu", [x], b, alpha=0.2),
    "softplus": lambda g, x, b, axis: g.node("Softplus", [x], b),
    "softsign": lambda g, x, b, axis: g.node("Softsign", [x], b),
    "exponential": lambda g, x, b, axis: g.node("Exp", [x], b),
    "mish": lambda g, x, b, axis: _mish(g, x, b),
}


def activation_name(fn: Any) -> str | None:
    """The name of a built-in Keras activation function, or None for anything else (a
    user's own function, a lambda, a layer)."""
    if isinstance(fn, str):
        return fn
    module = getattr(fn, "__module__", "") or ""
    name = getattr(fn, "__name__", None)
    if module.startswith("keras.") and name in ACTIVATIONS:
        return name
    return None


def apply_activation(g: Graph, x: Value, name: str, base: str) -> Value:
    """``name`` applied to ``x`` (in whichever layout ``x`` is held); softmax-like
    activations act on the source's last axis. ``name`` must be in ``ACTIVATIONS``."""
    emit = ACTIVATIONS[name]
    if emit is None:
        return x
    layout = g.layout(x)
    out = emit(g, g.get(x, layout), base, g.axis(layout, -1, x.rank))
    return g.result(out, layout, x.shape, x.dtype)
