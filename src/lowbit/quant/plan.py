"""The quantization plan: plain data that says how every tensor and node is quantized.

Planners fill it (the ONNX op registry decides what may be quantized; observers,
weight rules, GPTQ/HQQ, mixed precision and later QAT fill the parameters);
writers consume it and decide nothing. Parameters describe each tensor as it is
stored in the float model (a MatMul weight is (K, N), a transposed Gemm weight
(N, K)); a writer that needs another layout converts the layout, not the numbers.

    >>> plan = QuantizationPlan()
    >>> plan.decide("fc1", "Gemm", Treatment.FLOAT, "excluded by option")
    >>> plan.counts()
    {'float': 1}
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.quant.scheme import TensorQuantParams


class Treatment(str, enum.Enum):
    """What happens to one node."""

    STATIC = "int8-static"  # INT8 weights and 8-bit activations (QDQ)
    DYNAMIC = "int8-dynamic"  # INT8 weights, activations quantized at run time
    PASSTHROUGH = "int8-passthrough"  # runs on 8-bit data, keeps the input's scale
    FOLDED = "folded"  # removed: it became the saturation of the op before it
    WEIGHT_ONLY = "weight-only"  # low-bit weights, float activations (MatMulNBits, ...)
    FLOAT = "float"


@dataclass(frozen=True)
class NodeDecision:
    """One node's treatment and why; ``bits`` for weight-only, ``weights`` notes the
    weight granularity used."""

    name: str
    op_type: str
    treatment: Treatment
    reason: str = ""
    bits: int | None = None
    weights: str | None = None

    @property
    def label(self) -> str:
        if self.treatment is Treatment.WEIGHT_ONLY:
            return f"int{self.bits}-weight-only"
        return self.treatment.value

    def to_dict(self) -> dict[str, str]:
        out = {"name": self.name, "op_type": self.op_type, "treatment": self.label,
               "reason": self.reason}
        if self.weights:
            out["weights"] = self.weights
        return out


@dataclass(frozen=True)
class Fold:
    """A Relu/Clip that disappears into the saturation of ``producer``'s output, or the
    bias Add of a static MatMul that its integer Gemm absorbs (``clip`` None)."""

    producer: str  # node name
    activation: str  # node name of the Relu/Clip (or bias Add)
    output: str  # tensor the producer writes after the fold
    clip: tuple[float, float] | None  # Clip bounds; None for Relu


@dataclass(frozen=True)
class NodeQuant:
    """How a writer emits one quantized node: its weight/bias tensors (keys of
    ``QuantizationPlan.tensors``), and writer settings the planner chose."""

    name: str
    op_type: str
    treatment: Treatment
    weight: str | None = None  # initializer name of the constant weight
    bias: str | None = None
    accuracy_level: int | None = None  # MatMulNBits
    recurrence: str | None = None  # an LSTM's recurrence weight R (``weight`` is its W)


@dataclass
class QuantizationPlan:
    decisions: list[NodeDecision] = field(default_factory=list)
    nodes: dict[str, NodeQuant] = field(default_factory=dict)  # by node name, in graph order
    activations: list[str] = field(default_factory=list)  # tensors that get Q -> DQ
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor it takes params from
    folds: list[Fold] = field(default_factory=list)
    tensors: dict[str, TensorQuantParams] = field(default_factory=dict)  # weights, biases, activations
    # replacement float values quantized instead of the model's (GPTQ's compensated
    # weights, QAT's learned ones); requantizing them with the plan's params gives the codes
    weight_values: dict[str, np.ndarray] = field(default_factory=dict)
    layer_error: dict[str, float] = field(default_factory=dict)  # relative weight error
    metadata: dict[str, Any] = field(default_factory=dict)  # written into the model
    # decision index by node name (``decide``); not a field a copy passes on
    _position: dict[str, int] = field(default_factory=dict, init=False, repr=False,
                                      compare=False)

    def decide(self, name: str, op_type: str, treatment: Treatment, reason: str = "",
               bits: int | None = None) -> None:
        """Record one node's decision; a later decision for the same node replaces the
        earlier one in place (e.g. an embedding Gather the INT8 planner left float that
        the weight-only planner then stores as 8-bit blocks): one decision per node."""
        decision = NodeDecision(name, op_type, treatment, reason, bits)
        k = self._position.get(name)
        stale = len(self._position) != len(self.decisions) if k is None else \
            k >= len(self.decisions) or self.decisions[k].name != name
        if stale:  # the list changed behind the index (a copy, a rewrite): rebuild it
            self._position = {d.name: i for i, d in enumerate(self.decisions)}
            k = self._position.get(name)
        if k is None:
            self._position[name] = len(self.decisions)
            self.decisions.append(decision)
        else:
            self.decisions[k] = decision

    def add_node(self, node: NodeQuant, reason: str, bits: int | None = None) -> None:
        self.nodes[node.name] = node
        self.decide(node.name, node.op_type, node.treatment, reason, bits)

    def nodes_with(self, *treatments: Treatment) -> list[NodeQuant]:
        return [n for n in self.nodes.values() if n.treatment in treatments]

    @property
    def observed(self) -> list[str]:
        """Activation tensors whose ranges calibration must measure."""
        return [t for t in self.activations if t not in self.shared]

    @property
    def clip_caps(self) -> dict[str, tuple[float, float]]:
        """Folded Clip(0, c) outputs: their quantization range may not exceed the clip."""
        return {f.output: f.clip for f in self.folds if f.clip is not None}

    def values_of(self, name: str, stored: Callable[[str], Any]) -> np.ndarray:
        """The float values quantized for ``name``: the plan's replacement values if it
        has them, else ``stored(name)`` (the model's constant)."""
        value = self.weight_values.get(name)
        if value is None:
            value = stored(name)
        if value is None:
            raise ValueError(f"internal: constant {name} vanished")
        return np.asarray(value)

    def activation_params(self, tensor: str) -> TensorQuantParams:
        return self.tensors[self.shared.get(tensor, tensor)]

    def counts(self) -> dict[str, int]:
        return dict(Counter(d.label for d in self.decisions))

    def decision_dicts(self) -> list[dict[str, str]]:
        return [d.to_dict() for d in self.decisions]

    def quantized_layers(self, op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
                         ) -> list[tuple[str, str]]:
        """(name, op type) of the weighted nodes that are quantized."""
        return [(n.name, n.op_type) for n in self.nodes.values()
                if n.op_type in op_types and n.treatment is not Treatment.FLOAT]
