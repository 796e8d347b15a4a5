"""Affine (scale, zero point) quantization math on numpy arrays, and int4 packing.

``q = clamp(round(x / scale) + zero_point, qmin, qmax)``;
``x' = (q - zero_point) * scale``. Rounding is half-to-even, as ONNX
QuantizeLinear does, so numpy and ONNX Runtime agree bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.quant.scheme import Granularity, TensorQuantParams

# Smallest scale we ever emit. Products of two scales (the int32 bias scale)
# stay far above float32's denormal range, so degenerate tensors (all zero,
# denormal) still get finite, usable parameters.
MIN_SCALE = 1e-12


def qrange(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)) + (1 if narrow_range else 0), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero_point(
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    *,
    bits: int,
    signed: bool,
    symmetric: bool,
    narrow_range: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point that map [lo, hi] (widened to contain 0) onto the grid.

    Zero is always exactly representable. Works elementwise on arrays.
    """
    lo_arr = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi_arr = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo_arr)) and np.all(np.isfinite(hi_arr))):
        raise ValueError("quantization range must be finite")
    qmin, qmax = qrange(bits, signed, narrow_range)
    if symmetric:
        absmax = np.maximum(np.abs(lo_arr), np.abs(hi_arr))
        if signed:
            scale = absmax / float(qmax)
            zero_point = np.zeros_like(scale, dtype=np.int64)
        else:  # symmetric unsigned: zero sits in the middle of the grid
            half = (qmax - qmin) / 2.0
            scale = absmax / half
            zero_point = np.full(scale.shape, int(round((qmax + qmin + 1) / 2)), dtype=np.int64)
    else:
        scale = (hi_arr - lo_arr) / float(qmax - qmin)
        safe = np.where(scale > MIN_SCALE, scale, 1.0)
        zero_point = np.round(qmin - lo_arr / safe).astype(np.int64)
        zero_point = np.clip(zero_point, qmin, qmax)
    degenerate = ~(scale > MIN_SCALE)
    scale = np.where(degenerate, np.where(scale > 0, MIN_SCALE, 1.0), scale)
    if not symmetric:
        zero_point = np.where(degenerate, np.clip(0, qmin, qmax), zero_point)
    return scale.astype(np.float32), zero_point.astype(np.int64)


def _broadcast(values: np.ndarray | np.generic, ndim: int, axis: int | None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0 or axis is None:
        return arr
    shape = [1] * ndim
    shape[axis] = arr.shape[0]
    return arr.reshape(shape)


def quantize(x: np.ndarray, params: TensorQuantParams) -> np.ndarray:
    """Quantize ``x`` to integers (int64 array; the writer picks the storage dtype)."""
    axis = params.axis if params.granularity is Granularity.CHANNEL else None
    if axis is not None and axis < 0:
        axis += x.ndim
    scale = _broadcast(params.scale, x.ndim, axis).astype(np.float32)
    zp = _broadcast(params.zero_point, x.ndim, axis).astype(np.int64)
    q = np.rint(x.astype(np.float32) / scale).astype(np.int64) + zp
    return np.clip(q, params.qmin, params.qmax)


def dequantize(q: np.ndarray, params: TensorQuantParams) -> np.ndarray:
    axis = params.axis if params.granularity is Granularity.CHANNEL else None
    if axis is not None and axis < 0:
        axis += q.ndim
    scale = _broadcast(params.scale, q.ndim, axis).astype(np.float32)
    zp = _broadcast(params.zero_point, q.ndim, axis).astype(np.int64)
    return ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)


def weight_params_per_channel(
    w: np.ndarray, *, axis: int, bits: int = 8
) -> TensorQuantParams:
    """Symmetric signed per-channel parameters for a weight tensor (narrow range)."""
    axis = axis % w.ndim
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.max(np.abs(w), axis=reduce_axes) if reduce_axes else np.abs(w)
    scale, zp = scale_zero_point(
        -absmax, absmax, bits=bits, signed=True, symmetric=True, narrow_range=True
    )
    return TensorQuantParams(
        bits=bits, signed=True, symmetric=True, granularity=Granularity.CHANNEL,
        scale=scale, zero_point=zp, axis=axis, narrow_range=True,
    )


def weight_params_per_tensor(w: np.ndarray, *, bits: int = 8) -> TensorQuantParams:
    absmax = float(np.max(np.abs(w))) if w.size else 0.0
    scale, zp = scale_zero_point(
        -absmax, absmax, bits=bits, signed=True, symmetric=True, narrow_range=True
    )
    return TensorQuantParams(
        bits=bits, signed=True, symmetric=True, granularity=Granularity.TENSOR,
        scale=scale.reshape(()), zero_point=zp.reshape(()), narrow_range=True,
    )


def activation_params(lo: float, hi: float, *, bits: int = 8) -> TensorQuantParams:
    """Unsigned asymmetric per-tensor parameters for an activation range."""
    scale, zp = scale_zero_point(lo, hi, bits=bits, signed=False, symmetric=False)
    return TensorQuantParams(
        bits=bits, signed=False, symmetric=False, granularity=Granularity.TENSOR,
        scale=scale.reshape(()), zero_point=zp.reshape(()),
    )


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack integers in [-8, 7] (or [0, 15]) two per byte, low nibble first.

    An odd count is padded with a zero nibble. Returns uint8 of ceil(n/2) bytes.
    """
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -8 or flat.max() > 15):
        raise ValueError("int4 values must lie in [-8, 7] (signed) or [0, 15] (unsigned)")
    nibbles = (flat & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.concatenate([nibbles, np.zeros(1, dtype=np.uint8)])
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, *, signed: bool) -> np.ndarray:
    """Inverse of ``pack_int4``: ``count`` values as int8 (signed) or uint8."""
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if count < 0 or count > 2 * data.size:
        raise ValueError(f"cannot unpack {count} int4 values from {data.size} bytes")
    nibbles = np.empty(data.size * 2, dtype=np.uint8)
    nibbles[0::2] = data & 0x0F
    nibbles[1::2] = data >> 4
    nibbles = nibbles[:count]
    if signed:
        out: Any = nibbles.astype(np.int8)
        out[out > 7] -= 16
        return np.asarray(out, dtype=np.int8)
    return nibbles
