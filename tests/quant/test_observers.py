"""Streaming HistogramObserver and the calibration range rules (lowbit.quant.observers)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import affine, observers
from lowbit.quant.observers import NUM_BINS, CalibrationMethod, HistogramObserver, select_range

METHODS = [CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE, CalibrationMethod.MSE,
           CalibrationMethod.ENTROPY]


def _observe(batches) -> HistogramObserver:
    obs = HistogramObserver()
    for b in batches:
        obs.update(b)
    return obs


def _bin_width(obs: HistogramObserver) -> float:
    return 2.0 * obs.radius / obs.num_bins


def _heavy_tailed(n=100_000, outliers=5, seed=0) -> np.ndarray:
    """Mostly N(0, 1) plus a few outliers at 1000.0 (under 0.01% of the values)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal(n), np.full(outliers, 1000.0)]).astype(np.float32)
    return x[rng.permutation(x.size)]


# ---------------------------------------------------------------- streaming


def test_streaming_exact_min_max_and_count():
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((7, 3, 5)) * rng.uniform(0.1, 20) + rng.uniform(-5, 5))
               .astype(np.float32) for _ in range(60)]
    obs = _observe(batches)
    allv = np.concatenate([b.reshape(-1) for b in batches])
    assert obs.min == float(allv.min()) and obs.max == float(allv.max())
    assert obs.seen == allv.size
    assert int(obs.counts.sum()) == allv.size
    assert obs.nonfinite == 0
    assert obs.batch_shape == (7, 3, 5)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), nbatches=st.integers(1, 12),
       log_scales=st.lists(st.floats(-3, 3), min_size=12, max_size=12))
def test_streaming_histogram_equals_direct_histogram(seed, nbatches, log_scales):
    """Doubling the radius merges bins exactly: the streamed counts equal a histogram of
    all values over the final edges, and no value is lost."""
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal(rng.integers(1, 300)) * 10.0 ** log_scales[i]).astype(np.float32)
               for i in range(nbatches)]
    obs = _observe(batches)
    allv = np.concatenate(batches).astype(np.float64)
    assert int(obs.counts.sum()) == allv.size == obs.seen
    assert obs.min == allv.min() and obs.max == allv.max()
    assert obs.radius >= max(abs(allv.min()), abs(allv.max()))
    assert obs.counts.shape == (NUM_BINS,)
    width = 2.0 * obs.radius / obs.num_bins
    expected = np.bincount(np.clip(np.floor((allv + obs.radius) / width).astype(np.int64), 0,
                                   obs.num_bins - 1), minlength=obs.num_bins)
    # a value lying (within float error) on a bin edge may land on either side of it
    pos = (allv + obs.radius) / width
    on_edge = int(np.sum(np.abs(np.round(pos) - pos) < 1e-6))
    assert int(np.abs(obs.counts - expected).sum()) <= 2 * on_edge


def test_range_doubling_keeps_counts_in_place():
    obs = HistogramObserver()
    small = np.array([-0.9, -0.1, 0.05, 0.3, 0.99], np.float32)
    obs.update(small)
    assert obs.radius == pytest.approx(0.99)
    before = obs.counts.sum()
    obs.update(np.array([1000.0], np.float32))  # many doublings
    assert obs.radius >= 1000.0
    assert int(obs.counts.sum()) == before + 1
    # the small values still sit in the bins that contain them
    edges = obs.edges
    for v in small:
        i = int(np.searchsorted(edges, v, side="right")) - 1
        # 0.99 was the first radius: it sat on the top edge, so it may be one bin lower
        assert obs.counts[i] >= 1 or (v == small.max() and obs.counts[i - 1] >= 1), v
    i = min(int(np.searchsorted(edges, 1000.0, side="right")) - 1, obs.num_bins - 1)
    assert obs.counts[i] == 1
    # every count sits inside [min, max]: nothing was smeared by the merge
    occupied = np.nonzero(obs.counts)[0]
    assert edges[occupied[0]] <= -0.9 and edges[occupied[-1] + 1] >= 1000.0
    assert edges[occupied[0] + 1] > -0.9


def test_memory_is_constant():
    rng = np.random.default_rng(1)
    obs = HistogramObserver()
    sizes = set()
    for k in range(200):
        obs.update(rng.standard_normal(500).astype(np.float32) * (1.05 ** k))
        sizes.add((obs.counts.size, obs.counts.nbytes))
    assert sizes == {(NUM_BINS, NUM_BINS * 8)}
    assert obs.seen == 200 * 500


