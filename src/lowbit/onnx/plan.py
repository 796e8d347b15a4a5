"""Decide, node by node, what is quantized and how (the quantization plan).

The plan names the activation tensors that get a QuantizeLinear/
DequantizeLinear pair, the weighted nodes whose constants become INT8, the
Relu/Clip nodes folded into the saturation of the op before them, and the
MatMul/Gemm nodes that use dynamic INT8. Every node gets a ``NodeDecision``
with a reason; nothing is left out of the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from lowbit.errors import UnsupportedOpError
from lowbit.onnx.graph import GraphIndex, attr
from lowbit.onnx.registry import NEUTRAL_OPS, OpKind, rule_for

FLOAT = onnx.TensorProto.FLOAT


class Treatment:
    STATIC = "int8-static"
    DYNAMIC = "int8-dynamic"
    PASSTHROUGH = "int8-passthrough"  # runs on 8-bit data, keeps the input's scale
    FOLDED = "folded"  # removed; its effect is the saturation of the previous op's output
    FLOAT = "float"
    AUTO = "auto"  # weighted linear ops: static when fed 8-bit data, else dynamic


@dataclass(frozen=True)
class NodeDecision:
    name: str
    op_type: str
    treatment: str
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "op_type": self.op_type, "treatment": self.treatment,
                "reason": self.reason}


@dataclass
class Fold:
    producer: str  # node name
    activation: str  # node name of the Relu/Clip that disappears
    output: str  # tensor the producer writes after the fold
    clip: tuple[float, float] | None  # Clip bounds; None for Relu


@dataclass
class QuantPlan:
    static_nodes: list[str] = field(default_factory=list)  # weighted + elementwise
    dynamic_nodes: list[str] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)  # tensors that get Q/DQ
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> source of its params
    folds: list[Fold] = field(default_factory=list)
    decisions: list[NodeDecision] = field(default_factory=list)

    @property
    def clip_caps(self) -> dict[str, tuple[float, float]]:
        """Folded Clip(0, c) outputs: their quantization range may not exceed the clip."""
        return {f.output: f.clip for f in self.folds if f.clip is not None}

    @property
    def observed(self) -> list[str]:
        """Tensors whose ranges calibration must measure."""
        return [t for t in self.activations if t not in self.shared]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.decisions:
            out[d.treatment] = out.get(d.treatment, 0) + 1
        return out


def node_name(node: onnx.NodeProto, i: int) -> str:
    return node.name or f"{node.op_type}_{i}"


def weight_problem(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Why a weighted node's weight cannot be quantized, or None if it can."""
    rule = rule_for(node.op_type, node.domain)
    if rule is None or rule.weight_input is None:
        return f"{node.op_type} has no registered weight input"
    if len(node.input) <= rule.weight_input:
        return "has no weight input"
    w = node.input[rule.weight_input]
    if w not in index.initializers:
        if node.op_type == "MatMul" and node.input[0] in index.initializers:
            return "constant is the left operand (not supported)"
        return f"weight '{w}' is not a constant"
    if index.initializers[w].data_type != FLOAT:
        return f"weight '{w}' is not float32"
    dims = list(index.initializers[w].dims)
    if node.op_type in ("MatMul", "Gemm") and len(dims) != 2:
        return f"weight '{w}' is {len(dims)}-D (only 2-D MatMul/Gemm weights)"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA=1 (not supported)"
    if node.op_type == "Conv" and len(node.input) > 2 and node.input[2]:
        if node.input[2] not in index.initializers:
            return f"bias '{node.input[2]}' is not a constant"
    if index.elem_type(node.input[0]) not in (FLOAT, None):
        return "activation input is not float32"
    return None


def _foldable(node: onnx.NodeProto, index: GraphIndex) -> tuple[bool, tuple[float, float] | None]:
    if node.op_type == "Relu":
        return True, None
    if node.op_type == "Clip":
        lo = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if lo is not None and float(lo) == 0.0:
            return True, (0.0, float(hi) if hi is not None else float("inf"))
    return False, None


