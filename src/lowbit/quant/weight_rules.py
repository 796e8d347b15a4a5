"""Rules that turn a constant weight (and its neighbours' parameters) into INT8 parameters.

Pure numpy; the INT8 planner calls them and stores the results in the plan.
"""

from __future__ import annotations

import numpy as np

from lowbit.quant import affine
from lowbit.quant.scheme import Granularity, TensorQuantParams

# Per-tensor INT8 weights run 2-5% faster than per-channel in ONNX Runtime's QGemm
# (measured side by side, docs/NOTES.md). In auto granularity a static MatMul/Gemm
# takes per-tensor weights when that costs almost nothing, i.e. when the weight's
# own quantization noise stays far below the 8-bit activation noise next to it:
# per-tensor weight SQNR within PER_TENSOR_TOLERANCE_DB of per-channel, or at least
# PER_TENSOR_GOOD_ENOUGH_DB. Conv weights are always per channel.
PER_TENSOR_TOLERANCE_DB = 0.5
PER_TENSOR_GOOD_ENOUGH_DB = 38.0


def static_weight_params(weight: np.ndarray, out_axis: int, *, per_channel_only: bool,
                         granularity: str, bits: int = 8) -> TensorQuantParams:
    """Symmetric weight parameters stored as INT8; ``granularity`` is auto, channel or
    tensor; ``bits`` 7 keeps codes in [-63, 63] (see ``weight_bits``).

    ``per_channel_only`` (Conv) ignores the granularity: always per channel."""
    if granularity == "tensor" and not per_channel_only:
        return affine.weight_params_per_tensor(weight, bits=bits)
    channel = affine.weight_params_per_channel(weight, axis=out_axis, bits=bits)
    if per_channel_only or granularity == "channel":
        return channel
    tensor = affine.weight_params_per_tensor(weight, bits=bits)
    err_c = affine.quantization_sqnr_db(weight, channel)
    err_t = affine.quantization_sqnr_db(weight, tensor)
    good = err_t >= err_c - PER_TENSOR_TOLERANCE_DB or err_t >= PER_TENSOR_GOOD_ENOUGH_DB
    return tensor if good else channel


def weight_bits(reduce_range: bool) -> int:
    """8, or 7 with ``reduce_range``. Without VNNI, x86 CPUs multiply UINT8 x INT8 with
    VPMADDUBSW, whose 16-bit sums saturate when adjacent products are large (ONNX
    Runtime's QGemm/QLinearConv/MatMulInteger on AVX2 and plain AVX-512); 7-bit weights
    keep every pair sum below 2**15 (255 * 63 * 2 < 32768), trading ~6 dB of weight
    SQNR for the absence of saturation, which measured far worse (docs/NOTES.md)."""
    return 7 if reduce_range else 8


def bias_params(x_params: TensorQuantParams, w_params: TensorQuantParams,
                channels: int) -> TensorQuantParams:
    """INT32 bias parameters: scale = input scale x weight scale, per output channel."""
    w_scale = np.broadcast_to(np.asarray(w_params.scale, np.float64), (channels,))
    scale = (float(x_params.scale) * w_scale).astype(np.float32)
    scale = np.maximum(scale, np.float32(affine.MIN_SCALE))
    return TensorQuantParams(bits=32, signed=True, symmetric=True,
                             granularity=Granularity.CHANNEL, scale=scale,
                             zero_point=np.zeros(channels, np.int64), axis=0)


def constant_operand_params(value: np.ndarray) -> TensorQuantParams:
    """A constant input of an 8-bit elementwise op (e.g. Concat): UINT8 per tensor."""
    return affine.activation_params(float(value.min(initial=0.0)), float(value.max(initial=0.0)))


def granularity_label(params: TensorQuantParams) -> str:
    return "per-channel" if params.granularity is Granularity.CHANNEL else "per-tensor"
