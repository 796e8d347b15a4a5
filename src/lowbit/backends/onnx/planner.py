"""The INT8 planner's state: what is 8-bit so far, what each node reads and writes as
8-bit (so that unread 8-bit outputs can be dropped), and the folds of Relu/Clip and bias
Adds into the op before them. ``plan_ops`` holds the handlers, ``plan`` the driver."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from lowbit.backends.onnx.graph import GraphIndex, node_name
from lowbit.quant.plan import Fold, QuantizationPlan, Treatment

FLOAT = onnx.TensorProto.FLOAT
AUTO = "auto"  # weighted treatment: static when fed 8-bit data, else dynamic


@dataclass(frozen=True)
class Use:
    """What one planned node reads and writes as 8-bit tensors. ``conditional``: the node
    is only worth running on 8-bit data when one of ``writes`` is needed (or forced)."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]
    conditional: bool


@dataclass
class Planner:
    index: GraphIndex
    nodes: list[onnx.NodeProto]
    treatments: dict[str, Treatment | str]
    float_tensors: frozenset[str] = frozenset()  # 8-bit outputs that no integer op reads
    plan: QuantizationPlan = field(default_factory=QuantizationPlan)
    quantized: set[str] = field(default_factory=set)  # tensors carrying Q/DQ so far
    forced: set[str] = field(default_factory=set)  # 8-bit whoever reads them (Conv outputs)
    uses: list[Use] = field(default_factory=list)
    folded_away: set[str] = field(default_factory=set)
    unknown: list[str] = field(default_factory=list)

    @property
    def static_any(self) -> bool:
        return any(t in (Treatment.STATIC, AUTO) for t in self.treatments.values())

    def treatment(self, op_type: str) -> Treatment | str:
        """The mode's treatment of a weighted op type (float if not named); Attention
        follows MatMul unless named itself."""
        if op_type == "Attention" and op_type not in self.treatments:
            op_type = "MatMul"
        return self.treatments.get(op_type, Treatment.FLOAT)

    def is_8bit(self, tensor: str) -> bool:
        """Whether an 8-bit version of ``tensor`` is (or can be) there for free."""
        return tensor in self.quantized or tensor in self.index.graph_inputs

    def add_activation(self, tensor: str, shared_with: str | None = None) -> None:
        if tensor not in self.quantized:
            self.quantized.add(tensor)
            self.plan.activations.append(tensor)
            if shared_with is not None:
                self.plan.shared[tensor] = shared_with

    def offer(self, tensor: str, *, shared_with: str | None = None, forced: bool = False) -> bool:
        """Make ``tensor`` (an output) 8-bit, unless an earlier pass found nothing reads it
        as 8-bit; ``forced`` outputs are 8-bit regardless. True if it is."""
        if tensor in self.float_tensors and not forced:
            return False
        self.add_activation(tensor, shared_with)
        if forced:
            self.forced.add(tensor)
        return True

    def use(self, reads: tuple[str, ...] | list[str], writes: tuple[str, ...] | list[str],
            conditional: bool) -> None:
        self.uses.append(Use(tuple(reads), tuple(writes), conditional))

    def unneeded(self) -> set[str]:
        """8-bit tensors of this pass that no integer kernel reads: read only by nodes whose
        8-bit outputs are themselves unneeded, or by none (graph outputs, float ops)."""
        needed: set[str] = set()
        for u in reversed(self.uses):  # consumers come after producers in the graph
            if not u.conditional or any(w in needed or w in self.forced for w in u.writes):
                needed.update(u.reads)
        return {t for t in self.plan.activations if t not in needed and t not in self.forced}

    def name_of(self, node: onnx.NodeProto) -> str:
        return node_name(node, self.nodes.index(node))

    def fold_activation(self, out: str, name: str, *, output_quantized: bool = True) -> str:
        """Fold a Relu/Clip(lo <= 0 <= hi) that is the only consumer of ``out`` (written by
        node ``name``) into that tensor's quantization range; return the tensor that now
        ends ``name``. Not when the activation's output is a graph output that will not be
        quantized (``output_quantized`` False): nothing would saturate it; nor when an
        earlier pass found that nothing reads it as 8-bit."""
        consumers = self.index.consumers.get(out, [])
        if out in self.index.graph_outputs or len(consumers) != 1:
            return out
        act = consumers[0]
        foldable, clip = foldable_activation(act, self.index)
        if not foldable or act.output[0] in self.float_tensors or \
                (not output_quantized and act.output[0] in self.index.graph_outputs):
            return out
        act_name = self.name_of(act)
        self.plan.folds.append(Fold(name, act_name, act.output[0], clip))
        self.folded_away.add(act_name)
        self.plan.decide(act_name, act.op_type, Treatment.FOLDED,
                         f"folded into {name}'s output range")
        return act.output[0]

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
        add_name = self.name_of(add)
        self.plan.folds.append(Fold(name, add_name, add.output[0], None))
        self.folded_away.add(add_name)
        self.plan.decide(add_name, "Add", Treatment.FOLDED, f"bias of {name}'s integer Gemm")
        return other[0], add.output[0]


def clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float, float] | None:
    """(lo, hi) of a Relu (0, inf) or a Clip with constant bounds (inputs since opset 11,
    attributes before); None when a bound is not a constant."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    lo, hi = float("-inf"), float("inf")
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        elif a.name == "max":
            hi = a.f
    for k in (1, 2):
        if len(node.input) > k and node.input[k]:
            value = index.constant(node.input[k])
            if value is None or value.size != 1:
                return None
            if k == 1:
                lo = float(value.reshape(()))
            else:
                hi = float(value.reshape(()))
    return lo, hi


def foldable_activation(node: onnx.NodeProto, index: GraphIndex
                        ) -> tuple[bool, tuple[float, float] | None]:
    """(whether ``node`` can become the saturation of a quantized tensor, its Clip bounds;
    None for Relu). A uint8 range always holds 0, so a Clip must have lo <= 0 <= hi."""
    if node.op_type not in ("Relu", "Clip") or node.domain not in ("", "ai.onnx"):
        return False, None
    bounds = clip_bounds(node, index)
    if bounds is None or not bounds[0] <= 0.0 <= bounds[1]:
        return False, None
    return True, None if node.op_type == "Relu" else bounds
