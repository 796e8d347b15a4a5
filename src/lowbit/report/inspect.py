"""``lowbit inspect``: operators, parameters, dtypes, per-layer sizes, and which
nodes are quantized and which stay in float, and why."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from lowbit.backends.onnx.registry import NEUTRAL_OPS, rule_for

INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearAdd", "MatMulNBits"}
COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool",
               "AveragePool", "ConvTranspose"}


def _tensor_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return n * itemsize


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    from lowbit.backends.tflite.session import is_tflite
    from lowbit.model_io import decode_lbz, is_lbz, read_any

    if is_tflite(path):
        from lowbit.backends.tflite.inspect import read_structure

        return {"model": str(path), "format": "tflite",
                **read_structure(Path(path).read_bytes(), str(path))}
    if not is_lbz(path):
        model = read_any(path)
        return inspect_proto(model, name=str(path), size=Path(path).stat().st_size)
    from lowbit.container import breakdown, read_lbz_file

    data = read_lbz_file(path)  # read once: decoded and broken down
    info = inspect_proto(decode_lbz(data, str(path)), name=str(path), size=len(data))
    info["lbz"] = breakdown(data)
    return info


def inspect_proto(model: onnx.ModelProto, *, name: str = "model", size: int | None = None) -> dict[str, Any]:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    dtype_bytes: Counter[str] = Counter()
    dtype_params: Counter[str] = Counter()
    for t in graph.initializer:
        dt = onnx.TensorProto.DataType.Name(t.data_type).lower()
        dtype_bytes[dt] += _tensor_bytes(t)
        n = 1
        for d in t.dims:
            n *= d
        dtype_params[dt] += n
    meta = {p.key: p.value for p in model.metadata_props}
    decisions = {}
    if "lowbit.decisions" in meta:
        try:
            decisions = {d["name"]: d for d in json.loads(meta["lowbit.decisions"])}
        except (ValueError, KeyError, TypeError):
            decisions = {}

    def const_bytes(x: str, depth: int = 0) -> tuple[int, list[str]]:
        if x in inits:
            t = inits[x]
            return _tensor_bytes(t), [onnx.TensorProto.DataType.Name(t.data_type).lower()]
        node = producer.get(x)
        if node is not None and node.op_type == "DequantizeLinear" and depth == 0:
            total, dts = 0, []
            for i in node.input:
                b, d = const_bytes(i, 1)
                total += b
                dts += d[:1] if i == node.input[0] else []
            return total, dts
        return 0, []

    layers = []
    for i, node in enumerate(graph.node):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        nbytes, dts = 0, []
        for x in node.input[1:] if node.op_type not in INTEGER_OPS else node.input:
            b, d = const_bytes(x)
            nbytes += b
            dts += d
        fed_dq = any(producer.get(x) is not None and producer[x].op_type == "DequantizeLinear"
                     for x in node.input)
        label = node.name or f"{node.op_type}_{i}"
        decision = decisions.get(label)
        if decision is not None:
            status, reason = decision["treatment"], decision.get("reason", "")
        elif node.op_type in INTEGER_OPS or node.domain == "com.microsoft":
            status, reason = "integer", "integer operator"
        elif fed_dq:
            status, reason = "int8 (QDQ)", "fed by DequantizeLinear"
        elif node.op_type in COMPUTE_OPS or rule_for(node.op_type):
            status, reason = "float", "not quantized in this file"
        elif node.op_type in NEUTRAL_OPS:
            status, reason = "float", "no float arithmetic to quantize"
        else:
            status, reason = "float", "not in lowbit's INT8 op registry"
        if nbytes or node.op_type in COMPUTE_OPS or status != "float" or reason:
            layers.append({"name": label, "op_type": node.op_type, "status": status,
                           "reason": reason, "weight_bytes": nbytes,
                           "weight_dtypes": sorted(set(dts))})
    opsets = {(imp.domain or "ai.onnx"): int(imp.version) for imp in model.opset_import}
    return {
        "model": name,
        "size_bytes": size if size is not None else model.ByteSize(),
        "ir_version": int(model.ir_version),
        "opsets": opsets,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_io(v) for v in graph.input if v.name not in inits],
        "outputs": [_io(v) for v in graph.output],
        "operators": dict(Counter(n.op_type for n in graph.node).most_common()),
        "parameters": int(sum(dtype_params.values())),
        "parameters_by_dtype": dict(dtype_params),
        "bytes_by_dtype": dict(dtype_bytes),
        "layers": layers,
        "quantized_by": "lowbit" if "lowbit.decisions" in meta else None,
    }


def _io(v: onnx.ValueInfoProto) -> dict[str, Any]:
    tt = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return {"name": v.name, "dtype": onnx.TensorProto.DataType.Name(tt.elem_type).lower(),
            "shape": dims}
