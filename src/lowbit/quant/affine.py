"""Affine (scale, zero point) quantization math on numpy arrays, and int4 packing.

``q = clamp(round(x / scale) + zero_point, qmin, qmax)``;
``x' = (q - zero_point) * scale``. Rounding is half-to-even, as ONNX
QuantizeLinear does, so numpy and ONNX Runtime agree bit for bit.
Granularity tensor, channel (one scale per index of ``axis``) or group (``axis``
cut into groups of ``group_size``; ``group_params``). ``scale_zero_point`` is the
one place a range becomes a scale and zero point.
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
    compute_dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point that map [lo, hi] (widened to contain 0) onto the grid.

    Zero is always exactly representable. Works elementwise on arrays. The only
    place in lowbit that turns a range into (scale, zero point). ``compute_dtype``
    is the precision of the arithmetic: float64 for observed ranges and INT8
    weights, float32 for group-wise weight-only parameters (``group_params``).
    """
    ct = np.dtype(compute_dtype).type
    lo_arr = np.minimum(np.asarray(lo, dtype=ct), ct(0.0))
    hi_arr = np.maximum(np.asarray(hi, dtype=ct), ct(0.0))
    if not (np.all(np.isfinite(lo_arr)) and np.all(np.isfinite(hi_arr))):
        raise ValueError("quantization range must be finite")
    qmin, qmax = qrange(bits, signed, narrow_range)
    if symmetric:
        absmax = np.maximum(np.abs(lo_arr), np.abs(hi_arr))
        if signed:
            scale = absmax / ct(qmax)
            zero_point = np.zeros_like(scale, dtype=np.int64)
        else:  # symmetric unsigned: zero sits in the middle of the grid
            half = (qmax - qmin) / 2.0
            scale = absmax / ct(half)
            zero_point = np.full(scale.shape, int(round((qmax + qmin + 1) / 2)), dtype=np.int64)
    else:
        scale = (hi_arr - lo_arr) / ct(qmax - qmin)
        safe = np.where(scale > MIN_SCALE, scale, ct(1.0))
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

    Computed in float32 (float64 above 16 bits) in blocks along the first axis (for
    granularity group: along the axes before the group axis), so a large weight needs
    only a small temporary buffer besides the result.
    """
    wide = params.bits > 16
    ftype = np.float64 if wide else np.float32
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=dtype or (np.int64 if wide else np.int32))
    if params.granularity is Granularity.GROUP:
        return _quantize_groups(x, params, out, ftype)
    axis = params.axis if params.granularity is Granularity.CHANNEL else None
    if axis is not None and axis < 0:
        axis += x.ndim
    scale = _broadcast(params.scale, x.ndim, axis).astype(np.float32).astype(ftype)
    zp = _broadcast(params.zero_point, x.ndim, axis).astype(ftype)
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
    """``(q - zero_point) * scale`` as float32, same shape as ``q``."""
    if params.granularity is Granularity.GROUP:
        return _dequantize_groups(np.asarray(q), params)
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
    if params.granularity is Granularity.GROUP:
        return _sqnr_groups(np.asarray(w), params)
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
    return _db(signal, noise)


def _db(signal: float, noise: float) -> float:
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


# ---------------------------------------------------------------- granularity group


def group_params(w: np.ndarray, *, bits: int, group_size: int, axis: int,
                 symmetric: bool) -> TensorQuantParams:
    """Group-wise parameters: ``axis`` of ``w`` cut into consecutive groups of
    ``group_size`` (the last may be shorter), one scale and zero point per group,
    computed in float32 (see ``scale_zero_point``).

    Symmetric: signed, not narrow, zero point 0, scale absmax / (2**(bits-1) - 1);
    MatMulNBits stores the unsigned code q + 2**(bits-1). Asymmetric: unsigned over
    [min, max] widened to contain 0.
    """
    w = np.asarray(w)
    if w.ndim == 0 or not -w.ndim <= axis < w.ndim or int(group_size) < 1:
        raise ValueError(f"group_params: axis {axis} / group_size {group_size} do not fit "
                         f"a tensor of shape {w.shape}")
    axis %= w.ndim
    a, size, b = _split3(w.shape, axis)
    groups = -(-size // group_size)
    lo = np.zeros((a, groups, b), dtype=w.dtype)  # (a, G, b)
    hi = np.zeros((a, groups, b), dtype=w.dtype)  # (a, G, b)
    for _, gsl, part in _group_parts(w.reshape(a, size, b), group_size):  # (a, G', g', b)
        lo[:, gsl] = part.min(axis=2)
        hi[:, gsl] = part.max(axis=2)
    scale, zp = scale_zero_point(lo, hi, bits=bits, signed=symmetric, symmetric=symmetric,
                                 compute_dtype=np.float32)
    shape = (*w.shape[:axis], groups, *w.shape[axis + 1:])
    return TensorQuantParams(
        bits=bits, signed=symmetric, symmetric=symmetric, granularity=Granularity.GROUP,
        scale=scale.reshape(shape), zero_point=zp.reshape(shape), axis=axis,
        group_size=int(group_size),
    )


def _split3(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """(a, size, b): ``shape`` seen as (before axis, axis, after axis)."""
    a = int(np.prod(shape[:axis], dtype=np.int64))
    return a, shape[axis], int(np.prod(shape[axis + 1:], dtype=np.int64))


def _group_layout(params: TensorQuantParams, shape: tuple[int, ...]
                  ) -> tuple[int, int, int, int, int]:
    """(a, size, b, groups, group_size) of a group-granularity tensor seen as (a, size, b);
    checks that scale and zero point are (a, groups, b) in the tensor's layout."""
    axis, ndim = params.axis, len(shape)
    if ndim == 0 or axis is None or not -ndim <= axis < ndim or params.group_size is None:
        raise ValueError(f"group granularity: axis {axis} does not fit a tensor of shape {shape}")
    axis %= ndim
    g = int(params.group_size)
    groups = -(-shape[axis] // g)
    expected = (*shape[:axis], groups, *shape[axis + 1:])
    for name, v in (("scale", params.scale), ("zero_point", params.zero_point)):
        if np.shape(v) != expected:
            raise ValueError(f"group {name} has shape {np.shape(v)}; a tensor of shape {shape} "
                             f"(axis {axis}, group_size {g}) needs {expected}")
    return (*_split3(shape, axis), groups, g)


def _group_parts(x3: np.ndarray, g: int) -> Any:
    """Cut (a, size, b) into its whole groups, (a, G, g, b), and the shorter last group,
    (a, 1, r, b); yields (slice of size, slice of groups, part). Parts are views."""
    a, size, b = x3.shape
    whole = size // g
    full = whole * g
    if whole:
        yield slice(0, full), slice(0, whole), x3[:, :full].reshape(a, whole, g, b)
    if full < size:
        yield slice(full, size), slice(whole, whole + 1), x3[:, full:].reshape(a, 1, size - full, b)


def _group_arrays(params: TensorQuantParams, a: int, groups: int, b: int,
                  ftype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point as (a, groups, b) arrays of ``ftype``."""
    scale = np.asarray(params.scale).astype(np.float32).astype(ftype).reshape(a, groups, b)
    return scale, np.asarray(params.zero_point).astype(ftype).reshape(a, groups, b)


def _quantize_groups(x: np.ndarray, params: TensorQuantParams, out: np.ndarray,
                     ftype: Any) -> np.ndarray:
    a, size, b, groups, g = _group_layout(params, x.shape)
    x3, o3 = x.reshape(a, size, b), out.reshape(a, size, b)  # o3: a view of the fresh out
    scale, zp = _group_arrays(params, a, groups, b, ftype)  # (a, G, b)
    step = max(1, (1 << 20) // max(1, size * b))
    for start in range(0, a, step):
        rows = slice(start, start + step)
        for cols, gsl, part in _group_parts(x3[rows], g):  # part (r, G', g', b)
            s, z = scale[rows, gsl, None], zp[rows, gsl, None]  # (r, G', 1, b)
            q = _quantize_block(part, s, z, params, ftype)
            o3[rows, cols] = q.reshape(part.shape[0], cols.stop - cols.start, b)
    return out


def _dequantize_groups(q: np.ndarray, params: TensorQuantParams) -> np.ndarray:
    a, size, b, groups, g = _group_layout(params, q.shape)
    wide = params.bits > 16
    scale, zp = _group_arrays(params, a, groups, b, np.float32)  # (a, G, b)
    zp64 = np.asarray(params.zero_point).astype(np.int64).reshape(a, groups, b) if wide else None
    out = np.empty(q.shape, dtype=np.float32)
    o3 = out.reshape(a, size, b)
    for cols, gsl, part in _group_parts(q.reshape(a, size, b), g):  # part (a, G', g', b)
        s = scale[:, gsl, None]  # (a, G', 1, b)
        if zp64 is not None:
            y = (part.astype(np.int64) - zp64[:, gsl, None]).astype(np.float32) * s
        else:
            y = part.astype(np.float32)  # exact: |q - zp| < 2**17
            y -= zp[:, gsl, None]
            y *= s
        o3[:, cols] = y.reshape(a, cols.stop - cols.start, b)
    return out


def _sqnr_groups(w: np.ndarray, params: TensorQuantParams) -> float:
    a, size, b, groups, g = _group_layout(params, w.shape)
    w3 = w.reshape(a, size, b)
    scale, zp = _group_arrays(params, a, groups, b, np.float32)  # (a, G, b)
    signal = noise = 0.0
    step = max(1, (1 << 20) // max(1, size * b))
    for start in range(0, a, step):
        rows = slice(start, start + step)
        for _, gsl, part in _group_parts(w3[rows], g):  # part (r, G', g', b)
            block = part.astype(np.float32)
            s, z = scale[rows, gsl, None], zp[rows, gsl, None]  # (r, G', 1, b)
            q = np.clip(np.rint(block / s) + z, params.qmin, params.qmax)
            err = ((q - z) * s - block).astype(np.float64)
            signal += float(np.sum(block.astype(np.float64) ** 2))
            noise += float(np.sum(err * err))
    return _db(signal, noise)


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
