"""float16 and bfloat16 models: lowbit works on a float32 copy and hands back the
model's own signature.

ONNX Runtime's CPU kernels compute in float32, and its integer kernels take float32
scales: a float16 model runs there only because ONNX Runtime wraps each op in Casts,
and a bfloat16 one does not run at all (no bfloat16 Relu or MatMul kernel; measured
with onnxruntime 1.32). So ``normalise`` turns a float16/bfloat16 graph into a
float32 working copy (``to_float32``): initializers and tensor attributes are cast up
(exactly: every float16 and bfloat16 value is a float32 value), Casts and ``dtype``
attributes that name float16/bfloat16 name float32 instead, and graph input, output and
value_info types become float32. Planning, calibration and the writers then see an
ordinary float32 model. ``restore_signature`` puts the user's signature back on what
was written: Casts at the graph inputs and outputs, so the model takes and returns the
dtypes it was given with, and the model's own weights that stayed float (layers lowbit
did not quantize) are stored in their given type again behind a Cast, which ONNX
Runtime folds when it loads the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from lowbit.backends.onnx.graph import NameFactory
from lowbit.backends.onnx.store import FloatModel, GivenPrecision, is_reference
from lowbit.data import Dataset

LOW_FLOAT_TYPES = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
_TYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; Random*/EyeLike/Bernoulli output types
MIN_RESTORED_WEIGHT = 16  # smaller float weights stay float32 (a Cast per scalar buys nothing)


def low_float_types(model: onnx.ModelProto) -> frozenset[int]:
    """The float16/bfloat16 element types anywhere in ``model``'s graph (empty for a
    float32 model)."""
    g = model.graph
    found = {t.data_type for t in g.initializer}
    found |= {v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.INT and a.name in _TYPE_ATTRIBUTES:
                found.add(a.i)
            elif a.type == onnx.AttributeProto.TENSOR:
                found.add(a.t.data_type)
    return frozenset(found & LOW_FLOAT_TYPES.keys())


def snapshot(fm: FloatModel) -> FloatModel:
    """A copy of ``fm`` as given (its weight arrays shared: nothing changes them in
    place), kept as the reference a float16 result is verified and sized against."""
    proto = onnx.ModelProto()
    proto.CopyFrom(fm.proto)
    return FloatModel(proto, dict(fm.weights))


def to_float32(fm: FloatModel, original: FloatModel) -> GivenPrecision | None:
    """In place: ``fm`` becomes its float32 working copy. Returns what restoring the
    user's signature needs (None, and nothing changed, for a model without float16 or
    bfloat16). ``original``: ``fm`` as given (``snapshot``)."""
    types = low_float_types(fm.proto)
    if not types:
        return None
    g = fm.proto.graph
    inputs = {v.name: v.type.tensor_type.elem_type for v in g.input
              if v.type.tensor_type.elem_type in types}
    outputs = {v.name: v.type.tensor_type.elem_type for v in g.output
               if v.type.tensor_type.elem_type in types}
    weights = {}
    for k, t in enumerate(g.initializer):
        if t.data_type not in types:
            continue
        weights[t.name] = t.data_type
        value = fm.weights[t.name] if is_reference(t) else numpy_helper.to_array(t)
        g.initializer[k].CopyFrom(fm.tensor(t.name, np.asarray(value, dtype=np.float32)))
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type in types:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.INT and a.name in _TYPE_ATTRIBUTES and a.i in types:
                a.i = TensorProto.FLOAT
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type in types:
                a.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
    name = "+".join(LOW_FLOAT_TYPES[t] for t in sorted(types))
    return GivenPrecision(name, types, inputs, outputs, weights, original)


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def restore_signature(model: onnx.ModelProto, given: GivenPrecision) -> onnx.ModelProto:
    """A copy of ``model`` (written from the float32 working copy) that takes and returns
    the dtypes the model was given with, its untouched float weights stored as given."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = NameFactory(out)
    graph_inputs = {v.name for v in g.input}
    head: list[onnx.NodeProto] = []
    tail: list[onnx.NodeProto] = []
    for v in g.input:
        elem = given.inputs.get(v.name)
        if elem is None or v.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        working = names(f"{v.name}_float32")
        _rename(g, v.name, working, outputs=False)
        head.append(onnx.helper.make_node("Cast", [v.name], [working], to=TensorProto.FLOAT,
                                          name=names(f"Cast_{v.name}_to_float32")))
        v.type.tensor_type.elem_type = elem
    for v in g.output:
        elem = given.outputs.get(v.name)
        if elem is None or v.name in graph_inputs or \
                v.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        working = names(f"{v.name}_float32")
        _rename(g, v.name, working, outputs=True)
        tail.append(onnx.helper.make_node("Cast", [working], [v.name], to=elem,
                                          name=names(f"Cast_{v.name}_to_{LOW_FLOAT_TYPES[elem]}")))
        v.type.tensor_type.elem_type = elem
    head += _store_weights_as_given(g, given, names)
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    return out


