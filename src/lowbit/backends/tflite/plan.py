"""Plans for TFLite: what the INT8 planner made for ONNX Runtime, completed and varied for
LiteRT's kernels.

- ``complete``: a TFLite INT8 op always writes INT8, so every static node's output needs
  a scale (ONNX Runtime can end a QGemm in float; TFLite cannot). Those outputs are
  calibrated with the plan's own calibration method on the same data; nothing else
  changes.
- ``as_hybrid``: the same INT8 weights with float activations (TFLite's dynamic-range
  kernels), and ``keep_float``: some nodes back to float. The candidate search
  (``candidates.py``) times these variants whole.
"""

from __future__ import annotations

import dataclasses

from lowbit.backends.onnx.calibrate import run_calibration
from lowbit.backends.onnx.graph import node_name
from lowbit.backends.onnx.store import FloatModel
from lowbit.data import Dataset
from lowbit.quant import affine
from lowbit.quant.observers import CalibrationMethod, select_range
from lowbit.quant.plan import QuantizationPlan, Treatment

WEIGHTED = ("Conv", "Gemm", "MatMul")


def static_outputs(fm: FloatModel, plan: QuantizationPlan) -> dict[str, str]:
    """node name -> the tensor its INT8 op writes (after a folded Relu or bias Add)."""
    folds = {f.producer: f.output for f in plan.folds}
    out = {}
    for i, node in enumerate(fm.proto.graph.node):
        name = node_name(node, i)
        if name in plan.nodes and plan.nodes[name].treatment is Treatment.STATIC:
            out[name] = folds.get(name, node.output[0])
    return out


def complete(fm: FloatModel, plan: QuantizationPlan, calibration: Dataset, *,
             batch_size: int = 32, percentile: float = 99.99) -> QuantizationPlan:
    """A copy of ``plan`` where every static node's output has INT8 parameters."""
    missing = sorted({t for t in static_outputs(fm, plan).values()
                      if plan.shared.get(t, t) not in plan.tensors})
    if not missing:
        return plan
    method = CalibrationMethod(plan.metadata.get("calibration", CalibrationMethod.MINMAX.value))
    if method is CalibrationMethod.AUTO:
        method = CalibrationMethod.MINMAX
    run = run_calibration(fm, calibration, missing, batch_size=batch_size)
    out = dataclasses.replace(plan, tensors=dict(plan.tensors),
                              activations=list(plan.activations) + missing)
    for tensor in missing:
        lo, hi = select_range(run.observers[tensor], method, percentile=percentile)
        out.tensors[tensor] = affine.activation_params(lo, hi)
    out.metadata = dict(plan.metadata, tflite_outputs_calibrated=missing)
    return out


def as_hybrid(plan: QuantizationPlan) -> QuantizationPlan:
    """Every quantized weighted node as a dynamic-range (hybrid) op: INT8 weights, float
    activations; no activation is quantized."""
    nodes = {k: dataclasses.replace(n, treatment=Treatment.DYNAMIC)
             for k, n in plan.nodes.items() if n.weight is not None and n.op_type in WEIGHTED}
    out = QuantizationPlan(nodes=nodes, tensors={k: v for k, v in plan.tensors.items()
                                                 if any(n.weight == k for n in nodes.values())},
                           weight_values=dict(plan.weight_values),
                           metadata=dict(plan.metadata, tflite_variant="dynamic-range"))
    for d in plan.decisions:
        if d.name in nodes:
            out.decide(d.name, d.op_type, Treatment.DYNAMIC, "INT8 weights, float activations "
                       "(dynamic range)")
        else:
            out.decide(d.name, d.op_type, Treatment.FLOAT, "float (dynamic-range model)")
    return out


def keep_float(plan: QuantizationPlan, names: set[str], reason: str) -> QuantizationPlan:
    """``plan`` with the nodes ``names`` back in float (their inputs stay quantized where
    other nodes need them; the writer dequantizes for the float op)."""
    out = dataclasses.replace(plan, nodes={k: v for k, v in plan.nodes.items() if k not in names},
                              folds=[f for f in plan.folds if f.producer not in names],
                              decisions=[], metadata=dict(plan.metadata))
    for d in plan.decisions:
        folded_into = next((f.producer for f in plan.folds if f.activation == d.name), None)
        if d.name in names or folded_into in names:
            out.decide(d.name, d.op_type, Treatment.FLOAT, reason)
        else:
            out.decide(d.name, d.op_type, d.treatment, d.reason, d.bits)
    return out


def weight_plan(fm: FloatModel, *, dense_bits: int = 8, conv_bits: int = 8) -> QuantizationPlan:
    """Dynamic-range weights without calibration: every Conv/Gemm/MatMul with a constant
    weight gets symmetric per-channel codes, ``dense_bits`` (8 or 4) for fully connected
    layers, ``conv_bits`` for convolutions; activations stay float."""
    from lowbit.backends.onnx.weights import weighted_nodes
    from lowbit.quant.plan import NodeQuant

    plan = QuantizationPlan(metadata={"tflite_variant": "weights"})
    for w in weighted_nodes(fm)[0]:
        if w.node.op_type not in WEIGHTED:
            continue
        bits = conv_bits if w.node.op_type == "Conv" else dense_bits
        values = fm.constant(w.weight)
        if values is None or values.ndim < 2:
            continue
        treatment = Treatment.WEIGHT_ONLY if bits < 8 else Treatment.DYNAMIC
        plan.add_node(NodeQuant(w.name, w.node.op_type, treatment, weight=w.weight),
                      f"INT{bits} weights per channel, float activations", bits)
        plan.tensors[w.weight] = affine.weight_params_per_channel(values, axis=w.out_axis,
                                                                  bits=bits)
    return plan
