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
    # ranges beyond float32 (only possible from float64 input) saturate, never inf
    scale = np.minimum(scale, float(np.finfo(np.float32).max) / 2 ** (bits + 1))
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


def quantize(x: np.ndarray, params: TensorQuantParams, dtype: Any = None) -> np.ndarray:
    """Quantize ``x`` to integers: ``dtype`` if given, else int32 (int64 above 16 bits).

    Computed in float32 (float64 above 16 bits) in blocks along the first axis, so a
    large weight needs only a small temporary buffer besides the result.
    """
    axis = params.axis if params.granularity is Granularity.CHANNEL else None
    if axis is not None and axis < 0:
        axis += x.ndim
    wide = params.bits > 16
    ftype = np.float64 if wide else np.float32
    scale = _broadcast(params.scale, x.ndim, axis).astype(np.float32).astype(ftype)
    zp = _broadcast(params.zero_point, x.ndim, axis).astype(ftype)
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=dtype or (np.int64 if wide else np.int32))
    if x.ndim == 0:
        return _quantize_block(x, scale, zp, params, ftype).astype(out.dtype)
    row = max(1, int(np.prod(x.shape[1:])))
    step = max(1, (1 << 20) // row)
    for start in range(0, x.shape[0], step):
        sl = slice(start, start + step)
        s = scale[sl] if axis == 0 and scale.ndim else scale
        z = zp[sl] if axis == 0 and zp.ndim else zp
        out[sl] = _quantize_block(x[sl], s, z, params, ftype)
    return out


def _quantize_block(x: np.ndarray, scale: np.ndarray, zp: np.ndarray,
                    params: TensorQuantParams, ftype: Any) -> np.ndarray:
    y = np.array(x, dtype=np.float32, copy=True).astype(ftype, copy=False)
    y /= scale
    np.rint(y, out=y)
    y += zp
    np.clip(y, params.qmin, params.qmax, out=y)
    return y


def dequantize(q: np.ndarray, params: TensorQuantParams) -> np.ndarray:
    axis = params.axis if params.granularity is Granularity.CHANNEL else None
    if axis is not None and axis < 0:
        axis += q.ndim
    scale = _broadcast(params.scale, q.ndim, axis).astype(np.float32)
    if params.bits > 16:
        zp64 = _broadcast(params.zero_point, q.ndim, axis).astype(np.int64)
        return ((q.astype(np.int64) - zp64).astype(np.float32) * scale).astype(np.float32)
    y = q.astype(np.float32)  # exact: |q - zp| < 2**17
    y -= _broadcast(params.zero_point, q.ndim, axis).astype(np.float32)
    y *= scale
    return y


def quantization_sqnr_db(w: np.ndarray, params: TensorQuantParams) -> float:
    """SQNR (dB) of ``w`` after a quantize/dequantize round trip, computed block by
    block along the channel axis so a large weight needs little extra memory."""
    axis = params.axis if params.granularity is Granularity.CHANNEL else None
    view = np.moveaxis(w, axis % w.ndim, 0) if axis is not None else w.reshape(-1, 1)
    scale = np.broadcast_to(np.asarray(params.scale, np.float32).reshape(-1), (view.shape[0],))
    zp = np.broadcast_to(np.asarray(params.zero_point, np.float32).reshape(-1), (view.shape[0],))
    signal = noise = 0.0
    rows = max(1, (1 << 20) // max(1, int(np.prod(view.shape[1:]))))
    for start in range(0, view.shape[0], rows):
        block = view[start : start + rows].astype(np.float32)
        shape = (-1,) + (1,) * (block.ndim - 1)
        s, z = scale[start : start + rows].reshape(shape), zp[start : start + rows].reshape(shape)
        q = np.clip(np.rint(block / s) + z, params.qmin, params.qmax)
        err = ((q - z) * s - block).astype(np.float64)
        signal += float(np.sum(block.astype(np.float64) ** 2))
        noise += float(np.sum(err * err))
    if noise == 0.0:
        return 200.0
    return -200.0 if signal == 0.0 else float(min(200.0, 10.0 * np.log10(signal / noise)))


def weight_params_per_channel(
    w: np.ndarray, *, axis: int, bits: int = 8
) -> TensorQuantParams:
    """Symmetric signed per-channel parameters for a weight tensor (narrow range)."""
    axis = axis % w.ndim
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    if reduce_axes:  # max |w| per channel without a full-size temporary
        absmax = np.maximum(np.max(w, axis=reduce_axes), -np.min(w, axis=reduce_axes))
    else:
        absmax = np.abs(w)
    scale, zp = scale_zero_point(
        -absmax, absmax, bits=bits, signed=True, symmetric=True, narrow_range=True
    )
    return TensorQuantParams(
        bits=bits, signed=True, symmetric=True, granularity=Granularity.CHANNEL,
        scale=scale, zero_point=zp, axis=axis, narrow_range=True,
    )


def weight_params_per_tensor(w: np.ndarray, *, bits: int = 8) -> TensorQuantParams:
    absmax = max(float(np.max(w)), -float(np.min(w))) if w.size else 0.0
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


def pack_int4(values: np.ndarray, *, signed: bool | None = None) -> np.ndarray:
    """Pack integers in [-8, 7] (``signed=True``) or [0, 15] (``signed=False``) two per
    byte, low nibble first; ``signed=None`` accepts either range. An odd count is
    padded with a zero nibble. Returns uint8 of ceil(n/2) bytes.
    """
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    lo, hi = {True: (-8, 7), False: (0, 15), None: (-8, 15)}[signed]
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ValueError(f"int4 values must lie in [{lo}, {hi}]")
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
