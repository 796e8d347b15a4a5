"""1-D k-means weight sharing: value counts, zeros, linear init, exactness, bits validation, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.clustering.kmeans import Clustering, check_bits, kmeans_1d
from lowbit.errors import ValidationError

WEIGHTS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
                     elements=st.floats(-50, 50, allow_nan=False, width=32))


def _distinct_nonzero(a: np.ndarray) -> int:
    return int(np.unique(a[a != 0]).size)


@settings(max_examples=80, deadline=None)
@given(WEIGHTS, st.integers(1, 8))
def test_property_at_most_2_to_the_bits_values_and_zeros_stay_zero(w, bits):
    cl = kmeans_1d(w, bits)
    out = cl.weights()
    assert out.shape == w.shape and out.dtype == np.float32
    assert cl.indices.shape == w.shape
    assert _distinct_nonzero(out) <= 2**bits
    assert cl.codebook.size <= 2**bits
    assert np.all(out[w == 0] == 0)  # pruned zeros stay zero
    np.testing.assert_array_equal(cl.indices == -1, w == 0)  # zeros are no cluster's member
    live = cl.indices[cl.indices >= 0]
    if live.size:
        assert live.max() < cl.codebook.size
        assert np.unique(live).size == cl.codebook.size  # no empty cluster in the codebook
    assert np.all(np.diff(cl.codebook) > 0) or cl.codebook.size <= 1  # sorted, distinct


@settings(max_examples=60, deadline=None)
@given(WEIGHTS, st.integers(1, 6))
def test_property_each_weight_goes_to_its_nearest_centroid(w, bits):
    cl = kmeans_1d(w, bits)
    live = w != 0
    if not live.any():
        return
    vals = w[live].astype(np.float64)
    dist = np.abs(vals[:, None] - cl.codebook.astype(np.float64)[None, :])
    chosen = dist[np.arange(vals.size), cl.indices[live]]
    assert np.all(chosen <= dist.min(axis=1) + 1e-5 * (1 + np.abs(vals)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32).filter(lambda v: v != 0),
                min_size=1, max_size=16, unique=True),
       st.integers(0, 2**31 - 1), st.integers(4, 8))
def test_property_few_distinct_values_are_reproduced_exactly(values, seed, bits):
    rng = np.random.default_rng(seed)
    w = rng.choice(np.asarray(values + [0.0], np.float32), size=(7, 9))
    cl = kmeans_1d(w, bits)
    np.testing.assert_array_equal(cl.weights(), w)


def test_exactly_k_values_reproduced_bit_for_bit():
    vals = np.array([-1.25, -0.1, 0.3, 7.5], np.float32)  # k = 4 for bits=2
    w = np.tile(vals, 50).reshape(10, 20)
    w[0, :5] = 0.0
    cl = kmeans_1d(w, 2)
    np.testing.assert_array_equal(cl.weights(), w)
    np.testing.assert_array_equal(cl.codebook, vals)


def test_linear_init_keeps_a_rare_large_weight():
    # Deep Compression's point: linear init spans [min, max], so the lone outlier keeps its value
    rng = np.random.default_rng(0)
    w = rng.standard_normal(20000).astype(np.float32) * 0.1
    w[123] = 5.0
    lin = kmeans_1d(w, 3, init="linear")
    assert lin.weights()[123] == np.float32(5.0)
    assert lin.codebook.max() == np.float32(5.0)
    dens = kmeans_1d(w, 3, init="density")
    assert dens.weights()[123] < 1.0  # density init puts no centroid near the outlier


def test_golden_small_example():
    w = np.array([0.0, 1.0, 1.2, 5.0, 5.4, -3.0, -3.4, 9.0, 0.0], np.float32)
    cl = kmeans_1d(w, 2)  # 7 distinct nonzero values, 4 clusters; linear init -3.4 .. 9.0
    np.testing.assert_allclose(cl.codebook, [-3.2, 1.1, 5.2, 9.0], rtol=1e-6)
    np.testing.assert_allclose(cl.weights(), [0, 1.1, 1.1, 5.2, 5.2, -3.2, -3.2, 9.0, 0],
                               rtol=1e-6)
    assert cl.indices.tolist() == [-1, 1, 1, 2, 2, 0, 0, 3, -1]


def test_all_zero_weight():
    cl = kmeans_1d(np.zeros((3, 3), np.float32), 4)
    assert (cl.indices == -1).all()
    assert (cl.weights() == 0).all()


def test_weights_of_a_clustering():
    cl = Clustering(np.array([-1.0, 2.0], np.float32), np.array([[0, -1], [1, 1]], np.int16))
    np.testing.assert_array_equal(cl.weights(), [[-1.0, 0.0], [2.0, 2.0]])


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_deterministic(init):
    w = np.random.default_rng(3).standard_normal((64, 100)).astype(np.float32)
    w[w < -1] = 0
    a, b = kmeans_1d(w, 5, init=init, seed=7), kmeans_1d(w, 5, init=init, seed=7)
    np.testing.assert_array_equal(a.codebook, b.codebook)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_more_bits_lower_error():
    w = np.random.default_rng(4).standard_normal(5000).astype(np.float32)
    errors = [float(np.mean((kmeans_1d(w, b).weights() - w) ** 2)) for b in (1, 2, 4, 6)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.005 * errors[0]


@pytest.mark.parametrize("bad", [0, 9, 2.5, True, False, -1, 16])
def test_bits_out_of_range_is_a_validation_error(bad):
    with pytest.raises(ValidationError, match="bits"):
        check_bits(bad)
    with pytest.raises(ValidationError, match="bits"):
        kmeans_1d(np.ones(4, np.float32), bad)


def test_bits_in_range():
    assert [check_bits(b) for b in range(1, 9)] == list(range(1, 9))
    assert check_bits(np.int64(3)) == 3


def test_unknown_init_is_a_validation_error():
    with pytest.raises(ValidationError, match="init"):
        kmeans_1d(np.ones(4, np.float32), 2, init="kmeans++")


def test_two_million_weights_cluster_fast():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((2000, 1000)).astype(np.float32)
    w[np.abs(w) < 0.5] = 0.0
    t0 = time.perf_counter()
    cl = kmeans_1d(w, 5)
    elapsed = time.perf_counter() - t0
    assert _distinct_nonzero(cl.weights()) <= 32
    assert np.all(cl.weights()[w == 0] == 0)
    # a Python loop over 2M weights takes far longer than this; numpy work takes ~1 s
    assert elapsed < 10.0, f"k-means of 2M weights took {elapsed:.1f} s"
