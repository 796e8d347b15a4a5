"""Build a TFLite flatbuffer: tensors, constant buffers, operator codes and operators,
packed through the schema classes LiteRT ships (``ai_edge_litert.schema_py_generated``).

The builder knows the file format and nothing about ONNX or quantization plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.backends.tflite import litert

# numpy dtype name -> TFLite TensorType
TENSOR_TYPES = {"float32": 0, "float16": 1, "int32": 2, "uint8": 3, "int64": 4, "bool": 6,
                "int16": 7, "int8": 9, "int4": 17}
PLACEHOLDER_FOR_GREATER_OP_CODES = 127


@dataclass(frozen=True)
class Quant:
    """A tensor's quantization: scales and zero points (one each per tensor, or one per
    channel along ``axis``)."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @classmethod
    def of(cls, scale: Any, zero_point: Any, axis: int = 0) -> Quant:
        s = np.asarray(scale, dtype=np.float64).reshape(-1)
        z = np.asarray(zero_point, dtype=np.int64).reshape(-1)
        if z.size == 1 and s.size > 1:
            z = np.repeat(z, s.size)
        return cls(tuple(float(v) for v in s), tuple(int(v) for v in z), int(axis))


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes, two per byte, low nibble first (TFLite's INT4 layout)."""
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = (flat.astype(np.uint8) & 0x0F).reshape(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8)


class FlatBuilder:
    """Collects one subgraph; ``finish`` returns the file's bytes."""

    def __init__(self) -> None:
        self.schema = litert("schema_py_generated")
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [self.schema.BufferT()]  # buffer 0: "no data"
        self.operators: list[Any] = []
        self._codes: dict[int, int] = {}
        self._opcodes: list[Any] = []
        self.names: set[str] = set()

    # ------------------------------------------------------------------ tensors
    def tensor(self, name: str, shape: tuple[int, ...], dtype: str, *,
               data: np.ndarray | None = None, quant: Quant | None = None,
               signature: tuple[int, ...] | None = None) -> int:
        """Add a tensor (a constant when ``data`` is given) and return its index.
        ``signature`` marks dynamic dimensions with -1 (the batch)."""
        s = self.schema
        t = s.TensorT()
        t.name = self._unique(name)
        t.shape = np.asarray([int(d) for d in shape], dtype=np.int32)
        if signature is not None and any(d < 0 for d in signature):
            t.shapeSignature = np.asarray(signature, dtype=np.int32)
        t.type = TENSOR_TYPES[dtype]
        if data is not None:
            raw = pack_int4(data) if dtype == "int4" else \
                np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            b = s.BufferT()
            b.data = np.ascontiguousarray(raw, dtype=np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if quant is not None:
            q = s.QuantizationParametersT()
            q.scale = np.asarray(quant.scale, dtype=np.float32)
            q.zeroPoint = np.asarray(quant.zero_point, dtype=np.int64)
            q.quantizedDimension = quant.axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def constant(self, name: str, array: np.ndarray, dtype: str | None = None, *,
                 quant: Quant | None = None) -> int:
        arr = np.asarray(array)
        return self.tensor(name, arr.shape, dtype or str(arr.dtype), data=arr, quant=quant)

    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def shape_of(self, index: int) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensors[index].shape)

    # ------------------------------------------------------------------ operators
    def op(self, kind: str, inputs: list[int], outputs: list[int], options: Any = None,
           options_type: int = 0, version: int = 1) -> None:
        """Add operator ``kind`` (a BuiltinOperator name, e.g. "CONV_2D"); input -1 is an
        omitted optional input."""
        s = self.schema
        code = getattr(s.BuiltinOperator, kind)
        if code not in self._codes:
            oc = s.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, PLACEHOLDER_FOR_GREATER_OP_CODES)
            oc.version = version
            self._codes[code] = len(self._opcodes)
            self._opcodes.append(oc)
        else:
            oc = self._opcodes[self._codes[code]]
            oc.version = max(oc.version, version)
        o = s.OperatorT()
        o.opcodeIndex = self._codes[code]
        o.inputs = np.asarray(inputs, dtype=np.int32)
        o.outputs = np.asarray(outputs, dtype=np.int32)
        if options is not None:
            o.builtinOptionsType = options_type
            o.builtinOptions = options
        self.operators.append(o)

    def options(self, kind: str, **fields: Any) -> tuple[Any, int]:
        """(``<kind>T`` options object with ``fields`` set, its BuiltinOptions number)."""
        s = self.schema
        obj = getattr(s, f"{kind}T")()
        for key, value in fields.items():
            if not hasattr(obj, key):
                raise AttributeError(f"internal: {kind} has no field {key}")
            setattr(obj, key, value)
        return obj, getattr(s.BuiltinOptions, kind)

    # ------------------------------------------------------------------ file
    def finish(self, inputs: list[tuple[str, int]], outputs: list[tuple[str, int]], *,
               description: str = "lowbit") -> bytes:
        import flatbuffers

        s = self.schema
        graph = s.SubGraphT()
        graph.tensors = self.tensors
        graph.inputs = np.asarray([i for _, i in inputs], dtype=np.int32)
        graph.outputs = np.asarray([i for _, i in outputs], dtype=np.int32)
        graph.operators = self.operators
        graph.name = "main"
        sig = s.SignatureDefT()
        sig.signatureKey = "serving_default"
        sig.subgraphIndex = 0
        sig.inputs = [self._map(n, i) for n, i in inputs]
        sig.outputs = [self._map(n, i) for n, i in outputs]
        model = s.ModelT()
        model.version = 3
        model.operatorCodes = self._opcodes
        model.subgraphs = [graph]
        model.description = description
        model.buffers = self.buffers
        model.signatureDefs = [sig]
        builder = flatbuffers.Builder(1024 + sum(len(b.data) for b in self.buffers
                                                 if b.data is not None))
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def _map(self, name: str, index: int) -> Any:
        m = self.schema.TensorMapT()
        m.name = name
        m.tensorIndex = index
        return m
