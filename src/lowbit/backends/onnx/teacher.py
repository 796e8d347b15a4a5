"""A teacher for distillation, run by ONNX Runtime: its first output for one run's inputs
and, for feature distillation, the intermediate tensors it shares with the student."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.calibrate import expose_tensors
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.store import FloatModel

FEATURE_OPS = ("Conv", "Gemm", "MatMul", "Relu")
MAX_FEATURES = 8


def onnx_teacher(fm: FloatModel, *, threads: int = 1, features: tuple[str, ...] = ()
                 ) -> Callable[[list[np.ndarray]], Any]:
    """The teacher's first output for one run's inputs; with ``features``, the list
    ``[output, *those tensors]``."""
    session = make_session(expose_tensors(fm, list(features)) if features else fm,
                           threads=threads, name="teacher")
    names = [i.name for i in session.get_inputs()]
    wanted = [session.get_outputs()[0].name, *features]

    def outputs(inputs: list[np.ndarray]) -> Any:
        values = session.run(wanted if features else wanted[:1], dict(zip(names, inputs)))
        return [np.asarray(v) for v in values] if features else np.asarray(values[0])
    return outputs


def _shapes(fm: FloatModel) -> dict[str, tuple[Any, ...]]:
    inferred = onnx.shape_inference.infer_shapes(fm.proto)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
    return out


def matching_features(teacher: FloatModel, student: FloatModel,
                      limit: int = MAX_FEATURES) -> tuple[str, ...]:
    """Intermediate tensors (outputs of Conv/Gemm/MatMul/Relu) that both graphs compute,
    by name and with the same shape: the student is the teacher compressed (pruned,
    clustered, quantized), so every layer whose width survived matches. At most
    ``limit``, spread over the depth; never a graph output."""
    t_shapes, s_shapes = _shapes(teacher), _shapes(student)
    finals = {o.name for o in student.proto.graph.output}
    names = [o for n in student.proto.graph.node if n.op_type in FEATURE_OPS for o in n.output[:1]
             if o not in finals and o in t_shapes and s_shapes.get(o) == t_shapes[o]
             and s_shapes[o]]
    if len(names) > limit:
        step = len(names) / limit
        names = [names[int(i * step)] for i in range(limit)]
    return tuple(names)
