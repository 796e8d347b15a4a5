"""Which ONNX operators lowbit quantizes, and how.

Each registered op type has a rule saying what kind of operator it is for
quantization. An op that is not registered stays in float and is listed in
the report with the reason (``--strict`` turns that into an error); nothing
is skipped silently.

Kinds:
- WEIGHTED: has a constant weight (and maybe bias); INT8 weights, per channel.
  ONNX Runtime fuses the QDQ pattern into QLinearConv / QGemm /
  MatMulIntegerToFloat; com.microsoft Attention becomes QAttention. A MatMul of
  two activations (attention's Q.K^T and P.V) gets 8-bit inputs and runs as
  MatMulIntegerToFloat / QLinearMatMul.
- ELEMENTWISE: quantized inputs and output with their own scale
  (QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, ...).
- SHARED_SCALE: moves or selects values without arithmetic (MaxPool,
  Reshape, ...). Quantized only when its input already is; the output keeps
  the input's scale, so ONNX Runtime runs it directly on 8-bit data. Only ops
  whose DequantizeLinear -> op -> QuantizeLinear ONNX Runtime 1.32 replaces by
  the op on 8-bit data are registered (Pad, which it does not, is written on
  the 8-bit tensor directly); around any other op the pair would only add work.
- FOLDABLE_ACTIVATION: Relu / Clip(lo <= 0 <= hi) directly after a quantized op is
  removed and becomes the saturation of that op's output quantization; before an
  8-bit consumer, the saturation of its own output's quantization.
- RECURRENT: LSTM with constant W and R: INT8 weights per gate channel, activations
  quantized at run time (ONNX Runtime's DynamicQuantizeLSTM). ONNX Runtime has no
  integer GRU/RNN kernel: those are registered to stay float with that reason.
- FLOAT_ONLY: known, and kept float for the measured reason given (ONNX Runtime
  runs its QDQ form as DequantizeLinear + the float op + QuantizeLinear).

Speed figures in the reasons: ONNX Runtime 1.32, one intra-op thread, 2-core AMD
EPYC without VNNI, float and quantized graphs alternating, median (docs/NOTES.md,
"Operator coverage").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MS_DOMAIN = "com.microsoft"


class OpKind(enum.Enum):
    WEIGHTED = "weighted"
    ELEMENTWISE = "elementwise"
    SHARED_SCALE = "shared_scale"
    FOLDABLE_ACTIVATION = "foldable_activation"
    RECURRENT = "recurrent"
    FLOAT_ONLY = "float_only"


@dataclass(frozen=True)
class OpRule:
    kind: OpKind
    weight_input: int | None = None  # input index of the constant weight
    bias_input: int | None = None  # input index of the optional bias
    dynamic: bool = False  # may use dynamic (runtime-range) INT8
    activation_inputs: tuple[int, ...] | None = (0,)  # inputs that get Q/DQ; None: all
    reason: str = ""  # FLOAT_ONLY: why it stays float


# Reasons are short (every decision is stored in the model's metadata); the measurements
# behind them: ConvTranspose's QDQ form is DequantizeLinear + float ConvTranspose
# (0.99-1.04x, weight noise only) and rewritten as a 1x1 QLinearConv + 8-bit DepthToSpace
# (kernel = stride) it ran 0.42-0.72x (1.03x at 128 channels); QDQ InstanceNormalization
# 1.00x; ONNX Runtime keeps Q/DQ around SpaceToDepth. docs/NOTES.md, "Operator coverage".
_CONV_TRANSPOSE = "no integer ConvTranspose in ONNX Runtime 1.32 (QDQ form runs float: 1.0x)"
_INSTANCE_NORM = "no integer InstanceNormalization in ONNX Runtime 1.32 (QDQ form runs float: 1.0x)"
_SPACE_TO_DEPTH = "ONNX Runtime 1.32 keeps Q/DQ around SpaceToDepth: 8-bit would only add work"

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
    "Expand": OpRule(OpKind.SHARED_SCALE),
    "Tile": OpRule(OpKind.SHARED_SCALE),
    "Slice": OpRule(OpKind.SHARED_SCALE),
    "Split": OpRule(OpKind.SHARED_SCALE),
    "Gather": OpRule(OpKind.SHARED_SCALE),  # data (input 0) computed; tables: embeddings
    "GatherElements": OpRule(OpKind.SHARED_SCALE),
    "DepthToSpace": OpRule(OpKind.SHARED_SCALE),
    "Resize": OpRule(OpKind.SHARED_SCALE),  # mode nearest only (the handler checks)
    "Pad": OpRule(OpKind.SHARED_SCALE),  # written as Pad on the 8-bit tensor (qdq_integer)
    "LSTM": OpRule(OpKind.RECURRENT, weight_input=1, dynamic=True),
    "GRU": OpRule(OpKind.RECURRENT, weight_input=1),
    "RNN": OpRule(OpKind.RECURRENT, weight_input=1),
    "Relu": OpRule(OpKind.FOLDABLE_ACTIVATION),
    "Clip": OpRule(OpKind.FOLDABLE_ACTIVATION),
    "ConvTranspose": OpRule(OpKind.FLOAT_ONLY, reason=_CONV_TRANSPOSE),
    "InstanceNormalization": OpRule(OpKind.FLOAT_ONLY, reason=_INSTANCE_NORM),
    "SpaceToDepth": OpRule(OpKind.FLOAT_ONLY, reason=_SPACE_TO_DEPTH),
}

# com.microsoft contrib ops. Attention: input (B, S, H) x weight (H, 3H) (+ bias, mask):
# ONNX Runtime's QAttention takes 8-bit input and INT8 weight (Attention + MatMul block
# 1.22-1.36x over float at hidden 256-768, 0.98x at hidden 64 x 16 tokens).
CONTRIB_REGISTRY: dict[str, OpRule] = {
    "Attention": OpRule(OpKind.WEIGHTED, weight_input=1, bias_input=2, dynamic=True),
}

# Ops that legitimately carry no float math worth quantizing; they are not
# listed as "left in float" to keep reports readable.
NEUTRAL_OPS = frozenset({"Shape", "Gather", "Constant", "ConstantOfShape", "Identity", "Cast",
                         "Range", "Slice", "Concat", "Expand", "Equal", "Where", "Not"})


def rule_for(op_type: str, domain: str = "") -> OpRule | None:
    if domain in ("", "ai.onnx"):
        return REGISTRY.get(op_type)
    if domain == MS_DOMAIN:
        return CONTRIB_REGISTRY.get(op_type)
    return None
