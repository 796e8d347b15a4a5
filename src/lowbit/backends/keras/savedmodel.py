"""TensorFlow SavedModel folders to lowbit's float ONNX model.

Keras 3 cannot load a SavedModel as a Keras model (only as an opaque ``TFSMLayer``), so
lowbit converts the graph itself: the ``serving_default`` signature is frozen
(``convert_variables_to_constants_v2``: variables become constants), every tensor that
depends on constants only (a BatchNorm's ``rsqrt(var + eps) * gamma``, a reshaped bias)
is computed once by TensorFlow, and the ops the outputs need are converted by
``tf_ops`` (Conv2D, MatMul, BiasAdd, pools, ...). Shapes come from TensorFlow's static
shape inference, so a Flatten's ``Shape -> StridedSlice -> Pack`` chain is not needed:
its Reshape uses the static output shape. The layout rule is the Keras converter's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lowbit.backends.keras import tf_ops
from lowbit.backends.keras.env import import_tf
from lowbit.backends.keras.graph import Graph, Value
from lowbit.errors import ModelLoadError, UnsupportedOpError

SIGNATURE = "serving_default"


def is_savedmodel_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "saved_model.pb").is_file()
                              or (path / "saved_model.pbtxt").is_file())


def savedmodel_to_onnx(folder: str | Path) -> onnx.ModelProto:
    """Convert the ``serving_default`` signature of the SavedModel in ``folder``."""
    folder = Path(folder)
    tf = import_tf()
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    try:
        loaded = tf.saved_model.load(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"{folder}: not a readable TensorFlow SavedModel "
                             f"({_first_line(exc)})") from None
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if SIGNATURE not in signatures:
        have = ", ".join(sorted(signatures)) or "none"
        raise ModelLoadError(f"{folder}: the SavedModel has no '{SIGNATURE}' signature "
                             f"(it has: {have}); save it with signatures={{'{SIGNATURE}': ...}}")
    fn = signatures[SIGNATURE]
    try:
        frozen = convert_variables_to_constants_v2(fn)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: could not freeze signature '{SIGNATURE}' "
                             f"({_first_line(exc)})") from None
    outputs = fn.structured_outputs
    names = sorted(outputs) if isinstance(outputs, dict) else \
        [f"output_{i}" for i in range(len(frozen.outputs))]
    return _Converter(tf, frozen, str(folder)).convert(names)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class _Converter:
    """One frozen signature graph -> ONNX (``tf_ops`` converts the ops)."""

    def __init__(self, tf: Any, frozen: Any, source: str) -> None:
        self.tf, self.source = tf, source
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
        self.inputs = [self.graph.get_tensor_by_name(t.name) for t in frozen.inputs]
        self.outputs = [self.graph.get_tensor_by_name(t.name) for t in frozen.outputs]
        self.g = Graph("savedmodel")
        self.values: dict[str, Value] = {}
        self.consts: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------ for tf_ops

    def value(self, tensor: Any) -> Value:
        if tensor.name not in self.values:
            raise UnsupportedOpError(f"{self.source}: tensor '{tensor.name}' is a constant "
                                     "where lowbit expects data")
        return self.values[tensor.name]

    def const(self, tensor: Any) -> np.ndarray | None:
        return self.consts.get(tensor.name)

    def consumers(self, tensor: Any) -> int:
        return len(tensor.consumers()) + sum(t is tensor for t in self.outputs)

    def fail(self, op: Any, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.source}: operation '{op.name}' ({op.type}) cannot be "
                                  f"converted: {why}")

    # ------------------------------------------------------------ the walk

    def convert(self, out_names: list[str]) -> onnx.ModelProto:
        self.g.used.update(out_names)
        for t in self.inputs:
            name = t.op.name
            dtype = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype.as_numpy_dtype))
            self.values[t.name] = self.g.add_input(name, dtype, tuple(t.shape.as_list()))
        constant = self._constant_ops()
        order = self._needed(constant)
        self._fold([t for op in order for t in op.inputs if t.op in constant])
        for op in order:
            if op.type == "Placeholder":
                if op.outputs[0].name not in self.values:
                    raise self.fail(op, "a placeholder that is not an input of the signature")
                continue
            handler = tf_ops.OPS.get(op.type)
            if handler is None:
                raise UnsupportedOpError(
                    f"{self.source}: operation '{op.name}' ({op.type}) cannot be converted; "
                    f"supported: {', '.join(sorted(tf_ops.OPS))}")
            for tensor, value in zip(op.outputs, handler(self, op)):
                if value is not None:
                    self.values[tensor.name] = value
        results = []
        for name, tensor in zip(out_names, self.outputs):
            if tensor.name not in self.values:  # an output that is a constant
                raise UnsupportedOpError(f"{self.source}: output '{name}' does not depend on "
                                         "the inputs")
            results.append((name, self.values[tensor.name]))
        return self.g.finish(results, doc=f"converted by lowbit from the SavedModel {self.source}")

    def _constant_ops(self) -> set[Any]:
        """The ops whose outputs depend on constants only."""
        constant: set[Any] = set()
        for op in self.graph.get_operations():  # imported graphs are in topological order
            if op.type == "Const" or (op.inputs and op.type not in ("Placeholder",)
                                      and op.outputs and not op.control_inputs
                                      and all(t.op in constant for t in op.inputs)):
                constant.add(op)
        return constant

    def _needed(self, constant: set[Any]) -> list[Any]:
        """The non-constant ops the outputs need, inputs first. A Reshape's computed
        shape is not needed: its static output shape is used (``tf_ops.reshape``)."""
        seen: set[Any] = set()
        order: list[Any] = []
        stack: list[tuple[Any, bool]] = [(t.op, False) for t in reversed(self.outputs)]
        while stack:
            op, ready = stack.pop()
            if op in seen or op in constant:
                continue
            if ready:
                seen.add(op)
                order.append(op)
                continue
            stack.append((op, True))
            data = op.inputs[:1] if op.type == "Reshape" else op.inputs
            stack.extend((t.op, False) for t in reversed(list(data))
                         if t.op not in seen and t.op not in constant)
        return order

    def _fold(self, tensors: list[Any]) -> None:
        """Compute the constant tensors the converted ops read, in one TensorFlow run."""
        unique = list({t.name: t for t in tensors}.values())
        if not unique:
            return
        with self.tf.compat.v1.Session(graph=self.graph) as session:
            values = session.run(unique)
        for t, v in zip(unique, values):
            self.consts[t.name] = np.asarray(v)