def build_plan(
    model: onnx.ModelProto,
    *,
    weighted_treatment: dict[str, str],
    exclude: tuple[str, ...] = (),
    keep_float: dict[str, str] | None = None,
    strict: bool = False,
    weights: dict[str, Any] | None = None,
) -> QuantPlan:
    """Plan quantization of ``model``.

    ``weighted_treatment`` maps a weighted op type (Conv, Gemm, MatMul) to
    ``Treatment.STATIC``, ``Treatment.DYNAMIC`` or ``Treatment.FLOAT``
    (with the reason taken from ``_WHY_FLOAT``). Elementwise ops are quantized
    only in static mode, next to quantized producers.
    """
    index = GraphIndex(model, weights)
    plan = QuantPlan()
    quantized: set[str] = set()  # tensors carrying Q/DQ so far
    folded_away: set[str] = set()
    outputs = set(index.graph_outputs)
    static_any = bool({Treatment.STATIC, Treatment.AUTO} & set(weighted_treatment.values()))
    unknown: list[str] = []

    def add_activation(t: str, shared_with: str | None = None) -> None:
        if t not in quantized:
            quantized.add(t)
            plan.activations.append(t)
            if shared_with is not None:
                plan.shared[t] = shared_with

    def decide(node: onnx.NodeProto, name: str, treatment: str, reason: str = "") -> None:
        plan.decisions.append(NodeDecision(name, node.op_type, treatment, reason))

    for i, node in enumerate(model.graph.node):
        name = node_name(node, i)
        if name in folded_away:
            continue
        rule = rule_for(node.op_type, node.domain)
        if name in exclude:
            decide(node, name, Treatment.FLOAT, "excluded by option")
            continue
        if keep_float and name in keep_float:
            decide(node, name, Treatment.FLOAT, keep_float[name])
            continue
        if rule is None:
            if node.op_type in NEUTRAL_OPS:
                decide(node, name, Treatment.FLOAT, "no float arithmetic to quantize")
            else:
                decide(node, name, Treatment.FLOAT, "not in lowbit's INT8 op registry")
                unknown.append(f"{name} ({node.op_type})")
            continue
        if rule.kind is OpKind.WEIGHTED:
            treatment = weighted_treatment.get(node.op_type, Treatment.FLOAT)
            if treatment == Treatment.AUTO:
                fed_8bit = node.input[0] in quantized or node.input[0] in index.graph_inputs
                treatment = Treatment.STATIC if fed_8bit else Treatment.DYNAMIC
            problem = weight_problem(node, index)
            if problem is not None:
                decide(node, name, Treatment.FLOAT, problem)
                continue
            if treatment == Treatment.FLOAT:
                decide(node, name, Treatment.FLOAT, _WHY_FLOAT.get(node.op_type, "mode"))
                continue
            if treatment == Treatment.DYNAMIC and rule.dynamic:
                plan.dynamic_nodes.append(name)
                decide(node, name, Treatment.DYNAMIC, "INT8 weights, activations quantized "
                       "at run time")
                continue
            plan.static_nodes.append(name)
            add_activation(node.input[0])
            out = node.output[0]
            consumers = index.consumers.get(out, [])
            if out not in outputs and len(consumers) == 1:
                act = consumers[0]
                ok, clip = _foldable(act, index)
                if ok:
                    act_name = node_name(act, list(model.graph.node).index(act))
                    plan.folds.append(Fold(name, act_name, act.output[0], clip))
                    folded_away.add(act_name)
                    out = act.output[0]
            if node.op_type == "Conv" or out not in outputs:
                add_activation(out)
            decide(node, name, Treatment.STATIC, "INT8 weights, UINT8 activations per tensor")
            if plan.folds and plan.folds[-1].producer == name:
                fold = plan.folds[-1]
                act_op = index.producer[fold.output].op_type
                plan.decisions.append(NodeDecision(fold.activation, act_op, Treatment.FOLDED,
                                                   f"folded into {name}'s output range"))
        elif rule.kind is OpKind.ELEMENTWISE:
            acts = [x for x in node.input if x and x not in index.initializers]
            if not static_any:
                decide(node, name, Treatment.FLOAT, "static INT8 not used in this mode")
            elif not any(x in quantized for x in acts):
                decide(node, name, Treatment.FLOAT, "no quantized input next to it")
            elif any(index.elem_type(x) not in (FLOAT, None) for x in node.input if x):
                decide(node, name, Treatment.FLOAT, "an input is not float32")
            elif node.op_type in ("Add", "Mul") and len(acts) == 1 and \
                    any(x in index.initializers for x in node.input):
                decide(node, name, Treatment.FLOAT, "constant operand kept in float")
            else:
                plan.static_nodes.append(name)
                for x in acts:
                    add_activation(x)
                add_activation(node.output[0])
                decide(node, name, Treatment.STATIC, "8-bit inputs and output")
        elif rule.kind is OpKind.SHARED_SCALE:
            src = node.input[0]
            if src in quantized:
                add_activation(node.output[0], shared_with=plan.shared.get(src, src))
                decide(node, name, Treatment.PASSTHROUGH, "runs on 8-bit data, same scale")
            else:
                decide(node, name, Treatment.FLOAT, "input is not quantized")
        else:  # a Relu/Clip that could not be folded
            decide(node, name, Treatment.FLOAT, "not directly after a quantized op")
    if strict and unknown:
        raise UnsupportedOpError(
            "strict mode: these operators are not in lowbit's INT8 registry and would stay "
            f"in float: {', '.join(unknown)}"
        )
    return plan


_WHY_FLOAT = {
    "Conv": "dynamic INT8 Conv (ConvInteger) runs several times slower than float in "
            "ONNX Runtime; use static or auto mode",
    "Gemm": "kept in float by the chosen mode",
    "MatMul": "kept in float by the chosen mode",
}


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a weighted node's weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 1  # MatMul: (K, N)
