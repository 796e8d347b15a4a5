"""Affine quantization math (lowbit.quant.affine): round trips, zero, scales, int4, ORT parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from lowbit.quant import affine
from lowbit.quant.scheme import Granularity, TensorQuantParams


def _f32(v: float) -> float:
    return float(np.float32(v))


SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)

# Range ends: float32-representable magnitudes well above the degenerate threshold
# (MIN_SCALE * 255), so the whole range is representable on the grid.
_ends = st.floats(min_value=_f32(1e-6), max_value=_f32(1e6), allow_nan=False, allow_infinity=False, width=32)
_maybe_zero_end = st.one_of(st.just(0.0), _ends)

# (bits, signed, symmetric, narrow_range)
_SCHEMES = [
    (8, True, True, False), (8, True, True, True), (8, True, False, False),
    (8, False, True, False), (8, False, False, False),
    (4, True, True, False), (4, True, True, True), (4, True, False, False),
    (4, False, True, False), (4, False, False, False),
]
_schemes = st.sampled_from(_SCHEMES)


def _params(scale, zp, bits, signed, symmetric, narrow, axis=None) -> TensorQuantParams:
    if axis is None:
        return TensorQuantParams(bits=bits, signed=signed, symmetric=symmetric,
                                 granularity=Granularity.TENSOR, scale=np.asarray(scale).reshape(()),
                                 zero_point=np.asarray(zp).reshape(()), narrow_range=narrow)
    return TensorQuantParams(bits=bits, signed=signed, symmetric=symmetric,
                             granularity=Granularity.CHANNEL, scale=np.asarray(scale),
                             zero_point=np.asarray(zp), axis=axis, narrow_range=narrow)


def _inside(lo, hi, fractions) -> np.ndarray:
    """float32 values inside [min(lo, 0), max(hi, 0)] (broadcast), ends included."""
    a = np.minimum(np.asarray(lo, np.float64), 0.0)
    b = np.maximum(np.asarray(hi, np.float64), 0.0)
    x = (a + (b - a) * fractions).astype(np.float32)
    return np.clip(x, a.astype(np.float32), b.astype(np.float32))


def _assert_within_half_step(x, params, scale_b):
    q = affine.quantize(x, params)
    assert q.min() >= params.qmin and q.max() <= params.qmax
    err = np.abs(affine.dequantize(q, params).astype(np.float64) - x.astype(np.float64))
    # half a step, plus float32 rounding of the scale / the product (relative ~1e-7 * 2**bits)
    bound = scale_b.astype(np.float64) * (0.5 + 1e-4)
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (
        f"x={x.reshape(-1)[worst]!r} err={err.reshape(-1)[worst]!r} "
        f"bound={np.broadcast_to(bound, err.shape).reshape(-1)[worst]!r}")


# ---------------------------------------------------------------- round trips


@SETTINGS
@given(lo=_maybe_zero_end, hi=_maybe_zero_end, scheme=_schemes,
       fractions=hnp.arrays(np.float64, st.integers(1, 64),
                            elements=st.floats(0.0, 1.0, allow_nan=False)))
@example(lo=1.0, hi=1.0, scheme=(8, False, True, False), fractions=np.array([0.0, 1.0]))
@example(lo=3.0, hi=1e-6, scheme=(8, False, False, False), fractions=np.array([0.0, 0.5, 1.0]))
def test_roundtrip_per_tensor_within_half_step(lo, hi, scheme, fractions):
    bits, signed, symmetric, narrow = scheme
    lo = -lo  # lo <= 0 <= hi
    scale, zp = affine.scale_zero_point(lo, hi, bits=bits, signed=signed, symmetric=symmetric,
                                        narrow_range=narrow)
    params = _params(scale, zp, bits, signed, symmetric, narrow)
    x = _inside(lo, hi, fractions)
    _assert_within_half_step(x, params, np.asarray(scale))


@SETTINGS
@given(lo=_ends, hi=_ends, scheme=_schemes,
       fractions=hnp.arrays(np.float64, 32, elements=st.floats(0.0, 1.0, allow_nan=False)))
def test_roundtrip_range_not_containing_zero(lo, hi, scheme, fractions):
    """A positive-only range [a, b] is widened to [0, b]: values in it round trip."""
    bits, signed, symmetric, narrow = scheme
    a, b = min(lo, hi), max(lo, hi)
    scale, zp = affine.scale_zero_point(a, b, bits=bits, signed=signed, symmetric=symmetric,
                                        narrow_range=narrow)
    params = _params(scale, zp, bits, signed, symmetric, narrow)
    x = _inside(a, b, fractions)
    _assert_within_half_step(x, params, np.asarray(scale))


@SETTINGS
@given(data=st.data(), scheme=_schemes, channels=st.integers(1, 6), axis_last=st.booleans())
def test_roundtrip_per_channel_within_half_step(data, scheme, channels, axis_last):
    bits, signed, symmetric, narrow = scheme
    lo = -data.draw(hnp.arrays(np.float64, channels, elements=_maybe_zero_end), label="lo")
    hi = data.draw(hnp.arrays(np.float64, channels, elements=_maybe_zero_end), label="hi")
    k = data.draw(st.integers(1, 8), label="k")
    scale, zp = affine.scale_zero_point(lo, hi, bits=bits, signed=signed, symmetric=symmetric,
                                        narrow_range=narrow)
    assert scale.shape == (channels,) and zp.shape == (channels,)
    fractions = data.draw(hnp.arrays(np.float64, (k, channels),
                                     elements=st.floats(0.0, 1.0, allow_nan=False)), label="f")
    x = _inside(lo[None, :], hi[None, :], fractions)  # (k, C): channel axis 1
    if axis_last:
        params = _params(scale, zp, bits, signed, symmetric, narrow, axis=-1)
        _assert_within_half_step(x, params, scale[None, :])
    else:
        params = _params(scale, zp, bits, signed, symmetric, narrow, axis=0)
        _assert_within_half_step(np.ascontiguousarray(x.T), params, scale[:, None])


def test_per_channel_uses_each_channels_own_scale():
    w = np.array([[1.0, -1.0, 0.5], [100.0, -50.0, 25.0]], np.float32)  # channel axis 0
    p = affine.weight_params_per_channel(w, axis=0)
    np.testing.assert_allclose(np.asarray(p.scale), [1.0 / 127, 100.0 / 127], rtol=1e-6)
    back = affine.dequantize(affine.quantize(w, p), p)
    assert np.all(np.abs(back - w) <= np.asarray(p.scale)[:, None] / 2 * (1 + 1e-4))
    # the small channel would lose everything on the large channel's grid
    assert abs(back[0, 2] - 0.5) < 0.01


# ---------------------------------------------------------------- zero is exact


@SETTINGS
@given(lo=st.floats(_f32(-3e38), 0.0, allow_nan=False, width=32),
       hi=st.floats(0.0, _f32(3e38), allow_nan=False, width=32), scheme=_schemes,
       shape=st.sampled_from([(), (1,), (5,)]))
@example(lo=0.0, hi=0.0, scheme=(8, False, False, False), shape=())
@example(lo=-1e-40, hi=1e-40, scheme=(8, False, False, False), shape=())
@example(lo=-1e30, hi=1e-30, scheme=(8, False, False, False), shape=())
@example(lo=-1e-30, hi=1e30, scheme=(8, True, False, False), shape=())
def test_zero_dequantizes_to_exact_zero(lo, hi, scheme, shape):
    bits, signed, symmetric, narrow = scheme
    scale, zp = affine.scale_zero_point(lo, hi, bits=bits, signed=signed, symmetric=symmetric,
                                        narrow_range=narrow)
    params = _params(scale, zp, bits, signed, symmetric, narrow)
    zeros = np.zeros(shape, np.float32)
    for z in (zeros, -zeros):
        back = affine.dequantize(affine.quantize(z, params), params)
        assert back.dtype == np.float32
        assert np.all(back == 0.0), (scale, zp, back)


# ---------------------------------------------------------------- scales are sane

_DEGENERATE = [
    (0.0, 0.0), (1e-40, 1e-40), (-1e-40, 1e-40), (-1e-40, 0.0), (0.0, 1e-45),
    (1e-30, 1e-30), (-1e-13, 1e-13), (1e30, 1e30), (-1e30, 1e30), (-1e30, -1e30),
    (-3.4e38, 3.4e38), (3.4e38, 3.4e38), (-3.4e38, -3.4e38), (5.0, 5.0), (-5.0, -5.0),
]


@pytest.mark.parametrize("lo,hi", _DEGENERATE)
@pytest.mark.parametrize("scheme", _SCHEMES[:5])
def test_scale_finite_positive_on_degenerate_ranges(lo, hi, scheme):
    bits, signed, symmetric, narrow = scheme
    scale, zp = affine.scale_zero_point(lo, hi, bits=bits, signed=signed, symmetric=symmetric,
                                        narrow_range=narrow)
    assert scale.dtype == np.float32
    assert np.all(np.isfinite(scale)) and np.all(scale > 0), scale
    qmin, qmax = affine.qrange(bits, signed, narrow)
    assert np.all((zp >= qmin) & (zp <= qmax)), zp
    params = _params(scale, zp, bits, signed, symmetric, narrow)
    # the range ends quantize and come back finite (ends within a grid step of FLT_MAX
    # may legitimately round to a grid point beyond float32's range, so not those)
    if max(abs(lo), abs(hi)) <= 1e37:
        ends = np.array([min(lo, 0.0), max(hi, 0.0)], np.float32)
        back = affine.dequantize(affine.quantize(ends, params), params)
        assert np.all(np.isfinite(back))


@SETTINGS
@given(lo=st.floats(_f32(-3.4e38), _f32(3.4e38), allow_nan=False, allow_subnormal=True, width=32),
       hi=st.floats(_f32(-3.4e38), _f32(3.4e38), allow_nan=False, allow_subnormal=True, width=32),
       scheme=_schemes)
def test_scale_finite_positive_for_any_float32_range(lo, hi, scheme):
    bits, signed, symmetric, narrow = scheme
    scale, zp = affine.scale_zero_point(np.array([lo, hi, lo]), np.array([hi, lo, lo]), bits=bits,
                                        signed=signed, symmetric=symmetric, narrow_range=narrow)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0), scale
    assert np.all(scale >= np.float32(affine.MIN_SCALE))
    qmin, qmax = affine.qrange(bits, signed, narrow)
    assert np.all((zp >= qmin) & (zp <= qmax)), zp


def test_scale_rejects_non_finite_ranges():
    for lo, hi in [(float("nan"), 1.0), (-1.0, float("inf")), (float("-inf"), 0.0)]:
        with pytest.raises(ValueError):
            affine.scale_zero_point(lo, hi, bits=8, signed=False, symmetric=False)


def test_scale_zero_point_known_values():
    s, z = affine.scale_zero_point(-1.0, 3.0, bits=8, signed=False, symmetric=False)
    assert s == np.float32(4.0 / 255) and int(z) == 64  # round(255/4 = 63.75)
    s, z = affine.scale_zero_point(-2.0, 1.0, bits=8, signed=True, symmetric=True, narrow_range=True)
    assert s == np.float32(2.0 / 127) and int(z) == 0
    s, z = affine.scale_zero_point(0.5, 2.0, bits=8, signed=False, symmetric=False)  # widened to [0, 2]
    assert s == np.float32(2.0 / 255) and int(z) == 0


# ---------------------------------------------------------------- int4 packing


@SETTINGS
@given(values=st.lists(st.integers(-8, 7), min_size=0, max_size=41))
@example(values=[-8, 7, -1])
def test_int4_signed_roundtrip(values):
    v = np.array(values, dtype=np.int64)
    packed = affine.pack_int4(v)
    assert packed.dtype == np.uint8 and packed.shape == ((len(values) + 1) // 2,)
    out = affine.unpack_int4(packed, len(values), signed=True)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out.astype(np.int64), v)


@SETTINGS
@given(values=st.lists(st.integers(0, 15), min_size=0, max_size=41))
@example(values=[15, 0, 15])
def test_int4_unsigned_roundtrip(values):
    v = np.array(values, dtype=np.int64)
    packed = affine.pack_int4(v)
    assert packed.shape == ((len(values) + 1) // 2,)
    out = affine.unpack_int4(packed, len(values), signed=False)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out.astype(np.int64), v)


def test_int4_layout_low_nibble_first_and_odd_padding():
    np.testing.assert_array_equal(affine.pack_int4(np.array([1, 2, 3])), np.array([0x21, 0x03], np.uint8))
    np.testing.assert_array_equal(affine.pack_int4(np.array([-1, -8])), np.array([0x8F], np.uint8))
    np.testing.assert_array_equal(affine.pack_int4(np.array([[1, 2], [3, 4]])),
                                  np.array([0x21, 0x43], np.uint8))


@pytest.mark.parametrize("bad", [[16], [-9], [0, 1, 100], [-100], [2**40], [-(2**40)], [7, 16, 0]])
def test_pack_int4_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        affine.pack_int4(np.array(bad, dtype=np.int64))


@pytest.mark.parametrize("count", [-1, 5, 100])
def test_unpack_int4_rejects_bad_count(count):
    with pytest.raises(ValueError):
        affine.unpack_int4(np.array([0x21, 0x43], np.uint8), count, signed=True)


# ---------------------------------------------------------------- rounding vs ONNX Runtime


def _ort_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    import onnxruntime as ort

    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
             numpy_helper.from_array(np.asarray(zp), "z")]
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    out_type = helper.np_dtype_to_tensor_dtype(np.asarray(zp).dtype)
    graph = helper.make_graph([node], "q",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", out_type, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _cases():
    rng = np.random.default_rng(1234)
    ties = (np.arange(-20, 20) + 0.5).astype(np.float32)
    yield "ties scale 1 uint8", ties, np.float32(1.0), np.uint8(128), None
    yield "ties scale 0.25 int8", ties * np.float32(0.25), np.float32(0.25), np.int8(0), None
    yield "ties scale 2 int8 zp", ties * np.float32(2.0), np.float32(2.0), np.int8(-3), None
    yield ("saturating uint8", np.array([-1e9, -300, -0.0, 0.0, 254.5, 255.5, 1e9, 3e38], np.float32),
           np.float32(1.0), np.uint8(0), None)
    for k in range(4):
        x = (rng.standard_normal(777) * rng.uniform(0.1, 50)).astype(np.float32)
        scale = np.float32(rng.uniform(1e-3, 1.0))
        x[:40] = ties * scale  # near-ties for a non power-of-two scale
        yield f"random uint8 {k}", x, scale, np.uint8(rng.integers(0, 256)), None
        yield f"random int8 {k}", x, scale, np.int8(rng.integers(-128, 128)), None
    x = rng.standard_normal((5, 6, 7)).astype(np.float32) * 3
    sc = rng.uniform(0.005, 0.1, 6).astype(np.float32)
    yield "per-channel uint8 axis 1", x, sc, rng.integers(0, 256, 6).astype(np.uint8), 1
    sc0 = rng.uniform(0.005, 0.1, 5).astype(np.float32)
    yield "per-channel int8 axis 0", x, sc0, np.zeros(5, np.int8), 0


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_quantize_matches_onnxruntime_bit_for_bit(case):
    _, x, scale, zp, axis = case
    signed = np.asarray(zp).dtype == np.int8
    params = TensorQuantParams(
        bits=8, signed=signed, symmetric=False,
        granularity=Granularity.TENSOR if axis is None else Granularity.CHANNEL,
        scale=np.asarray(scale, np.float32), zero_point=np.asarray(zp).astype(np.int64), axis=axis)
    ours = affine.quantize(x, params)
    theirs = _ort_quantize(x, scale, zp, axis).astype(np.int64)
    mismatch = np.nonzero(ours != theirs)
    assert ours.shape == theirs.shape
    assert mismatch[0].size == 0, (x[mismatch][:5], ours[mismatch][:5], theirs[mismatch][:5])


def test_rounding_is_half_to_even():
    p = _params(np.float32(1.0), np.int64(0), 8, True, True, False)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5], np.float32)
    np.testing.assert_array_equal(affine.quantize(x, p), [0, 2, 2, 0, -2, -2, 126, -128])
