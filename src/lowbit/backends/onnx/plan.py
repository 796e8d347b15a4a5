"""Plan INT8 quantization of an ONNX graph, node by node, driven by the op registry.

Each node's op type is looked up in ``registry`` and its rule's kind picks the handler
(``plan_ops``; their shared state is ``planner.Planner``): weighted ops get INT8 weights
(static or dynamic), elementwise ops quantize next to quantized producers, shared-scale
ops pass 8-bit data through, and a Relu/Clip directly after a static weighted or
elementwise op is folded into that op's output range. Every node gets a decision with its
reason; the plan holds no parameters yet (calibration and the weight rules fill them).

8-bit outputs are pulled, not pushed. A Conv's output is always 8-bit (ONNX Runtime
fuses a Conv only with a QuantizeLinear after it), but a MatMul/Gemm/QLinearMatMul can
end in float at no cost, an 8-bit Add, Concat or pass-through op only pays off when an
8-bit operator reads its output, and every extra QuantizeLinear adds noise (a static
MatMul before a float Tile measured 29.8 dB with its output quantized, 38.9 dB without).
So a plan is built in passes: after each, the 8-bit tensors that no integer kernel reads
are marked float and the graph is planned again, until nothing changes.
"""

from __future__ import annotations

from lowbit.backends.onnx.graph import GraphIndex, node_name
from lowbit.backends.onnx.plan_ops import HANDLERS
from lowbit.backends.onnx.planner import AUTO, Planner
from lowbit.backends.onnx.registry import NEUTRAL_OPS, rule_for
from lowbit.backends.onnx.store import FloatModel
from lowbit.errors import UnsupportedOpError
from lowbit.quant.plan import QuantizationPlan, Treatment

__all__ = ["AUTO", "build_int8_plan"]


def _plan_once(fm: FloatModel, index: GraphIndex, treatments: dict[str, Treatment | str],
               exclude: tuple[str, ...], keep_float: dict[str, str] | None,
               float_tensors: frozenset[str]) -> Planner:
    nodes = list(fm.proto.graph.node)
    planner = Planner(index, nodes, treatments, float_tensors)
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
            if node.op_type in NEUTRAL_OPS and node.domain in ("", "ai.onnx"):
                planner.plan.decide(name, node.op_type, Treatment.FLOAT,
                                    "no float arithmetic to quantize")
            else:
                planner.plan.decide(name, node.op_type, Treatment.FLOAT,
                                    "not in lowbit's INT8 op registry")
                planner.unknown.append(f"{name} ({node.op_type})")
            continue
        HANDLERS[rule.kind](planner, node, i, name, rule)
    return planner


def build_int8_plan(fm: FloatModel, *, treatments: dict[str, Treatment | str],
                    exclude: tuple[str, ...] = (), keep_float: dict[str, str] | None = None,
                    strict: bool = False) -> QuantizationPlan:
    """Plan INT8 quantization of ``fm``.

    ``treatments`` maps a weighted op type (Conv, Gemm, MatMul, LSTM, Attention) to
    ``Treatment.STATIC``, ``Treatment.DYNAMIC``, ``Treatment.FLOAT`` or ``AUTO``; Attention
    and MatMuls of two activations follow MatMul unless named. ``keep_float`` maps node
    names to the reason they stay float.
    """
    index = GraphIndex(fm.proto, fm.weights)
    float_tensors: frozenset[str] = frozenset()
    for _ in range(len(fm.proto.graph.node) + 2):  # each pass only removes 8-bit tensors
        planner = _plan_once(fm, index, treatments, exclude, keep_float, float_tensors)
        unneeded = planner.unneeded() - float_tensors
        if not unneeded:
            break
        float_tensors = float_tensors | unneeded
    if strict and planner.unknown:
        raise UnsupportedOpError(
            "strict mode: these operators are not in lowbit's INT8 registry and would stay "
            f"in float: {', '.join(planner.unknown)}")
    return planner.plan
