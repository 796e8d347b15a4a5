"""Read a ``.tflite`` file's structure for ``lowbit inspect`` and the report: operators
with the type of their weights, tensor bytes by type, inputs and outputs."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from lowbit.backends.tflite import litert
from lowbit.backends.tflite.flatbuffer import TENSOR_TYPES
from lowbit.errors import ModelLoadError

TYPE_NAMES = {v: k for k, v in TENSOR_TYPES.items()}
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")


def read_structure(content: bytes, source: str = "model") -> dict[str, Any]:
    """Operators (kind, input types, "int8"/"hybrid"/"float" execution), constant bytes by
    tensor type, graph inputs/outputs."""
    s = litert("schema_py_generated")
    try:
        if content[4:8] != b"TFL3":
            raise ValueError("no TFL3 identifier")
        model = s.ModelT.InitFromObj(s.Model.GetRootAs(content, 0))
    except Exception as exc:
        raise ModelLoadError(f"{source}: not a readable TFLite file: {exc}") from None
    names = {getattr(s.BuiltinOperator, k): k for k in dir(s.BuiltinOperator)
             if not k.startswith("_")}
    graph = model.subgraphs[0]
    tensors = graph.tensors
    buffers = model.buffers

    def type_of(i: int) -> str:
        return TYPE_NAMES.get(tensors[i].type, str(tensors[i].type)) if i >= 0 else "-"

    def is_const(i: int) -> bool:
        b = tensors[i].buffer
        return i >= 0 and b > 0 and buffers[b].data is not None and len(buffers[b].data) > 0

    ops = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
        ins = [int(i) for i in op.inputs]
        data = [type_of(i) for i in ins if i >= 0 and not is_const(i)]
        weights = [type_of(i) for i in ins if i >= 0 and is_const(i)]
        execution = "float"
        if kind in WEIGHTED_OPS:
            wtype = weights[0] if weights else "float32"
            execution = "int8" if data and data[0] == "int8" else \
                "hybrid" if wtype in ("int8", "int4") else "float"
        elif data and data[0] == "int8" and kind not in ("DEQUANTIZE",):
            execution = "int8"
        ops.append({"op": kind, "execution": execution, "weights": weights[:1]})
    const_bytes: Counter[str] = Counter()
    for t in tensors:
        if t.buffer > 0 and buffers[t.buffer].data is not None:
            const_bytes[TYPE_NAMES.get(t.type, str(t.type))] += len(buffers[t.buffer].data)

    def io(indices: Any) -> list[dict[str, Any]]:
        out = []
        for i in np.asarray(indices).reshape(-1):
            t = tensors[int(i)]
            name = t.name.decode() if isinstance(t.name, bytes) else t.name
            out.append({"name": name, "type": type_of(int(i)),
                        "shape": [int(d) for d in (t.shapeSignature if t.shapeSignature
                                                   is not None else t.shape)]})
        return out

    return {"operators": ops, "op_counts": dict(Counter(o["op"] for o in ops)),
            "execution": dict(Counter(o["execution"] for o in ops if o["op"] in WEIGHTED_OPS)),
            "constant_bytes": dict(const_bytes), "inputs": io(graph.inputs),
            "outputs": io(graph.outputs), "size_bytes": len(content)}