def test_one_batch_vs_many_batches():
    rng = np.random.default_rng(2)
    data = np.concatenate([rng.standard_normal(20_000), rng.exponential(3.0, 5_000)]).astype(np.float32)
    data = data[rng.permutation(data.size)]
    one = _observe([data])
    many = _observe(np.array_split(data, 97))
    assert select_range(one, CalibrationMethod.MINMAX) == select_range(many, CalibrationMethod.MINMAX)
    assert select_range(one, CalibrationMethod.MINMAX) == (float(data.min()), float(data.max()))
    lo1, hi1 = select_range(one, CalibrationMethod.PERCENTILE, percentile=99.9)
    lo2, hi2 = select_range(many, CalibrationMethod.PERCENTILE, percentile=99.9)
    tol = 2 * max(_bin_width(one), _bin_width(many))
    assert abs(lo1 - lo2) <= tol and abs(hi1 - hi2) <= tol
    # and both bracket the true tails to within a bin or two
    w = 1.5 * _bin_width(many)
    n = data.size
    assert np.sum(data > hi2) <= 0.001 * n + 1 and np.sum(data >= hi2 - w) >= 0.001 * n - 1
    assert np.sum(data < lo2) <= 0.001 * n + 1 and np.sum(data <= lo2 + w) >= 0.001 * n - 1


def test_nan_and_inf_go_to_nonfinite_not_histogram():
    obs = HistogramObserver()
    obs.update(np.array([1.0, np.nan, -2.0, np.inf, -np.inf, np.nan], np.float32))
    obs.update(np.array([np.nan, np.nan], np.float32))  # an all-NaN batch
    obs.update(np.array([0.5], np.float32))
    assert obs.nonfinite == 6
    assert obs.seen == 3 and int(obs.counts.sum()) == 3
    assert obs.min == -2.0 and obs.max == 1.0
    assert np.isfinite(obs.radius)
    for m in METHODS:
        lo, hi = select_range(obs, m)
        assert np.isfinite(lo) and np.isfinite(hi)


def test_empty_and_constant_tensors():
    obs = HistogramObserver()
    obs.update(np.zeros((0, 4), np.float32))
    assert obs.empty()
    for m in METHODS:
        assert select_range(obs, m) == (0.0, 0.0)
    obs.update(np.zeros(100, np.float32))
    for m in METHODS:
        assert select_range(obs, m) == (0.0, 0.0)
    const = _observe([np.full(50, 3.0, np.float32)])
    for m in METHODS:
        lo, hi = select_range(const, m)
        assert lo == 0.0 and 0.0 < hi <= 3.0


# ---------------------------------------------------------------- calibration methods


def _distributions():
    rng = np.random.default_rng(3)
    yield "normal", rng.standard_normal(50_000).astype(np.float32)
    yield "shifted", (rng.standard_normal(50_000) + 4.0).astype(np.float32)
    yield "negative", (-np.abs(rng.standard_normal(50_000)) - 0.5).astype(np.float32)
    yield "relu", np.maximum(rng.standard_normal(50_000), 0).astype(np.float32)
    yield "laplace", rng.laplace(size=50_000).astype(np.float32)
    yield "t3", rng.standard_t(3, 50_000).astype(np.float32)
    yield "heavy", _heavy_tailed()
    yield "tiny", (rng.standard_normal(10_000) * 1e-20).astype(np.float32)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
@pytest.mark.parametrize("dist", list(_distributions()), ids=lambda d: d[0])
def test_range_contains_zero_and_lies_inside_min_max(method, dist):
    _, x = dist
    obs = _observe(np.array_split(x, 10))
    lo, hi = select_range(obs, method)
    assert np.isfinite(lo) and np.isfinite(hi)
    assert lo <= 0.0 <= hi
    assert min(obs.min, 0.0) <= lo and hi <= max(obs.max, 0.0)
    assert hi > lo  # a non-constant tensor never gets an empty range
    params = affine.activation_params(lo, hi)
    assert np.isfinite(params.scale) and params.scale > 0


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
@pytest.mark.parametrize("dist", list(_distributions()), ids=lambda d: d[0])
def test_range_never_clips_the_bulk(method, dist):
    """Whatever the method trades off, it must keep at least 99% of the values inside
    its range: clipping the bulk of a distribution is never the optimum."""
    _, x = dist
    obs = _observe(np.array_split(x, 10))
    lo, hi = select_range(obs, method)
    clipped = float(np.mean((x < lo) | (x > hi)))
    assert clipped <= 0.01, f"{method.value} range ({lo:.4g}, {hi:.4g}) clips {clipped:.1%}"


@pytest.mark.parametrize("method", [CalibrationMethod.PERCENTILE, CalibrationMethod.ENTROPY],
                         ids=lambda m: m.value)
