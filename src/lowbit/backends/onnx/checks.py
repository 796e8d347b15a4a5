"""Checks of a model and its data that refuse bad input with one clear message."""

from __future__ import annotations

import numpy as np
import onnx

from lowbit.backends.onnx.graph import GraphIndex
from lowbit.backends.onnx.store import FloatModel
from lowbit.data import Dataset
from lowbit.errors import DataError, ValidationError


def check_token_ids(fm: FloatModel | onnx.ModelProto, data: Dataset) -> None:
    """Integer inputs that index an embedding table must lie inside its vocabulary."""
    index = GraphIndex(fm, {}) if isinstance(fm, onnx.ModelProto) else GraphIndex(fm.proto, fm.weights)
    for name, arr in data.inputs.items():
        if arr.dtype.kind not in "iu":
            continue
        for node in index.consumers.get(name, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name \
                    and node.input[0] in index.initializers:
                vocab = int(index.initializers[node.input[0]].dims[0])
                lo, hi = int(arr.min()), int(arr.max())
                if lo < -vocab or hi >= vocab:
                    raise DataError(
                        f"{data.source}: token ids in '{name}' range over [{lo}, {hi}], but the "
                        f"embedding table '{node.input[0]}' has {vocab} rows")


# Ops whose float constant inputs are weights: an inf there is a broken model. (A -inf
# constant feeding Where/Add is a legitimate attention mask and is allowed.)
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
                         "LayerNormalization", "InstanceNormalization", "Gather", "PRelu"})


def check_finite_weights(fm: FloatModel, *, name: str = "model") -> None:
    """NaN anywhere, or inf in a weight, is an error naming the tensor."""
    weights = {x for n in fm.proto.graph.node if n.op_type in _WEIGHT_OPS for x in n.input}
    for tensor in fm.proto.graph.initializer:
        if tensor.data_type not in (
            onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
        ):
            continue
        arr = fm.constant(tensor.name)
        if arr is None:
            continue
        bad_mask = ~np.isfinite(arr) if tensor.name in weights else np.isnan(arr)
        bad = int(np.count_nonzero(bad_mask))
        if bad:
            what = "NaN/inf" if tensor.name in weights else "NaN"
            raise ValidationError(
                f"{name}: weight tensor '{tensor.name}' contains {bad} {what} value(s)"
            )
