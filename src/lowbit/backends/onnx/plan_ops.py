"""The planner's handlers, one per kind of registered operator (``registry.OpKind``).

Each handler decides one node (treatment and reason), names the tensors it quantizes,
and records which 8-bit tensors it reads and writes (``Planner.use``) so that the
planner can drop 8-bit outputs nobody reads (``plan.build_int8_plan``). Measured
reasons: docs/NOTES.md, "Operator coverage".
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from lowbit.backends.onnx.graph import attr
from lowbit.backends.onnx.planner import AUTO, FLOAT, Planner, clip_bounds, foldable_activation
from lowbit.backends.onnx.registry import OpKind, OpRule
from lowbit.backends.onnx.weights import weighted_node
from lowbit.quant.plan import Fold, NodeQuant, Treatment
from lowbit.quant.weight_rules import constant_operand_params

_WHY_FLOAT = {
    "Conv": "dynamic INT8 Conv (ConvInteger) runs several times slower than float in "
            "ONNX Runtime; use static or auto mode",
    "Gemm": "kept in float by the chosen mode",
    "MatMul": "kept in float by the chosen mode",
    "Attention": "kept in float by the chosen mode",
}
# Q, Q, QLinearAdd ran 0.38-0.58x of a float Add, 0.75-0.89x where the sum feeds an
# 8-bit op (which then quantizes the sum instead); docs/NOTES.md, "Operator coverage"
_NO_8BIT_INPUT = "no 8-bit input next to it (QLinearAdd on quantized float inputs: 0.38-0.89x)"
# Any other op with only float inputs (e.g. attention's scale Mul after a float Q.K^T):
# the same Q/DQ work around it. onnxruntime's quantize_static turns that Mul and the
# Softmax into QLinearMul + QLinearSoftmax: the attention block ran 1.08-1.30x slower
# than with both in float, 0.2-1.4 dB lower SQNR (hidden 256, 32-128 tokens, batch 8).
_NO_8BIT_INPUT_OTHER = ("no 8-bit input next to it (quantizing float inputs only adds "
                        "QuantizeLinear work: QLinearAdd measured 0.38-0.89x)")
_NO_8BIT_READER = "its output feeds no 8-bit operator (float: as fast, more accurate)"
# Attention features ONNX Runtime's QAttention does not have
_QATTENTION_LACKS = {"qkv_hidden_sizes": "different Q/K/V sizes (qkv_hidden_sizes)",
                     "rotary_embedding_dim": "rotary_embedding_dim"}


def weighted(p: Planner, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
    if node.op_type == "MatMul" and not any(x in p.index.initializers for x in node.input[:2]):
        activation_matmul(p, node, name)
        return
    treatment = p.treatment(node.op_type)
    if treatment == AUTO:
        treatment = Treatment.STATIC if p.is_8bit(node.input[0]) else Treatment.DYNAMIC
    item = weighted_node(node, i, p.index)
    if isinstance(item, str):
        p.plan.decide(name, node.op_type, Treatment.FLOAT, item)
        return
    attention = node.op_type == "Attention"
    problem = _attention_problem(node) if attention else None
    if problem is not None or treatment is Treatment.FLOAT:
        p.plan.decide(name, node.op_type, Treatment.FLOAT,
                      problem or _WHY_FLOAT.get(node.op_type, "mode"))
        return
    bias = None if attention else item.bias  # QAttention adds its float bias itself
    if treatment is Treatment.DYNAMIC and rule.dynamic:
        p.plan.add_node(NodeQuant(name, node.op_type, Treatment.DYNAMIC, item.weight, bias),
                        "INT8 weights, activations quantized at run time" +
                        (" (QAttention)" if attention else ""))
        return
    x = node.input[0]
    p.add_activation(x)
    if attention:  # QAttention: 8-bit input, float output
        p.plan.add_node(NodeQuant(name, node.op_type, Treatment.STATIC, item.weight),
                        "INT8 weights, UINT8 input per tensor (QAttention)")
        p.use((x,), (), conditional=False)
        return
    out = node.output[0]
    if node.op_type == "MatMul":
        bias, out = p.bias_add(node, name, item.weight)
    p.plan.add_node(NodeQuant(name, node.op_type, Treatment.STATIC, item.weight, bias),
                    "INT8 weights, UINT8 activations per tensor" +
                    (", bias in the integer kernel (Gemm)" if bias and not item.bias else ""))
    conv = node.op_type == "Conv"
    out = p.fold_activation(out, name, output_quantized=conv)
    kept = p.offer(out, forced=True) if conv else \
        out not in p.index.graph_outputs and p.offer(out)
    p.use((x,), (out,) if kept else (), conditional=False)


def _attention_problem(node: onnx.NodeProto) -> str | None:
    for key, what in _QATTENTION_LACKS.items():
        if attr(node, key) is not None:
            return f"ONNX Runtime's QAttention has no {what}"
    if any(node.input[5:]):
        return "attention_bias / past_sequence_length inputs: QAttention has none"
    return None


def activation_matmul(p: Planner, node: onnx.NodeProto, name: str) -> None:
    """A MatMul of two computed tensors (attention's Q.K^T, P.V): both inputs 8-bit,
    MatMulIntegerToFloat (float output) or QLinearMatMul (8-bit output) in ONNX Runtime.
    Measured over the float attention core (8 x 4-12 heads, 16-128 tokens): 0.89-0.99x at
    16-64 tokens, 1.16-1.18x at 128 tokens x 64 dims. Auto quantizes it only where both
    inputs are 8-bit already, static always."""
    a, b = node.input[0], node.input[1]
    treatment = p.treatment("MatMul")
    why = None
    if treatment == AUTO:
        late = [x for x in (a, b) if not p.is_8bit(x)]
        if late:
            why = f"input '{late[0]}' is not 8-bit (auto: only between 8-bit producers)"
    elif treatment is Treatment.DYNAMIC:
        why = "two activations, no constant weight: dynamic mode leaves it float"
    elif treatment is not Treatment.STATIC:
        why = _WHY_FLOAT["MatMul"]
    if why is None and any(p.index.elem_type(x) not in (FLOAT, None) for x in (a, b)):
        why = "an input is not float32"
    if why is not None:
        p.plan.decide(name, "MatMul", Treatment.FLOAT, why)
        return
    p.add_activation(a)
    p.add_activation(b)
    out = node.output[0]
    kept = out not in p.index.graph_outputs and p.offer(out)
    p.plan.add_node(NodeQuant(name, "MatMul", Treatment.STATIC),
                    "two activations, UINT8 per tensor (MatMulIntegerToFloat/QLinearMatMul)")
    p.use((a, b), (out,) if kept else (), conditional=False)


def elementwise(p: Planner, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
    picked = node.input if rule.activation_inputs is None else \
        [node.input[k] for k in rule.activation_inputs if k < len(node.input)]
    acts = [x for x in picked if x and x not in p.index.initializers]
    if not p.static_any:
        p.plan.decide(name, node.op_type, Treatment.FLOAT, "static INT8 not used in this mode")
    elif any(p.index.elem_type(x) not in (FLOAT, None) for x in node.input if x):
        p.plan.decide(name, node.op_type, Treatment.FLOAT, "an input is not float32")
    elif not any(x in p.quantized for x in acts):
        p.plan.decide(name, node.op_type, Treatment.FLOAT,
                      _NO_8BIT_INPUT if node.op_type == "Add" else _NO_8BIT_INPUT_OTHER)
    elif node.op_type in ("Add", "Mul") and len(acts) == 1 and \
            any(x in p.index.initializers for x in node.input):
        p.plan.decide(name, node.op_type, Treatment.FLOAT, "constant operand kept in float")
    else:
        forced = all(x in p.forced for x in acts)
        out = node.output[0] if not forced and node.output[0] in p.float_tensors else \
            p.fold_activation(node.output[0], name)
        if not forced and out in p.float_tensors:
            p.plan.decide(name, node.op_type, Treatment.FLOAT, _NO_8BIT_READER)
            return
        for x in acts:
            p.add_activation(x)
        p.offer(out, forced=forced)
        p.plan.add_node(NodeQuant(name, node.op_type, Treatment.STATIC), "8-bit inputs and output")
        p.use(acts, (out,), conditional=True)


def shared_scale(p: Planner, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
    src = node.input[0]
    if node.op_type in ("Gather", "GatherElements") and src in p.index.initializers:
        table_lookup(p, node, name)
        return
    outs = [o for o in node.output if o]
    problem = _passthrough_problem(p, node)
    if problem is None and p.index.elem_type(src) not in (FLOAT, None):
        problem = "no float data (shape or index arithmetic)"
    if problem is None and src not in p.quantized:
        problem = "input is not quantized"
    forced = src in p.forced
    if problem is None and not forced and all(o in p.float_tensors for o in outs):
        problem = "nothing reads its output as 8-bit"
    if problem is not None:
        p.plan.decide(name, node.op_type, Treatment.FLOAT, problem)
        return
    root = p.plan.shared.get(src, src)
    for o in outs:  # a Split output read by no 8-bit op still shares the 8-bit input
        p.add_activation(o, shared_with=root)
    if forced:
        p.forced.update(outs)
    p.plan.decide(name, node.op_type, Treatment.PASSTHROUGH,
                  "runs on 8-bit data, same scale" +
                  (" (pads with the zero point)" if node.op_type == "Pad" else ""))
    p.use((src,), outs, conditional=True)


def table_lookup(p: Planner, node: onnx.NodeProto, name: str) -> None:
    """Gather from a constant table (an embedding) whose rows an 8-bit operator reads: the
    table is stored as UINT8 at the lookup's output scale (its own range) and ONNX Runtime
    gathers 8-bit rows (3.4x over float Gather + QuantizeLinear, 30522 x 256 table); the
    rows are quantized once, not stored as 8-bit blocks and quantized again. Otherwise the
    embeddings option stores it as 8-bit blocks (GatherBlockQuantized) or it stays float."""
    table, out = node.input[0], node.output[0]
    why = None
    if not p.static_any:
        why = "static INT8 not used in this mode"
    elif p.index.initializers[table].data_type != FLOAT:
        why = "table is not float32"
    elif any(r.op_type not in ("Gather", "GatherElements")
             for r in p.index.consumers.get(table, [])):
        why = "the table is also another op's weight (tied): it keeps that op's grid"
    elif out in p.float_tensors or out in p.index.graph_outputs:
        why = "no 8-bit operator reads the rows"
    if why is not None:
        p.plan.decide(name, node.op_type, Treatment.FLOAT, f"constant table: {why}")
        return
    # the table's parameters need no calibration: filled here, as fill_activations would
    p.plan.tensors[table] = constant_operand_params(p.index.constant(table))
    p.offer(out, shared_with=table)
    p.plan.add_node(NodeQuant(name, node.op_type, Treatment.STATIC),
                    "UINT8 table at the rows' scale: gathers 8-bit rows")
    p.use((), (out,), conditional=True)


def _passthrough_problem(p: Planner, node: onnx.NodeProto) -> str | None:
    """Why this shared-scale op cannot run on 8-bit data here, or None."""
    op = node.op_type
    if op == "Resize":
        mode = _text(attr(node, "mode", "nearest"))
        if mode != "nearest":
            return f"mode {mode} interpolates: ONNX Runtime 1.32 runs it in float"
    if op == "Pad":
        return _pad_problem(p, node)
    return None


def _pad_problem(p: Planner, node: onnx.NodeProto) -> str | None:
    """ONNX Runtime 1.32 keeps any QDQ Pad in float (DequantizeLinear, Pad, QuantizeLinear);
    lowbit writes the Pad on the 8-bit tensor instead (1.07-1.18x over the float Pad between
    two QLinearConvs). Exact when it pads with 0 (the zero point) or repeats values."""
    opset = next((imp.version for imp in p.index.model.opset_import
                  if imp.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        return "Pad before opset 11 (pads as an attribute) has no 8-bit form"
    mode = _text(attr(node, "mode", "constant"))
    if mode == "constant" and len(node.input) > 2 and node.input[2]:
        value = p.index.constant(node.input[2])
        if value is None or value.size != 1 or float(value.reshape(())) != 0.0:
            return "pads with a value other than 0 (not exact on the 8-bit grid)"
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def activation(p: Planner, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
    """A Relu/Clip not folded into the op before it. Where an 8-bit operator reads its
    output, the activation disappears into the saturation of that output's quantization
    (lowbit removes it; ONNX Runtime 1.32 removes a Relu before QuantizeLinear itself, but
    not a Clip); otherwise it stays float."""
    foldable, clip = foldable_activation(node, p.index)
    out = node.output[0]
    if not foldable:
        bounds = clip_bounds(node, p.index)
        why = "Clip bounds are not constants" if bounds is None else \
            f"Clip range [{bounds[0]:g}, {bounds[1]:g}] excludes 0: a UINT8 range cannot saturate there"
    elif not p.static_any:
        why = "static INT8 not used in this mode"
    elif out in p.float_tensors or out in p.index.graph_outputs or \
            p.index.elem_type(node.input[0]) not in (FLOAT, None):
        why = "not directly after a quantized op"  # and no 8-bit op reads its output
    else:
        p.plan.folds.append(Fold(name, name, out, clip))  # producer == itself: see qdq
        p.offer(out)
        p.plan.decide(name, node.op_type, Treatment.FOLDED,
                      "became the saturation of its output's 8-bit quantization")
        p.use((), (out,), conditional=True)
        return
    p.plan.decide(name, node.op_type, Treatment.FLOAT, why)


def recurrent(p: Planner, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
    treatment = p.treatments.get(node.op_type, Treatment.FLOAT)
    constant = all(len(node.input) > k and node.input[k] in p.index.initializers
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
        p.plan.add_node(NodeQuant(name, node.op_type, Treatment.DYNAMIC, node.input[1],
                                  recurrence=node.input[2]),
                        "INT8 W and R per gate channel, activations quantized at run time")
        return
    p.plan.decide(name, node.op_type, Treatment.FLOAT, why)


def float_only(p: Planner, node: onnx.NodeProto, i: int, name: str, rule: OpRule) -> None:
    p.plan.decide(name, node.op_type, Treatment.FLOAT, rule.reason)


HANDLERS: dict[OpKind, Callable[[Planner, onnx.NodeProto, int, str, OpRule], None]] = {
    OpKind.WEIGHTED: weighted,
    OpKind.ELEMENTWISE: elementwise,
    OpKind.SHARED_SCALE: shared_scale,
    OpKind.FOLDABLE_ACTIVATION: activation,
    OpKind.RECURRENT: recurrent,
    OpKind.FLOAT_ONLY: float_only,
}
