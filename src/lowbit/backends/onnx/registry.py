"""Which ONNX operators lowbit quantizes, and how.

Each registered op type has a rule saying what kind of operator it is for
quantization. An op that is not registered stays in float and is listed in
the report with the reason (``--strict`` turns that into an error); nothing
is skipped silently.

Kinds:
- WEIGHTED: has a constant weight (and maybe bias); INT8 weights, per channel.
  ONNX Runtime fuses the QDQ pattern into QLinearConv / QGemm /
  MatMulIntegerToFloat.
- ELEMENTWISE: quantized inputs and output with their own scale
  (QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, ...).
- SHARED_SCALE: moves or selects values without arithmetic (MaxPool,
  Reshape, ...). Quantized only when its input already is; the output keeps
  the input's scale, so ONNX Runtime runs it directly on 8-bit data.
- FOLDABLE_ACTIVATION: Relu / Clip(0, c) directly after a quantized op is
  removed and becomes the saturation of that op's output quantization.
- RECURRENT: LSTM with constant W and R: INT8 weights per gate channel, activations
  quantized at run time (ONNX Runtime's DynamicQuantizeLSTM). ONNX Runtime has no
  integer GRU/RNN kernel: those are registered to stay float with that reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OpKind(enum.Enum):
    WEIGHTED = "weighted"
    ELEMENTWISE = "elementwise"
    SHARED_SCALE = "shared_scale"
    FOLDABLE_ACTIVATION = "foldable_activation"
    RECURRENT = "recurrent"


@dataclass(frozen=True)
class OpRule:
    kind: OpKind
    weight_input: int | None = None  # input index of the constant weight
    bias_input: int | None = None  # input index of the optional bias
    dynamic: bool = False  # may use dynamic (runtime-range) INT8
    activation_inputs: tuple[int, ...] | None = (0,)  # inputs that get Q/DQ; None: all


REGISTRY: dict[str, OpRule] = {
    "Conv": OpRule(OpKind.WEIGHTED, weight_input=1, bias_input=2),
    "Gemm": OpRule(OpKind.WEIGHTED, weight_input=1, bias_input=2, dynamic=True),
    "MatMul": OpRule(OpKind.WEIGHTED, weight_input=1, dynamic=True),
    "Add": OpRule(OpKind.ELEMENTWISE, activation_inputs=(0, 1)),
    "Mul": OpRule(OpKind.ELEMENTWISE, activation_inputs=(0, 1)),
    "Concat": OpRule(OpKind.ELEMENTWISE, activation_inputs=None),  # all inputs
    "GlobalAveragePool": OpRule(OpKind.ELEMENTWISE),
    "AveragePool": OpRule(OpKind.ELEMENTWISE),
    "MaxPool": OpRule(OpKind.SHARED_SCALE),
    "Reshape": OpRule(OpKind.SHARED_SCALE),
    "Flatten": OpRule(OpKind.SHARED_SCALE),
    "Transpose": OpRule(OpKind.SHARED_SCALE),
    "Squeeze": OpRule(OpKind.SHARED_SCALE),
    "Unsqueeze": OpRule(OpKind.SHARED_SCALE),
    "LSTM": OpRule(OpKind.RECURRENT, weight_input=1, dynamic=True),
    "GRU": OpRule(OpKind.RECURRENT, weight_input=1),
    "RNN": OpRule(OpKind.RECURRENT, weight_input=1),
    "Relu": OpRule(OpKind.FOLDABLE_ACTIVATION),
    "Clip": OpRule(OpKind.FOLDABLE_ACTIVATION),
}

# Ops that legitimately carry no float math worth quantizing; they are not
# listed as "left in float" to keep reports readable.
NEUTRAL_OPS = frozenset({"Shape", "Gather", "Constant", "ConstantOfShape", "Identity", "Cast",
                         "Range", "Slice", "Concat", "Expand", "Equal", "Where", "Not"})


def rule_for(op_type: str, domain: str = "") -> OpRule | None:
    if domain not in ("", "ai.onnx"):
        return None
    return REGISTRY.get(op_type)
