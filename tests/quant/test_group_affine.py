"""Granularity group in the affine math (lowbit.quant.affine) and its link to the weight-only
storage (lowbit.quant.groupwise.GroupQuantized): group_params against a frozen copy of the
pre-refactor math, quantize/dequantize on any axis and ragged K, and the exact requantize
round trip a writer relies on for RTN, GPTQ and HQQ codes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lowbit.quant import affine
from lowbit.quant.gptq import gptq
from lowbit.quant.groupwise import GROUP_SIZES, GroupQuantized, code_offset, group_params, rtn
from lowbit.quant.hqq import hqq
from lowbit.quant.scheme import Granularity, TensorQuantParams

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)


def _weights(seed: int, n: int, k: int, magnitude: float, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = {"normal": lambda: rng.standard_normal((n, k)),
         "heavy": lambda: rng.standard_t(2, (n, k)),
         "positive": lambda: rng.uniform(0.1, 1.0, (n, k)),
         "shifted": lambda: rng.standard_normal((n, k)) + 1.5}[kind]()
    return (w * magnitude).astype(np.float32)


# Non-degenerate weights: every group's scale stays far above MIN_SCALE.
_weight_args = dict(seed=st.integers(0, 2**32 - 1), bits=st.integers(2, 8),
                    group=st.sampled_from(GROUP_SIZES), n=st.integers(1, 4), k=st.integers(1, 300),
                    magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 37.5, 1e4]),
                    kind=st.sampled_from(["normal", "heavy", "positive", "shifted"]))


# ---------------------------------------------------------------- frozen pre-refactor math


def _frozen_group_params(blocks: np.ndarray, bits: int, symmetric: bool):
    """groupwise.group_params as it was before affine.group_params (do not edit)."""
    levels = 2**bits - 1
    if symmetric:
        absmax = np.max(np.abs(blocks), axis=-1)
        scale = absmax / (2 ** (bits - 1) - 1)
        zp = np.full(scale.shape, 2 ** (bits - 1), dtype=np.int64)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / levels
        zp = np.clip(np.rint(-lo / np.where(scale > 0, scale, 1.0)), 0, levels).astype(np.int64)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zp


def _frozen_rtn(w_nk: np.ndarray, bits: int, group_size: int, symmetric: bool):
    """groupwise.rtn as it was: (codes (N, Kp), scales, zero points (N, blocks))."""
    n, k = w_nk.shape
    kp = -(-k // group_size) * group_size
    padded = np.zeros((n, kp), dtype=np.float32)
    padded[:, :k] = w_nk
    blocks = padded.reshape(n, -1, group_size)
    scale, zp = _frozen_group_params(blocks, bits, symmetric)
    q = np.clip(np.rint(blocks / scale[..., None]) + zp[..., None], 0, 2**bits - 1)
    return q.astype(np.uint8).reshape(n, -1), scale, zp.astype(np.uint8)


@SETTINGS
@given(symmetric=st.booleans(), **_weight_args)
@example(seed=0, bits=2, group=16, n=1, k=17, magnitude=1.0, kind="normal", symmetric=False)
def test_rtn_and_group_params_match_the_frozen_math_bit_for_bit(seed, bits, group, n, k,
                                                                 magnitude, kind, symmetric):
    w = _weights(seed, n, k, magnitude, kind)
    codes, scales, zps = _frozen_rtn(w, bits, group, symmetric)
    q = rtn(w, bits=bits, group_size=group, symmetric=symmetric)
    assert q.scales.dtype == np.float32 and q.codes.dtype == np.uint8
    assert np.array_equal(q.scales, scales) and np.array_equal(q.zero_points, zps)
    assert np.array_equal(q.codes, codes)
    # the affine record itself, on the unpadded weight (the last group is shorter)
    p = affine.group_params(w, bits=bits, group_size=group, axis=1, symmetric=symmetric)
    assert p.granularity is Granularity.GROUP and p.group_size == group and p.axis == 1
    assert (p.signed, p.symmetric, p.narrow_range) == (symmetric, symmetric, False)
    assert np.array_equal(p.scale, scales)
    assert np.array_equal(p.zero_point + code_offset(p), zps.astype(np.int64))
    # the back-compat blocks API of groupwise
    padded = np.zeros((n, codes.shape[1]), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, -1, group)
    s_new, z_new = group_params(blocks, bits, symmetric)
    s_old, z_old = _frozen_group_params(blocks, bits, symmetric)
    assert np.array_equal(s_new, s_old) and np.array_equal(z_new, z_old)
    assert s_new.dtype == s_old.dtype and z_new.dtype == z_old.dtype


def test_group_params_of_an_all_zero_group_is_scale_one_zero_point_zero():
    w = np.zeros((2, 32), np.float32)
    w[1, 16:] = np.linspace(-1, 1, 16)
    for symmetric in (True, False):
        p = affine.group_params(w, bits=4, group_size=16, axis=1, symmetric=symmetric)
        assert p.scale[0, 0] == 1.0 and p.scale[1, 0] == 1.0 and np.all(p.zero_point[:, 0] == 0)
        assert np.all(affine.dequantize(affine.quantize(w, p), p)[0] == 0.0)


# ---------------------------------------------------------------- quantize / dequantize


def _expand(values: np.ndarray, axis: int, group: int, size: int) -> np.ndarray:
    return np.repeat(values, group, axis=axis).take(np.arange(size), axis=axis)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       data=st.data(), bits=st.sampled_from([2, 4, 8, 12]), symmetric=st.booleans())
def test_group_quantize_matches_elementwise_reference_on_any_axis(seed, shape, data, bits,
                                                                  symmetric):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    size = shape[axis]
    group = data.draw(st.integers(1, size + 2), label="group")
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    p = affine.group_params(w, bits=bits, group_size=group, axis=axis, symmetric=symmetric)
    groups_shape = list(shape)
    groups_shape[axis] = -(-size // group)
    assert p.scale.shape == tuple(groups_shape) == p.zero_point.shape
    s = _expand(p.scale, axis, group, size)
    z = _expand(p.zero_point, axis, group, size).astype(np.float32)
    ref = np.clip(np.rint(w / s) + z, p.qmin, p.qmax)
    q = affine.quantize(w, p)
    assert q.shape == w.shape and q.dtype == np.int32
    assert np.array_equal(q, ref)
    deq = affine.dequantize(q, p)
    assert deq.shape == w.shape and deq.dtype == np.float32
    assert np.array_equal(deq, (ref - z) * s)
    # every element within half a step of its own group's scale
    assert np.all(np.abs(deq.astype(np.float64) - w) <= s * (0.5 + 1e-4))
    sqnr = affine.quantization_sqnr_db(w, p)
    err = (deq - w).astype(np.float64)
    expected = 10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum(err**2)) if err.any() else 200
    assert sqnr == pytest.approx(min(200.0, expected), abs=1e-6)


def test_group_quantize_of_a_large_weight_is_processed_in_blocks_with_the_same_result():
    w = np.random.default_rng(0).standard_normal((5000, 300)).astype(np.float32)  # > 1M values
    p = affine.group_params(w, bits=4, group_size=64, axis=1, symmetric=False)  # K ragged
    s, z = _expand(p.scale, 1, 64, 300), _expand(p.zero_point, 1, 64, 300)
    assert np.array_equal(affine.quantize(w, p, dtype=np.uint8),
                          np.clip(np.rint(w / s) + z, 0, 15).astype(np.uint8))


def test_wide_group_params_quantize_in_float64():
    w = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    p = affine.group_params(w, bits=20, group_size=16, axis=1, symmetric=True)
    q = affine.quantize(w, p)
    assert q.dtype == np.int64
    s = _expand(p.scale, 1, 16, 40).astype(np.float64)
    assert np.array_equal(q, np.rint(w.astype(np.float64) / s))
    assert np.abs(affine.dequantize(q, p) - w).max() <= s.max()


@pytest.mark.parametrize("bad", [
    dict(scale=np.ones((4, 2), np.float32)),  # K=40, group 16 needs 3 groups
    dict(zero_point=np.zeros((4,), np.int64)),
    dict(axis=2),
])
def test_group_params_of_the_wrong_shape_are_rejected(bad):
    base = dict(bits=4, signed=True, symmetric=True, granularity=Granularity.GROUP,
                scale=np.ones((4, 3), np.float32), zero_point=np.zeros((4, 3), np.int64),
                axis=1, group_size=16)
    p = TensorQuantParams(**{**base, **bad})
    w = np.zeros((4, 40), np.float32)
    with pytest.raises(ValueError):
        affine.quantize(w, p)
    with pytest.raises(ValueError):
        affine.dequantize(np.zeros((4, 40), np.int32), p)


def test_group_records_need_axis_and_group_size_and_serialise():
    kw = dict(bits=4, signed=False, symmetric=False, granularity=Granularity.GROUP,
              scale=np.full((2, 3), 0.5, np.float32), zero_point=np.full((2, 3), 7, np.int64))
    for missing in (dict(axis=1), dict(group_size=16), dict(axis=1, group_size=0)):
        with pytest.raises(ValueError, match="group"):
            TensorQuantParams(**kw, **missing)
    p = TensorQuantParams(**kw, axis=1, group_size=16)
    d = p.to_dict()
    assert d["group_size"] == 16 and d["granularity"] == "group"
    back = TensorQuantParams.from_dict(d)
    assert back.group_size == 16 and back.axis == 1 and back.scale.shape == (2, 3)
    assert np.array_equal(back.zero_point, p.zero_point)
    # records written before group_size existed still load
    old = affine.activation_params(-1.0, 2.0).to_dict()
    del old["group_size"]
    assert TensorQuantParams.from_dict(old).group_size is None


# ---------------------------------------------------------------- GroupQuantized <-> params


def _assert_same(a: GroupQuantized, b: GroupQuantized) -> None:
    assert np.array_equal(a.codes, b.codes), f"{int(np.sum(a.codes != b.codes))} codes differ"
    assert np.array_equal(a.scales, b.scales) and np.array_equal(a.zero_points, b.zero_points)
    assert (a.bits, a.group_size, a.k, a.symmetric) == (b.bits, b.group_size, b.k, b.symmetric)
    assert a.codes.dtype == b.codes.dtype == np.uint8 and a.scales.dtype == b.scales.dtype


def _assert_requantizes_exactly(q: GroupQuantized) -> None:
    """A writer holding only (params, dequantized weight) gets the very same storage."""
    p = q.to_params()
    assert p.granularity is Granularity.GROUP and p.axis == 1 and p.group_size == q.group_size
    assert p.scale.shape == (q.codes.shape[0], -(-q.k // q.group_size))
    _assert_same(GroupQuantized.from_params(q.dequantize(), p), q)
    # and in plain affine terms, on the unpadded (N, K) weight
    codes = affine.quantize(q.dequantize(), p) + code_offset(p)
    assert np.array_equal(codes, q.codes[:, : q.k])
    assert np.array_equal(affine.dequantize(codes - code_offset(p), p), q.dequantize())


@SETTINGS
@given(symmetric=st.booleans(), **_weight_args)
def test_rtn_from_params_and_requantize_round_trip(seed, bits, group, n, k, magnitude, kind,
                                                  symmetric):
    w = _weights(seed, n, k, magnitude, kind)
    q = rtn(w, bits=bits, group_size=group, symmetric=symmetric)
    assert q.to_params().symmetric == symmetric and q.to_params().signed == symmetric
    _assert_same(GroupQuantized.from_params(w, q.to_params()), q)  # RTN: from the weight itself
    assert np.array_equal(affine.quantize(w, q.to_params()) + code_offset(q.to_params()),
                          q.codes[:, :k])
    _assert_requantizes_exactly(q)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(**_weight_args)
def test_hqq_requantize_round_trip(seed, bits, group, n, k, magnitude, kind):
    q = hqq(_weights(seed, n, k, magnitude, kind), bits=bits, group_size=group)
    _assert_requantizes_exactly(q)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "group", "k"), [(4, 32, 96), (3, 16, 70), (8, 64, 150),
                                                  (2, 128, 128)])
def test_gptq_requantize_round_trip(bits, group, k, symmetric):
    rng = np.random.default_rng(bits * 1000 + k)
    x = rng.standard_normal((256, k)) @ (np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k))
    w = rng.standard_normal((24, k)).astype(np.float32)
    q = gptq(w, 2.0 * x.T @ x / len(x), bits=bits, group_size=group, symmetric=symmetric)
    assert not np.array_equal(q.codes, rtn(w, bits=bits, group_size=group,
                                           symmetric=symmetric).codes)  # not RTN's codes
    _assert_requantizes_exactly(q)


def test_from_params_rejects_non_group_or_wrong_axis():
    w = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError):
        GroupQuantized.from_params(w, affine.weight_params_per_channel(w, axis=0))
    p = affine.group_params(w.T, bits=4, group_size=16, axis=0, symmetric=True)
    with pytest.raises(ValueError):
        GroupQuantized.from_params(w, p)


# ---------------------------------------------------------------- HQQ on one-sided groups


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_hqq_on_groups_not_spanning_zero_is_no_worse_than_rtn(bits):
    """HQQ starts from asymmetric RTN's params (range widened to contain 0) in every group,
    so a group of one sign is never worse than RTN. (Before, HQQ used the raw [min, max]
    and its real zero point, clipped to the grid at the end, could wreck such groups.)"""
    rng = np.random.default_rng(bits)
    w = np.concatenate([rng.uniform(1.0, 2.0, (16, 64)), -rng.uniform(0.5, 3.0, (16, 64)),
                        rng.standard_normal((16, 64)) + 2.5], axis=0).astype(np.float32)
    h = hqq(w, bits=bits, group_size=32)
    r = rtn(w, bits=bits, group_size=32, symmetric=False)
    assert np.array_equal(h.scales, r.scales)

    def per_group(q):
        return np.abs(q.dequantize() - w).reshape(48, -1, 32).mean(axis=-1)

    assert np.all(per_group(h) <= per_group(r) * (1 + 1e-6))