def _store_weights_as_given(g: onnx.GraphProto, given: GivenPrecision,
                            names: NameFactory) -> list[onnx.NodeProto]:
    """The model's own float weights still in ``g`` (float layers, biases of float ops)
    go back to their given type behind a Cast: the file keeps its float16 size for them,
    and ONNX Runtime folds the Cast at load, so they compute in float32 as before."""
    casts = []
    outputs = {v.name for v in g.output}
    for k, t in enumerate(g.initializer):
        elem = given.weights.get(t.name)
        if elem is None or t.data_type != TensorProto.FLOAT or t.name in outputs \
                or is_reference(t) or np.prod(t.dims) < MIN_RESTORED_WEIGHT:
            continue
        stored = names(f"{t.name}_{LOW_FLOAT_TYPES[elem]}")
        value = numpy_helper.to_array(t).astype(_np_dtype(elem))
        casts.append(onnx.helper.make_node("Cast", [stored], [t.name], to=TensorProto.FLOAT,
                                           name=names(f"Cast_{stored}")))
        g.initializer[k].CopyFrom(numpy_helper.from_array(value, stored))
    return casts


def _rename(g: onnx.GraphProto, old: str, new: str, *, outputs: bool) -> None:
    """Every node reading ``old`` reads ``new``; with ``outputs``, the node (or the
    initializer) producing ``old`` produces ``new``."""
    for node in g.node:
        for k, x in enumerate(node.input):
            if x == old:
                node.input[k] = new
        if outputs:
            for k, x in enumerate(node.output):
                if x == old:
                    node.output[k] = new
    if outputs:
        for t in g.initializer:
            if t.name == old:
                t.name = new
    for v in g.value_info:
        if v.name == old:
            v.name = new


def as_given_dtypes(data: Dataset | None, given: GivenPrecision) -> Dataset | None:
    """``data`` (float32 for the working copy) with the inputs the model takes in float16
    cast to it, to feed the model as given and the written model."""
    if data is None:
        return None
    inputs = {k: np.ascontiguousarray(v.astype(_np_dtype(given.inputs[k])))
              if k in given.inputs else v for k, v in data.inputs.items()}
    return dataclasses.replace(data, inputs=inputs)


def describe(given: GivenPrecision, verb: str = "quantized") -> str:
    """The report's note on what lowbit did (``verb``) with a float16/bfloat16 model."""
    kind = given.float_type
    edges = (f"the written model keeps its {kind} inputs/outputs (Casts at the edges) and "
             f"stores the weights it left in float as {kind}"
             if given.inputs or given.outputs else
             f"the written model stores the weights it left in float as {kind}")
    where = ("agreement and latency are against the model as given" if given.runs_as_given
             else "agreement and latency are measured on the float32 copy, before the "
                  "bfloat16 Casts: ONNX Runtime has no bfloat16 kernels for most CPU ops "
                  "(the model as given does not run there) and its Python API takes no "
                  "bfloat16 arrays")
    return (f"the model is {kind}: lowbit {verb} a float32 working copy of it (every "
            f"{kind} value is exact in float32); {edges}; {where}")
