"""Write the quantized model a plan describes.

``write_model`` runs the writer for each kind of node in the plan (INT8 QDQ and
dynamic, low-bit weight-only) over ONE copy of the graph, so a mixed-precision
plan becomes one model in one pass. Writers consume the plan and decide nothing.
"""

from __future__ import annotations

import onnx

from lowbit.backends.onnx.graph_writer import GraphWriter
from lowbit.backends.onnx.nbits import write_weight_only
from lowbit.backends.onnx.qdq import write_int8
from lowbit.backends.onnx.store import FloatModel
from lowbit.quant.plan import QuantizationPlan, Treatment


def write_model(fm: FloatModel, plan: QuantizationPlan) -> onnx.ModelProto:
    """The quantized model ``plan`` describes, written over one copy of ``fm``'s graph."""
    writer = GraphWriter(fm)
    if plan.nodes_with(Treatment.STATIC, Treatment.DYNAMIC) or plan.activations or plan.folds:
        write_int8(fm, plan, writer)
    if plan.nodes_with(Treatment.WEIGHT_ONLY):
        write_weight_only(fm, plan, writer)
    return writer.finish(plan)
