"""Plan INT8 quantization of an ONNX graph, node by node, driven by the op registry.

Each node's op type is looked up in ``registry.REGISTRY`` and its rule's kind
picks the handler below: weighted ops get INT8 weights (static or dynamic),
elementwise ops quantize next to quantized producers, shared-scale ops pass
8-bit data through, and a Relu/Clip directly after a static weighted or elementwise
op is folded into that op's output range. Every node gets a decision with its reason; the plan
holds no parameters yet (calibration and the weight rules fill them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from lowbit.backends.onnx.graph import GraphIndex, node_name
from lowbit.backends.onnx.registry import NEUTRAL_OPS, OpKind, OpRule, rule_for
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import weighted_node
from lowbit.errors import UnsupportedOpError
from lowbit.quant.plan import Fold, NodeQuant, QuantizationPlan, Treatment

FLOAT = onnx.TensorProto.FLOAT
AUTO = "auto"  # weighted treatment: static when fed 8-bit data, else dynamic

_WHY_FLOAT = {
    "Conv": "dynamic INT8 Conv (ConvInteger) runs several times slower than float in "
            "ONNX Runtime; use static or auto mode",
    "Gemm": "kept in float by the chosen mode",
    "MatMul": "kept in float by the chosen mode",
}


@dataclass
class _Planner:
    index: GraphIndex
    nodes: list[onnx.NodeProto]
    treatments: dict[str, Treatment | str]
    plan: QuantizationPlan = field(default_factory=QuantizationPlan)
    quantized: set[str] = field(default_factory=set)  # tensors carrying Q/DQ so far
    folded_away: set[str] = field(default_factory=set)
    unknown: list[str] = field(default_factory=list)

    @property
    def static_any(self) -> bool:
        return any(t in (Treatment.STATIC, AUTO) for t in self.treatments.values())

    def add_activation(self, tensor: str, shared_with: str | None = None) -> None:
        if tensor not in self.quantized:
            self.quantized.add(tensor)
            self.plan.activations.append(tensor)
            if shared_with is not None:
                self.plan.shared[tensor] = shared_with

    def weighted(self, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
        treatment = self.treatments.get(node.op_type, Treatment.FLOAT)
        if treatment == AUTO:
            fed_8bit = node.input[0] in self.quantized or node.input[0] in self.index.graph_inputs
            treatment = Treatment.STATIC if fed_8bit else Treatment.DYNAMIC
        item = weighted_node(node, i, self.index)
        if isinstance(item, str):
            self.plan.decide(name, node.op_type, Treatment.FLOAT, item)
            return
        if treatment is Treatment.FLOAT:
            self.plan.decide(name, node.op_type, Treatment.FLOAT, _WHY_FLOAT.get(node.op_type, "mode"))
            return
        if treatment is Treatment.DYNAMIC and rule.dynamic:
            self.plan.add_node(NodeQuant(name, node.op_type, Treatment.DYNAMIC, item.weight,
                                         item.bias),
                               "INT8 weights, activations quantized at run time")
            return
        self.add_activation(node.input[0])
        bias, out = item.bias, node.output[0]
        if node.op_type == "MatMul":
            bias, out = self.bias_add(node, name, item.weight)
        self.plan.add_node(NodeQuant(name, node.op_type, Treatment.STATIC, item.weight, bias),
                           "INT8 weights, UINT8 activations per tensor" +
                           (", bias in the integer kernel (Gemm)" if bias and not item.bias else ""))
        out = self.fold_activation(out, name, output_quantized=node.op_type == "Conv")
        if node.op_type == "Conv" or out not in self.index.graph_outputs:
            self.add_activation(out)

    def bias_add(self, node: onnx.NodeProto, name: str, weight: str) -> tuple[str | None, str]:
        """(bias, output) of a static MatMul: an Add of a constant [N] vector that is the
        only consumer of its output becomes the bias of an integer Gemm (QGemm) and
        disappears; (None, the MatMul's output) otherwise."""
        out = node.output[0]
        consumers = self.index.consumers.get(out, [])
        if out in self.index.graph_outputs or len(consumers) != 1 or \
                consumers[0].op_type != "Add" or consumers[0].domain not in ("", "ai.onnx"):
            return None, out
        add = consumers[0]
        other = [x for x in add.input if x != out]
        w = self.index.constant(weight)
        b = self.index.constant(other[0]) if len(other) == 1 else None
        rank = len(self.index.shape(node.input[0]) or ())
        if w is None or w.ndim != 2 or b is None or b.dtype != w.dtype or b.size != w.shape[1] \
                or b.shape[-1] != w.shape[1] or (b.ndim > 1 and b.ndim > rank):
            return None, out
        add_name = node_name(add, self.nodes.index(add))
        self.plan.folds.append(Fold(name, add_name, add.output[0], None))
        self.folded_away.add(add_name)
        self.plan.decide(add_name, "Add", Treatment.FOLDED, f"bias of {name}'s integer Gemm")
        return other[0], add.output[0]

    def fold_activation(self, out: str, name: str, *, output_quantized: bool = True) -> str:
        """Fold a Relu/Clip(0, c) that is the only consumer of ``out`` (written by node
        ``name``) into that tensor's quantization range; return the tensor that now ends
        ``name``. Not when the activation's output is a graph output that will not be
        quantized (``output_quantized`` False): nothing would saturate it."""
        consumers = self.index.consumers.get(out, [])
        if out in self.index.graph_outputs or len(consumers) != 1:
            return out
        act = consumers[0]
        foldable, clip = _foldable(act, self.index)
        if not foldable or (not output_quantized and act.output[0] in self.index.graph_outputs):
            return out
        act_name = node_name(act, self.nodes.index(act))
        self.plan.folds.append(Fold(name, act_name, act.output[0], clip))
        self.folded_away.add(act_name)
        self.plan.decide(act_name, act.op_type, Treatment.FOLDED,
                         f"folded into {name}'s output range")
        return act.output[0]

    def elementwise(self, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
        picked = node.input if rule.activation_inputs is None else \
            [node.input[k] for k in rule.activation_inputs if k < len(node.input)]
        acts = [x for x in picked if x and x not in self.index.initializers]
        if not self.static_any:
            self.plan.decide(name, node.op_type, Treatment.FLOAT, "static INT8 not used in this mode")
        elif not any(x in self.quantized for x in acts):
            self.plan.decide(name, node.op_type, Treatment.FLOAT, "no quantized input next to it")
        elif any(self.index.elem_type(x) not in (FLOAT, None) for x in node.input if x):
            self.plan.decide(name, node.op_type, Treatment.FLOAT, "an input is not float32")
        elif node.op_type in ("Add", "Mul") and len(acts) == 1 and \
                any(x in self.index.initializers for x in node.input):
            self.plan.decide(name, node.op_type, Treatment.FLOAT, "constant operand kept in float")
        else:
            for x in acts:
                self.add_activation(x)
            self.add_activation(self.fold_activation(node.output[0], name))
            self.plan.add_node(NodeQuant(name, node.op_type, Treatment.STATIC),
                               "8-bit inputs and output")

    def shared_scale(self, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
        src = node.input[0]
        if src in self.quantized:
            self.add_activation(node.output[0], shared_with=self.plan.shared.get(src, src))
            self.plan.decide(name, node.op_type, Treatment.PASSTHROUGH,
                             "runs on 8-bit data, same scale")
        else:
            self.plan.decide(name, node.op_type, Treatment.FLOAT, "input is not quantized")

    def recurrent(self, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
        treatment = self.treatments.get(node.op_type, Treatment.FLOAT)
        constant = all(len(node.input) > k and node.input[k] in self.index.initializers
                       for k in (1, 2))
        if not rule.dynamic:
            why = "ONNX Runtime has no integer kernel for it"
        elif treatment is Treatment.FLOAT:
            why = ("ONNX Runtime's INT8 LSTM (DynamicQuantizeLSTM) quantizes activations at run "
                   "time: not used in static mode")
        elif not constant:
            why = "W or R is not a constant"
        elif any(a.name == "layout" and a.i != 0 for a in node.attribute):
            why = "batch-first layout (layout=1) has no INT8 kernel"
        else:
            self.plan.add_node(NodeQuant(name, node.op_type, Treatment.DYNAMIC, node.input[1],
                                         recurrence=node.input[2]),
                               "INT8 W and R per gate channel, activations quantized at run time")
            return
        self.plan.decide(name, node.op_type, Treatment.FLOAT, why)

    def activation(self, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
        self.plan.decide(name, node.op_type, Treatment.FLOAT, "not directly after a quantized op")


_HANDLERS: dict[OpKind, Callable[[_Planner, onnx.NodeProto, int, str, OpRule], None]] = {
    OpKind.WEIGHTED: _Planner.weighted,
    OpKind.ELEMENTWISE: _Planner.elementwise,
    OpKind.SHARED_SCALE: _Planner.shared_scale,
    OpKind.FOLDABLE_ACTIVATION: _Planner.activation,
    OpKind.RECURRENT: _Planner.recurrent,
}


def _foldable(node: onnx.NodeProto, index: GraphIndex) -> tuple[bool, tuple[float, float] | None]:
    """(whether ``node`` folds into the op before it, its Clip bounds; None for Relu)."""
    if node.op_type == "Relu":
        return True, None
    if node.op_type == "Clip":
        lo = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if lo is not None and float(lo) == 0.0:
            return True, (0.0, float(hi) if hi is not None else float("inf"))
    return False, None


def build_int8_plan(fm: FloatModel, *, treatments: dict[str, Treatment | str],
                    exclude: tuple[str, ...] = (), keep_float: dict[str, str] | None = None,
                    strict: bool = False) -> QuantizationPlan:
    """Plan INT8 quantization of ``fm``.

    ``treatments`` maps a weighted op type (Conv, Gemm, MatMul) to ``Treatment.STATIC``,
    ``Treatment.DYNAMIC``, ``Treatment.FLOAT`` or ``AUTO``. ``keep_float`` maps node
    names to the reason they stay float.
    """
    nodes = list(fm.proto.graph.node)
    planner = _Planner(GraphIndex(fm.proto, fm.weights), nodes, treatments)
    for i, node in enumerate(nodes):
        name = node_name(node, i)
        if name in planner.folded_away:
            continue
        if name in exclude:
            planner.plan.decide(name, node.op_type, Treatment.FLOAT, "excluded by option")
            continue
        if keep_float and name in keep_float:
            planner.plan.decide(name, node.op_type, Treatment.FLOAT, keep_float[name])
            continue
        rule = rule_for(node.op_type, node.domain)
        if rule is None:
            if node.op_type in NEUTRAL_OPS:
                planner.plan.decide(name, node.op_type, Treatment.FLOAT,
                                    "no float arithmetic to quantize")
            else:
                planner.plan.decide(name, node.op_type, Treatment.FLOAT,
                                    "not in lowbit's INT8 op registry")
                planner.unknown.append(f"{name} ({node.op_type})")
            continue
        _HANDLERS[rule.kind](planner, node, i, name, rule)
    if strict and planner.unknown:
        raise UnsupportedOpError(
            "strict mode: these operators are not in lowbit's INT8 registry and would stay "
            f"in float: {', '.join(planner.unknown)}")
    return planner.plan
