"""One Keras layer call being converted, and the registry of layer converters.

A converter is registered for a Keras layer class *name* with ``@converts("Conv2D")``;
the walker matches the layer's exact class (``keras.layers.Conv2D``), so a user's subclass
that overrides ``call`` is never taken for the built-in layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.backends.keras.activations import ACTIVATIONS, activation_name, apply_activation
from lowbit.backends.keras.graph import Graph, Value
from lowbit.errors import UnsupportedOpError


@dataclass
class Call:
    """A layer, the converted values it is called on, and its output shapes."""

    g: Graph
    layer: Any
    ins: list[Value]
    out_shapes: list[tuple[int | None, ...]]
    source: str  # the model's display name or file, for messages

    @property
    def name(self) -> str:
        return str(self.layer.name)

    @property
    def x(self) -> Value:
        return self.ins[0]

    def fail(self, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.source}: layer '{self.name}' "
                                  f"({type(self.layer).__name__}) cannot be converted: {why}")

    def weight(self, variable: Any) -> np.ndarray:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float32)

    def out(self, onnx_name: str, layout: str, i: int = 0, dtype: int | None = None) -> Value:
        """The ``i``-th output of this call, held as ``onnx_name`` in ``layout``."""
        return self.g.result(onnx_name, layout, self.out_shapes[i],
                             self.x.dtype if dtype is None else dtype)

    def activation(self, value: Value, fn: Any = None) -> Value:
        """The layer's ``activation`` (or ``fn``) applied to ``value``."""
        fn = getattr(self.layer, "activation", None) if fn is None else fn
        if fn is None:
            return value
        name = activation_name(fn)
        if name is None or name not in ACTIVATIONS:
            shown = getattr(fn, "__name__", type(fn).__name__)
            raise self.fail(f"activation {shown!r} is not one of: {', '.join(sorted(ACTIVATIONS))}")
        return apply_activation(self.g, value, name, f"{self.name}_{name}")


Converter = Callable[[Call], list[Value]]
LAYERS: dict[str, Converter] = {}  # Keras layer class name -> converter


def converts(*class_names: str) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        for name in class_names:
            LAYERS[name] = fn
        return fn

    return register


def pads_for(padding: str, size: tuple[int | None, ...], kernel: tuple[int, ...],
             strides: tuple[int, ...], dilations: tuple[int, ...]) -> list[int] | None:
    """ONNX ``pads`` (begins, then ends) for Keras ``padding`` over spatial ``size``;
    None where "same" meets a dynamic size (then ``auto_pad=SAME_UPPER``, TF's rule)."""
    if padding == "valid":
        return [0] * (2 * len(kernel))
    if any(n is None for n in size):
        return None
    totals = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)  # type: ignore[operator]
              for n, k, s, d in zip(size, kernel, strides, dilations)]
    return [t // 2 for t in totals] + [t - t // 2 for t in totals]
