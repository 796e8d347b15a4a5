"""Streaming range observers and the calibration methods built on them.

An ``HistogramObserver`` sees activations batch by batch and keeps only the
exact min/max and a fixed-size histogram over a symmetric range [-R, R]. When
a batch exceeds R, R doubles and neighbouring bins merge (exact, no
re-binning error), so memory per tensor is constant however many samples pass.

Range selection (``select_range``) reads the histogram:
- minmax: the exact observed [min, max];
- percentile: the p-th and (100-p)-th percentiles;
- mse: the clipping range that minimises the expected squared quantization
  error over the histogram;
- entropy: the clipping range that minimises the KL divergence between the
  histogram and its quantized version (the TensorRT calibration idea,
  generalised here to asymmetric ranges).
"""

from __future__ import annotations

import enum

import numpy as np

from lowbit.quant import affine


class CalibrationMethod(str, enum.Enum):
    """How an activation's range is chosen from its histogram (auto: the best of all)."""

    AUTO = "auto"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"


NUM_BINS = 4096  # over [-R, R]; even, so the centre bin boundary is 0
_CANDIDATE_FRACTIONS = np.linspace(0.05, 1.0, 96)
_CHUNK = 1 << 16  # values binned at a time (512 KB of float64 positions)
MAX_BINNED = 1 << 20  # values of one batch binned at most (a larger batch: a strided sample)


class HistogramObserver:
    """Exact min/max plus a mergeable histogram of one tensor's values."""

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        if num_bins % 4:
            raise ValueError("num_bins must be a multiple of 4")
        self.num_bins = num_bins
        self.min = np.inf
        self.max = -np.inf
        self.radius = 0.0
        self.counts = np.zeros(num_bins, dtype=np.float64)  # (whole numbers unless sampled)
        self.nonfinite = 0
        self.seen = 0
        self.zeros: float = 0  # exact zeros (e.g. after ReLU); 0.0 is always exact when quantized
        self.batch_shape: tuple[int, ...] | None = None  # shape of the first batch seen
        # select_range's answers, by (method, bits, percentile); cleared by update
        self._ranges: dict[tuple[str, int, float], tuple[float, float]] = {}

    def update(self, values: np.ndarray) -> None:
        arr = np.asarray(values, dtype=np.float32)
        if self.batch_shape is None:
            self.batch_shape = tuple(arr.shape)
        x = arr.reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # (a NaN makes min/max NaN)
            finite = np.isfinite(x)
            self.nonfinite += int((~finite).sum())
            x = x[finite]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self._ranges.clear()
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.seen += x.size
        absmax = max(abs(lo), abs(hi))
        if self.radius == 0.0:
            self.radius = absmax if absmax > 0 else 1.0
        while absmax > self.radius:
            self._double()
        width = 2.0 * self.radius / self.num_bins
        # A batch of more than MAX_BINNED values is binned on an evenly strided sample of
        # them, each sampled value counting for the values it stands for (min, max and the
        # number seen stay exact; zeros are counted like the bins): a DBNet-style
        # detector's activations at 736x1216 are 10-60M values a sample, and binning them
        # all took longer than running the model.
        step = -(-x.size // MAX_BINNED)
        sample = x[::step] if step > 1 else x
        weight = x.size / sample.size
        zeros = sample.size - np.count_nonzero(sample)
        self.zeros += zeros * weight if step > 1 else int(zeros)
        # In chunks: the float64 bin positions of a chunk stay in cache and the
        # temporaries stay small. The same operations as on the whole array: the same bins.
        for start in range(0, sample.size, _CHUNK):
            pos = sample[start : start + _CHUNK].astype(np.float64)
            pos += self.radius
            pos /= width
            np.floor(pos, out=pos)
            np.clip(pos, 0, self.num_bins - 1, out=pos)
            hist = np.bincount(pos.astype(np.intp), minlength=self.num_bins)
            self.counts += hist * weight if step > 1 else hist

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)  # num_bins/2 bins over [-2R, 2R]/2
        quarter = self.num_bins // 4
        fresh = np.zeros_like(self.counts)
        fresh[quarter : quarter + merged.size] = merged
        self.counts = fresh
        self.radius *= 2.0

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.num_bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2.0

    def empty(self) -> bool:
        return self.seen == 0


def _quantile(obs: HistogramObserver, q: float) -> float:
    cdf = np.cumsum(obs.counts) / max(1, obs.counts.sum())
    i = int(np.searchsorted(cdf, q, side="left"))
    i = min(max(i, 0), obs.num_bins - 1)
    return float(obs.edges[i + 1] if q > 0.5 else obs.edges[i])


_TAIL_PROBABILITIES = np.logspace(-7, -1.5, 23)


def _candidates(obs: HistogramObserver) -> list[tuple[float, float]]:
    """Clipping ranges to score: [min, max] shrunk proportionally, plus ranges that cut
    the same probability mass from each tail (so an outlier on one side does not force
    clipping the other side by the same fraction)."""
    lo, hi = min(obs.min, 0.0), max(obs.max, 0.0)
    out = [(lo * f, hi * f) for f in _CANDIDATE_FRACTIONS]
    for t in _TAIL_PROBABILITIES:
        a = _quantile(obs, float(t)) if obs.min < 0 else lo
        b = _quantile(obs, 1.0 - float(t)) if obs.max > 0 else hi
        out.append((min(max(a, lo), 0.0), max(min(b, hi), 0.0)))
    return out


