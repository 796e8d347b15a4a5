"""Keras 3 Functional and Sequential models to lowbit's float ONNX model.

The walk follows the model's own layer graph (each output tensor's ``_keras_history``
leads to the layer call that made it), converts each call with the converter registered
for its exact class (``layers_conv``, ``layers_core``), and inlines nested models. The
ONNX graph's inputs and outputs keep Keras' names, shapes (NHWC images, dynamic batch)
and dtypes; convolutions run channels-first behind one Transpose (see ``graph``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from lowbit.backends.keras import layers_conv, layers_core  # noqa: F401  (register converters)
from lowbit.backends.keras.call import LAYERS, Call
from lowbit.backends.keras.env import import_keras
from lowbit.backends.keras.graph import Graph, Value
from lowbit.errors import UnsupportedOpError, ValidationError


def keras_to_onnx(model: Any, *, name: str) -> onnx.ModelProto:
    """The float ONNX model computing what ``model(x)`` computes at inference.

    ``name``: how messages name the model (its file, or its Keras name). A layer no
    converter exists for is an ``UnsupportedOpError`` naming the layer and its class."""
    keras = import_keras("converting a Keras model")
    if not isinstance(model, keras.Model):
        raise ValidationError(f"{name}: expected a keras.Model, got {type(model).__name__}")
    inputs, outputs = _graph_ends(model, name)
    in_names = _unique([_producer(t).name for t in inputs])
    out_names = _unique(_output_names(model, outputs), taken=set(in_names))
    g = Graph(str(model.name), reserved=in_names + out_names)
    feeds = [g.add_input(n, _onnx_dtype(t.dtype), tuple(t.shape)) for n, t in zip(in_names, inputs)]
    walker = _Walker(g, keras, name)
    values = walker.run(model, feeds)
    doc = f"converted by lowbit from the Keras model '{model.name}'"
    try:
        return g.finish(list(zip(out_names, values)), doc=doc)
    except Exception as exc:  # a converter bug, not the user's: say which model
        raise UnsupportedOpError(f"{name}: the converted ONNX graph is invalid "
                                 f"({str(exc).splitlines()[0][:300]})") from exc


def supported_layers() -> list[str]:
    return sorted([*LAYERS, "InputLayer", "Functional", "Sequential"])


def _graph_ends(model: Any, name: str) -> tuple[list[Any], list[Any]]:
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError, TypeError):
        inputs = outputs = []
    if not inputs or not outputs:
        kind = type(model).__name__
        if kind == "Sequential":
            raise ValidationError(f"{name}: the Sequential model '{model.name}' has not been "
                                  "built: start it with keras.Input(shape) or call it once on data")
        raise UnsupportedOpError(
            f"{name}: model '{model.name}' ({kind}) is a subclassed Keras model with no layer "
            "graph; lowbit converts Functional and Sequential models (or export it with "
            "model.export(folder) and give lowbit that SavedModel folder)")
    return inputs, outputs


def _producer(tensor: Any) -> Any:
    return tensor._keras_history.operation


def _output_names(model: Any, outputs: list[Any]) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(outputs) or not all(isinstance(n, str) and n for n in names):
        names = [_producer(t).name for t in outputs]
    return names


def _unique(names: list[str], taken: set[str] | None = None) -> list[str]:
    seen, out = set(taken or ()), []
    for n in names:
        name, k = n, 1
        while name in seen:
            name, k = f"{n}_{k}", k + 1
        seen.add(name)
        out.append(name)
    return out


def _onnx_dtype(dtype: Any) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(str(dtype)))


class _Walker:
    """Converts the layer calls of a (possibly nested) model in dependency order."""

    def __init__(self, g: Graph, keras: Any, source: str) -> None:
        self.g, self.keras, self.source = g, keras, source
        self.types = {getattr(keras.layers, n): n for n in LAYERS if hasattr(keras.layers, n)}

    def run(self, model: Any, feeds: list[Value]) -> list[Value]:
        """The values of ``model``'s outputs, its inputs fed with ``feeds``."""
        model_inputs, outputs = _graph_ends(model, self.source)
        if len(model_inputs) != len(feeds):
            raise UnsupportedOpError(f"{self.source}: nested model '{model.name}' takes "
                                     f"{len(model_inputs)} inputs but is called on {len(feeds)}")
        env: dict[int, Value] = {id(t): v for t, v in zip(model_inputs, feeds)}
        stack: list[tuple[Any, bool]] = [(t, False) for t in reversed(outputs)]
        while stack:
            tensor, ready = stack.pop()
            if id(tensor) in env:
                continue
            history = getattr(tensor, "_keras_history", None)
            if history is None:
                raise UnsupportedOpError(f"{self.source}: a tensor of model '{model.name}' "
                                         "does not come from a layer")
            node = history.operation._inbound_nodes[history.node_index]
            if ready:
                self._call(node, env)
                continue
            if isinstance(history.operation, self.keras.layers.InputLayer):
                raise UnsupportedOpError(f"{self.source}: input '{history.operation.name}' of "
                                         f"model '{model.name}' is not one of its inputs")
            stack.append((tensor, True))
            stack.extend((t, False) for t in reversed(node.input_tensors) if id(t) not in env)
        return [env[id(t)] for t in outputs]

    def _call(self, node: Any, env: dict[int, Value]) -> None:
        op = node.operation
        ins = [env[id(t)] for t in node.input_tensors]
        if isinstance(op, self.keras.Model):  # a nested model: inline its graph
            values = self.run(op, ins)
        else:
            values = self._layer(op, node, ins)
        for tensor, value in zip(node.outputs, values):
            env[id(tensor)] = value

    def _layer(self, op: Any, node: Any, ins: list[Value]) -> list[Value]:
        cls = type(op).__name__
        if not isinstance(op, self.keras.layers.Layer):
            return [self._arithmetic(op, node, ins)]
        kind = self.types.get(type(op))
        if kind is None:
            raise UnsupportedOpError(f"{self.source}: layer '{op.name}' ({cls}) cannot be "
                                     f"converted; supported: {', '.join(supported_layers())}")
        call = Call(self.g, op, ins, [tuple(t.shape) for t in node.outputs], self.source)
        if getattr(op, "quantization_mode", None):
            raise call.fail(f"it is quantized by Keras ({op.quantization_mode}); convert "
                            "the float model")
        kwargs = getattr(node.arguments, "kwargs", {}) or {}
        if kwargs.get("training") is True:
            raise call.fail("it is called with training=True")
        if any(kwargs.get(k) is not None for k in ("mask", "attention_mask")):
            raise call.fail("it is called with a mask (masks are not converted)")
        return LAYERS[kind](call)

    def _arithmetic(self, op: Any, node: Any, ins: list[Value]) -> Value:
        """``x + 3.0``, ``x * y``, ... written on Keras tensors in a functional model
        (``keras.ops`` add, subtract, multiply, divide): one ONNX node."""
        cls = type(op).__name__
        args = list(getattr(node.arguments, "args", ()))
        if type(op).__module__ != "keras.src.ops.numpy" or cls not in _ARITHMETIC \
                or len(args) != 2 or getattr(node.arguments, "kwargs", None):
            raise UnsupportedOpError(
                f"{self.source}: operation '{op.name}' (keras.ops {cls}) cannot be converted; "
                "use the matching Keras layer instead (keras.ops add, subtract, multiply and "
                "divide are supported)")
        g, tensors = self.g, iter(ins)
        values = [next(tensors) if isinstance(a, self.keras.KerasTensor) else None for a in args]
        data = [v for v in values if v is not None]
        layout = g.common_layout(data)
        rank = max(v.rank for v in data)
        names = [g.get(v, layout) if v is not None else
                 g.const_for(np.asarray(a, dtype=np.float32), layout, rank, f"{op.name}.const")
                 for v, a in zip(values, args)]
        return g.result(g.node(_ARITHMETIC[cls], names, op.name), layout,
                        tuple(node.outputs[0].shape), data[0].dtype)


_ARITHMETIC = {"Add": "Add", "Subtract": "Sub", "Multiply": "Mul", "Divide": "Div",
               "TrueDivide": "Div"}