def test_clipping_methods_clip_outliers_far_tighter_than_minmax(method):
    x = _heavy_tailed()
    obs = _observe(np.array_split(x, 10))
    _, mm_hi = select_range(obs, CalibrationMethod.MINMAX)
    assert mm_hi == 1000.0
    lo, hi = select_range(obs, method)
    assert hi <= 0.2 * mm_hi, (lo, hi)


def test_percentile_on_heavy_tail_lands_at_the_normal_tail():
    obs = _observe(np.array_split(_heavy_tailed(), 10))
    lo, hi = select_range(obs, CalibrationMethod.PERCENTILE, percentile=99.99)
    assert 3.0 < hi < 6.0 and -6.0 < lo < -3.0, (lo, hi)


def test_mse_clips_an_isolated_outlier_when_that_lowers_the_error():
    """1e6 N(0,1) values and one value at 1000: keeping the outlier makes the grid step ~4,
    so the bulk's error (~1 per value) far outweighs clipping one value. MSE must clip."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(1_000_000), [1000.0]]).astype(np.float32)
    obs = _observe(np.array_split(x, 20))
    lo, hi = select_range(obs, CalibrationMethod.MSE)
    assert hi <= 0.7 * 1000.0, (lo, hi)


def _sq_error(x: np.ndarray, lo: float, hi: float) -> float:
    p = affine.activation_params(lo, hi)
    back = affine.dequantize(affine.quantize(x, p), p)
    return float(np.sum((back.astype(np.float64) - x) ** 2))


@pytest.mark.parametrize("dist", list(_distributions()), ids=lambda d: d[0])
def test_mse_range_is_no_worse_than_minmax_in_squared_error(dist):
    _, x = dist
    obs = _observe(np.array_split(x, 10))
    mse_err = _sq_error(x, *select_range(obs, CalibrationMethod.MSE))
    mm_err = _sq_error(x, *select_range(obs, CalibrationMethod.MINMAX))
    # histogram (bin-centre) approximation may cost a little
    assert mse_err <= mm_err * 1.05 + 1e-30, (mse_err, mm_err)


def _frozen_mse_of_range(obs: HistogramObserver, lo: float, hi: float, levels: int) -> float:
    """The MSE score before it used affine.scale_zero_point: float64 scale (do not edit)."""
    centers, counts = obs.centers, obs.counts
    scale = (hi - lo) / (levels - 1)
    if scale <= 0:
        return float(np.sum(counts * centers**2))
    zp = np.round(-lo / scale)
    q = np.clip(np.round(centers / scale) + zp, 0, levels - 1)
    return float(np.sum(counts * ((q - zp) * scale - centers) ** 2))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dist", list(_distributions()), ids=lambda d: d[0])
def test_mse_picks_the_same_range_as_the_frozen_float64_score(dist, bits):
    obs = _observe(np.array_split(dist[1], 10))
    candidates = observers._candidates(obs)
    errors = [_frozen_mse_of_range(obs, a, b, 2**bits) for a, b in candidates]
    assert select_range(obs, CalibrationMethod.MSE, bits=bits) == candidates[int(np.argmin(errors))]


def test_mse_scores_the_params_that_activation_params_emits():
    obs = _observe([np.random.default_rng(6).laplace(size=20_000).astype(np.float32)])
    for lo, hi in [(-2.5, 3.1), (0.0, 1.7), (-0.3, 0.0)]:
        p = affine.activation_params(lo, hi)
        c = obs.centers
        deq = (np.clip(np.round(c / float(p.scale)) + int(p.zero_point), 0, 255)
               - int(p.zero_point)) * float(p.scale)
        expected = float(np.sum(obs.counts * (deq - c) ** 2))
        assert observers._mse_of_range(obs, lo, hi, 8) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", [CalibrationMethod.ENTROPY, CalibrationMethod.MSE,
                                    CalibrationMethod.PERCENTILE, CalibrationMethod.MINMAX],
                         ids=lambda m: m.value)
def test_non_negative_distribution_gives_lo_zero(method):
    rng = np.random.default_rng(5)
    relu = np.maximum(rng.standard_normal((64, 32)) * 2.0, 0.0).astype(np.float32)
    obs = _observe([relu[i : i + 8] for i in range(0, 64, 8)])
    lo, hi = select_range(obs, method)
    assert lo == 0.0
    assert 0.0 < hi <= float(relu.max())


def test_unknown_method_rejected():
    obs = _observe([np.array([-1.0, 2.0], np.float32)])
    with pytest.raises(ValueError):
        select_range(obs, CalibrationMethod.AUTO)


def test_num_bins_must_be_multiple_of_four():
    with pytest.raises(ValueError):
        HistogramObserver(num_bins=4094)