def _mse_of_range(obs: HistogramObserver, lo: float, hi: float, bits: int) -> float:
    """Expected squared error over the histogram of the activation params of [lo, hi]
    (the float32 scale and zero point ``activation_params`` would emit)."""
    centers, counts = obs.centers, obs.counts
    if not hi > lo:  # an empty range quantizes everything to 0
        return float(np.sum(counts * centers**2))
    # in units of a power of two near the radius: exact, and ranges of tiny tensors are
    # scored instead of all flattening to MIN_SCALE
    unit = 2.0 ** int(np.frexp(obs.radius)[1])
    s, z = affine.scale_zero_point(lo / unit, hi / unit, bits=bits, signed=False, symmetric=False)
    scale, zp = float(s) * unit, float(z)
    q = np.clip(np.round(centers / scale) + zp, 0, 2**bits - 1)
    deq = (q - zp) * scale
    return float(np.sum(counts * (deq - centers) ** 2))


def _mse_of_ranges(obs: HistogramObserver, ranges: list[tuple[float, float]],
                   bits: int) -> np.ndarray:
    """``_mse_of_range`` of each of ``ranges`` at once (the same arithmetic, by rows)."""
    centers, counts = obs.centers, obs.counts
    lo = np.array([a for a, _ in ranges], np.float64)
    hi = np.array([b for _, b in ranges], np.float64)
    out = np.full(lo.shape, float(np.sum(counts * centers**2)))  # empty ranges: all to 0
    live = hi > lo
    if live.any():
        unit = 2.0 ** int(np.frexp(obs.radius)[1])
        s, z = affine.scale_zero_point(lo[live] / unit, hi[live] / unit, bits=bits,
                                       signed=False, symmetric=False)
        scale = s.astype(np.float64)[:, None] * unit  # (ranges, 1)
        zp = z.astype(np.float64)[:, None]
        q = np.clip(np.round(centers[None, :] / scale) + zp, 0, 2**bits - 1)
        deq = (q - zp) * scale  # (ranges, bins)
        out[live] = np.sum(counts[None, :] * (deq - centers[None, :]) ** 2, axis=1)
    return out


def _kl_of_range(obs: HistogramObserver, lo: float, hi: float, levels: int) -> float:
    """KL(P || Q) as in TensorRT's entropy calibration, for a range [lo, hi].

    P is the histogram inside the range with the clipped outliers added to its
    edge bins; Q is the in-range histogram *without* the outliers, merged into
    ``levels`` quantization bins and spread back evenly over the non-empty
    source bins. Clipping too much puts mass into P's edges that Q lacks;
    clipping too little makes Q coarse: the minimum balances the two.
    """
    centers, counts = obs.centers, obs.counts.astype(np.float64)
    # Exact zeros stay exact under quantization (0 is on the grid): leave them out,
    # or smearing the ReLU spike at 0 over its group would favour narrow ranges.
    counts[obs.num_bins // 2] -= obs.zeros  # bin [0, width) holds the zeros
    inside = (centers >= lo) & (centers <= hi)
    if inside.sum() < 2:
        return float("inf")
    first, last = int(np.argmax(inside)), int(len(inside) - np.argmax(inside[::-1]) - 1)
    in_range = counts[first : last + 1]
    p = in_range.copy()
    p[0] += counts[:first].sum()
    p[-1] += counts[last + 1 :].sum()
    n = p.size
    groups = np.minimum((np.arange(n) * levels) // n, levels - 1)
    nonzero = in_range > 0
    group_mass = np.bincount(groups, weights=in_range, minlength=levels)
    group_nonzero = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, group_mass[groups] / np.maximum(group_nonzero[groups], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return float("inf")
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    # Where P has mass that Q lacks (an outlier-laden edge bin that was empty
    # before), use a small floor instead of an infinite penalty.
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-4))))


def select_range(
    obs: HistogramObserver,
    method: CalibrationMethod,
    *,
    bits: int = 8,
    percentile: float = 99.99,
) -> tuple[float, float]:
    """The (lo, hi) range ``method`` picks for an observed tensor; contains 0.

    The answer is kept on the observer (the methods are tried for every candidate
    plan; mse and entropy score ~120 ranges each)."""
    key = (CalibrationMethod(method).value, int(bits), float(percentile))
    if key not in obs._ranges:
        obs._ranges[key] = _select_range(obs, CalibrationMethod(method), bits, percentile)
    return obs._ranges[key]


def _select_range(obs: HistogramObserver, method: CalibrationMethod, bits: int,
                  percentile: float) -> tuple[float, float]:
    if obs.empty():
        return 0.0, 0.0
    lo, hi = min(obs.min, 0.0), max(obs.max, 0.0)
    levels = 2**bits
    if method is CalibrationMethod.MINMAX or lo == hi:
        return lo, hi
    if method is CalibrationMethod.PERCENTILE:
        tail = 1.0 - percentile / 100.0
        plo = _quantile(obs, tail) if obs.min < 0 else obs.min
        phi = _quantile(obs, 1.0 - tail) if obs.max > 0 else obs.max
        return min(max(plo, lo), 0.0), max(min(phi, hi), 0.0)
    candidates = _candidates(obs)
    if method is CalibrationMethod.MSE:
        errors = list(_mse_of_ranges(obs, candidates, bits))
    elif method is CalibrationMethod.ENTROPY:
        errors = [_kl_of_range(obs, a, b, levels) for a, b in candidates]
    else:
        raise ValueError(f"no range rule for calibration method {method}")
    best = int(np.argmin(errors))
    return candidates[best]
