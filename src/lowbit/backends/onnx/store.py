"""A float model held as a light graph proto plus its large weights as numpy arrays.

Protobuf keeps a message's memory until the whole message is freed, and
ONNX Runtime takes its own copy of every weight. To quantize a large model
in bounded memory (about the weights once for lowbit plus once for ONNX
Runtime), lowbit splits the model once after loading: large initializers
become dims-only references (``data_location=EXTERNAL`` with a location that
names no file) and their data lives in ``FloatModel.weights``. Sessions get
the arrays through ``SessionOptions.add_external_initializers``; writers
re-embed the ones they keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

MEMORY_LOCATION = "lowbit-in-memory"
SPLIT_MIN_BYTES = 64 * 1024


def _nbytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def is_reference(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == MEMORY_LOCATION for e in t.external_data)


def reference(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A dims-only initializer that stands for ``array`` held in memory."""
    t = onnx.TensorProto()
    t.name = name
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    t.dims.extend(array.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", MEMORY_LOCATION
    return t


def _copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.domain, out.model_version, out.doc_string = model.domain, model.model_version, model.doc_string
    out.opset_import.extend(model.opset_import)
    out.metadata_props.extend(model.metadata_props)
    out.functions.extend(model.functions)
    g, src = out.graph, model.graph
    g.name, g.doc_string = src.name, src.doc_string
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    g.quantization_annotation.extend(src.quantization_annotation)
    return out


@dataclass
class FloatModel:
    """``proto``: the graph with large initializers as references; ``weights``: their data.
    ``given``: set by ``normalise`` on a float16/bfloat16 model, which it turned into this
    float32 working copy (``precision.py``)."""

    proto: onnx.ModelProto
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    given: GivenPrecision | None = None

    @classmethod
    def split(cls, model: onnx.ModelProto, min_bytes: int = SPLIT_MIN_BYTES) -> FloatModel:
        skeleton = _copy_without_initializers(model)
        weights: dict[str, np.ndarray] = {}
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL and _nbytes(t) >= min_bytes:
                weights[t.name] = numpy_helper.to_array(t)
                skeleton.graph.initializer.append(reference(t.name, weights[t.name]))
            else:
                skeleton.graph.initializer.add().CopyFrom(t)
        return cls(skeleton, weights)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.weights:
            return self.weights[name]
        for t in self.proto.graph.initializer:
            if t.name == name and not is_reference(t):
                return numpy_helper.to_array(t)
        return None

    def set_weight(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Store ``array`` and return the reference initializer to put in a graph."""
        self.weights[name] = array
        return reference(name, array)

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """The initializer to put in the graph for ``array``: held here as a reference when
        it is large (as ``split`` does), embedded otherwise."""
        if array.nbytes >= SPLIT_MIN_BYTES:
            return self.set_weight(name, array)
        self.weights.pop(name, None)
        return numpy_helper.from_array(array, name)

    def joined(self) -> onnx.ModelProto:
        """A self-contained copy with every weight embedded (for saving or the checker)."""
        return embed_weights(self.proto, self.weights)


@dataclass(frozen=True)
class GivenPrecision:
    """How a float16/bfloat16 model was given, when lowbit works on a float32 copy of it:
    ``float_type`` ("float16", "bfloat16", "float16+bfloat16"), the ONNX element types
    found, those of the graph inputs/outputs and initializers that were cast up (by name),
    and the model as given (``original``)."""

    float_type: str
    types: frozenset[int]
    inputs: dict[str, int]
    outputs: dict[str, int]
    weights: dict[str, int]
    original: FloatModel

    @property
    def runs_as_given(self) -> bool:
        """Whether ONNX Runtime (CPU, Python) can run the model as given: float16 yes (it
        wraps ops in Casts), bfloat16 no (no kernels, and numpy has no bfloat16 to feed)."""
        return onnx.TensorProto.BFLOAT16 not in self.types


def embed_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = _copy_without_initializers(model)
    for t in model.graph.initializer:
        if is_reference(t):
            if t.name not in weights:
                raise KeyError(f"internal: no data for initializer {t.name}")
            out.graph.initializer.append(numpy_helper.from_array(weights[t.name], t.name))
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out
