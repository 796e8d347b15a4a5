"""Write the TFLite model a quantization plan describes (issue 11).

``write_tflite(fm, plan)`` walks lowbit's float ONNX graph once and emits TFLite ops in
NHWC. It consumes the plan and decides nothing: a STATIC node becomes an INT8 op (its
weights, INT32 bias and output scale from the plan, a folded Relu as the fused
activation), a DYNAMIC node a hybrid op (INT8 weights, float activations quantized per
batch by the kernel), a WEIGHT_ONLY node an INT4/INT8-weight hybrid FULLY_CONNECTED,
everything else a float op. QUANTIZE/DEQUANTIZE ops appear only where an INT8 tensor
meets a float op. ``weights="float16"`` stores float weights as float16 (+DEQUANTIZE).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.graph import node_name
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.tflite.flatbuffer import FlatBuilder, Quant
from lowbit.backends.tflite.ops import EMITTERS
from lowbit.backends.tflite.tensors import TensorTable, identity, int8_quant, scalar
from lowbit.errors import UnsupportedOpError
from lowbit.quant import affine
from lowbit.quant.plan import Fold, QuantizationPlan, Treatment
from lowbit.quant.scheme import Granularity, TensorQuantParams


def write_tflite(fm: FloatModel, plan: QuantizationPlan | None = None, *,
                 weights: str = "float32", io: str = "float", source: str = "model") -> bytes:
    """The ``.tflite`` bytes of ``fm`` quantized as ``plan`` says (None: float).
    ``io`` "int8" makes quantized graph inputs/outputs INT8 tensors."""
    w = Writer(fm, plan or QuantizationPlan(), weights=weights, io=io, source=source)
    for node, name in w.order:
        if name in w.saturations and w.saturate(node):
            continue
        if name in w.skipped:
            continue
        emit = EMITTERS.get(node.op_type)
        if emit is None:
            raise UnsupportedOpError(
                f"{source}: node {name!r} ({node.op_type}) has no TFLite equivalent in lowbit's "
                f"writer; supported: {', '.join(sorted(EMITTERS))}")
        emit(w, node, name)
    return w.finish()


class Writer:
    """State shared by the op emitters (``ops.py``)."""

    def __init__(self, fm: FloatModel, plan: QuantizationPlan, *, weights: str, io: str,
                 source: str) -> None:
        self.fm, self.plan, self.weights, self.io, self.source = fm, plan, weights, io, source
        self.b = FlatBuilder()
        model = onnx.shape_inference.infer_shapes(fm.joined())
        graph = model.graph
        self.graph = graph
        init = {t.name for t in graph.initializer}
        self.initializers = init
        shapes, dynamic = _shapes(graph, init, source)
        self.t = TensorTable(self.b, shapes, dynamic)
        self.order = [(n, node_name(n, i)) for i, n in enumerate(graph.node)]
        self.name_of = {id(n): name for n, name in self.order}
        self._op_types = {name: n.op_type for n, name in self.order}
        self.row_perm: dict[str, np.ndarray] = {}  # flattened NHWC data: logical column order
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n, _ in self.order:
            for x in n.input:
                self.consumers.setdefault(x, []).append(n)
        self.outputs = [o.name for o in graph.output]
        self.treatments = {d.name: d.treatment for d in plan.decisions}
        self.folds: dict[str, Fold] = {f.producer: f for f in plan.folds}
        self.skipped: set[str] = {f.activation for f in plan.folds}
        # a Relu/Clip folded into its own output's 8-bit range (nothing before it to fuse
        # into, e.g. a graph input): quantizing to that range saturates alike
        self.saturations = {f.activation for f in plan.folds if f.producer == f.activation}
        self.inputs: list[tuple[str, int]] = []
        for vi in graph.input:
            if vi.name in init:
                continue
            params = plan.tensors.get(vi.name) if vi.name in plan.activations else None
            if io == "int8" and params is not None:
                q = int8_quant(params)
                idx = self.t.new(vi.name, "int8", q, label=vi.name)
                self.t.set_int8(vi.name, idx, q)
            else:  # (the "float" version of an integer input is the input itself)
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
                    vi.type.tensor_type.elem_type)).name
                idx = self.t.new(vi.name, dtype if dtype in ("int32", "int64") else "float32",
                                 label=vi.name)
                self.t.set_float(vi.name, idx)
            self.inputs.append((vi.name, idx))

    # ------------------------------------------------------------------ plan queries
    def treatment(self, name: str) -> Treatment:
        return self.treatments.get(name, Treatment.FLOAT)

    def act_quant(self, tensor: str) -> Quant | None:
        """The INT8 parameters the plan gives activation ``tensor``, if any."""
        key = self.plan.shared.get(tensor, tensor)
        params = self.plan.tensors.get(key)
        if params is None or params.granularity is not Granularity.TENSOR or params.bits != 8:
            return None
        return int8_quant(params)

    def constant(self, name: str) -> np.ndarray | None:
        if name not in self.initializers:
            return None
        return self.fm.constant(name)

    def saturate(self, node: onnx.NodeProto) -> bool:
        """Write a self-folded Relu/Clip as the INT8 form of its output (a QUANTIZE of its
        input to the output's range); False when the plan gives that range no scale."""
        x, out = node.input[0], node.output[0]
        q = self.act_quant(out)
        if q is None:
            return False
        self.t.set_int8(out, self.t.int8_of(x, q), q, self.t.layout(x))
        return True

    # ------------------------------------------------------------------ fused activations
    def activation_after(self, node: onnx.NodeProto, name: str) -> tuple[str, str]:
        """(fused activation, output tensor) for a float/hybrid op: a lone Relu or
        Clip(0, 6) consumer is fused into it (and skipped)."""
        out = node.output[0]
        users = self.consumers.get(out, [])
        if out in self.outputs or len(users) != 1:
            return "NONE", out
        nxt = users[0]
        act = _activation_kind(nxt, self.constant)
        if act is None:
            return "NONE", out
        self.skipped.add(self.name_of[id(nxt)])
        return act, nxt.output[0]

    def bias_after(self, node: onnx.NodeProto, channels: int) -> tuple[str, onnx.NodeProto] | None:
        """(bias constant, the Add) when a float/hybrid MatMul's lone consumer adds a
        per-output-channel constant: the Add is skipped and the constant becomes the
        fully connected op's bias."""
        out = node.output[0]
        users = self.consumers.get(out, [])
        if out in self.outputs or len(users) != 1 or users[0].op_type != "Add":
            return None
        add = users[0]
        other = [x for x in add.input if x != out]
        value = self.constant(other[0]) if len(other) == 1 else None
        if value is None or value.size != channels or value.shape[-1:] != (channels,):
            return None
        self.skipped.add(self.name_of[id(add)])
        return other[0], add

    def static_activation(self, name: str, out: str) -> tuple[str, str]:
        """(fused activation, output tensor) of a static op: from the plan's fold."""
        fold = self.folds.get(name)
        if fold is None:
            return "NONE", out
        if fold.clip is None:  # a Relu, or a bias Add absorbed
            relu = self._op_types.get(fold.activation) == "Relu"
            return ("RELU" if relu else "NONE"), fold.output
        lo, hi = fold.clip
        kind = "RELU6" if (lo, hi) == (0.0, 6.0) else "RELU" if lo == 0.0 and hi == np.inf \
            else "NONE"  # any other clip: the output range saturates it
        return kind, fold.output

    # ------------------------------------------------------------------ weights
    def float_weight(self, name: str, array: np.ndarray, key: Any) -> int:
        """A float weight: float32, or float16 + DEQUANTIZE when asked."""
        b = self.b
        if self.weights != "float16":
            return self.t.const(("w", key), lambda: b.constant(name, array.astype(np.float32)))

        def make() -> int:
            half = b.constant(f"{name}/fp16", array.astype(np.float16))
            out = b.tensor(name, array.shape, "float32")
            b.op("DEQUANTIZE", [half], [out])
            return out
        return self.t.const(("w16", key), make)

    def quantized_weight(self, name: str, params: TensorQuantParams, values: np.ndarray,
                         layout: Any, axis: int, key: Any, *, packed: bool = False) -> int:
        """INT8 codes of ``values`` (ONNX layout), rearranged by ``layout`` (a function on
        arrays) with the channel axis ``axis``; with ``packed`` and ``params.bits`` <= 4, an
        INT4 tensor (hybrid ops; INT8 ops keep low-bit codes in INT8)."""
        if params.granularity is Granularity.GROUP:
            raise UnsupportedOpError(
                f"{self.source}: weight {name!r} is quantized in groups of "
                f"{params.group_size}; lowbit's TFLite files take per-channel weights (export "
                "the float model with --mode int4 for INT4 fully connected weights)")

        def make() -> int:
            codes = affine.quantize(values, params, dtype=np.int8)
            if np.any(np.asarray(params.zero_point) != 0):
                raise UnsupportedOpError(
                    f"{self.source}: weight {name!r} has an asymmetric grid, which TFLite "
                    "kernels do not take")
            q = Quant.of(params.scale, np.zeros_like(np.asarray(params.scale), np.int64),
                         axis if params.granularity is Granularity.CHANNEL else 0)
            dtype = "int4" if packed and params.bits <= 4 else "int8"
            return self.b.constant(name, layout(codes), dtype, quant=q)
        return self.t.const(("q", key), make)

    def int32_bias(self, name: str, values: np.ndarray, scale: np.ndarray) -> int:
        """INT32 bias on the grid ``scale`` (input scale x weight scale per channel)."""
        def make() -> int:
            codes = np.round(values.astype(np.float64) / scale).clip(-2**31, 2**31 - 1)
            return self.b.constant(f"{name}/int32", codes.astype(np.int32),
                                   quant=Quant.of(scale, np.zeros(scale.shape, np.int64)))
        return self.t.const(("bias32", name, scale.tobytes()), make)

    # ------------------------------------------------------------------ output
    def finish(self) -> bytes:
        outs = []
        for name in self.outputs:
            want = identity(len(self.t.shapes[name]))
            q = self.t.int8.get(name)
            if self.io == "int8" and q is not None:
                idx = self.t.to_layout(name, want, "int8", q[1])
                if name not in self.b.names:  # the graph's output keeps its ONNX name
                    self.b.tensors[idx].name = name
                    self.b.names.add(name)
            else:
                idx = self.t.to_layout(name, want)
            outs.append((name, idx))
        return self.b.finish(self.inputs, outs)


def _activation_kind(node: onnx.NodeProto, constant: Any) -> str | None:
    if node.op_type == "Relu":
        return "RELU"
    if node.op_type == "Clip":
        bounds = [scalar(constant(x)) if x else None for x in list(node.input[1:3])]
        lo = bounds[0] if len(bounds) > 0 else None
        hi = bounds[1] if len(bounds) > 1 else None
        if (lo, hi) == (0.0, 6.0):
            return "RELU6"
        if (lo, hi) == (-1.0, 1.0):
            return "RELU_N1_TO_1"
    return None



def _shapes(graph: onnx.GraphProto, init: set[str], source: str
            ) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Logical shapes of every tensor (a dynamic first axis as 1) and the tensors whose
    first axis is the dynamic batch. Any other unknown dimension cannot be written."""
    shapes: dict[str, tuple[int, ...]] = {}
    dynamic: set[str] = set()
    for t in graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.name in init or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        shape = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            elif i == 0:
                shape.append(1)
                dynamic.add(vi.name)
            else:
                raise UnsupportedOpError(
                    f"{source}: tensor {vi.name!r} has a dynamic dimension {i}; TFLite export "
                    "needs fixed shapes except the batch")
        shapes[vi.name] = tuple(shape)
    return shapes, dynamic
