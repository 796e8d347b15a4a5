"""Per-layer 1-D k-means weight sharing (Deep Compression, Han et al. 2016).

k = 2**bits centroids, initialised linearly between the layer's min and max
(the initialisation Deep Compression found best: it keeps the rare large
weights, which matter most). Exact zeros (pruned weights) are not clustered
and stay zero. In 1-D, assignment is a ``searchsorted`` against the midpoints
between sorted centroids, so a 20M-weight layer clusters in seconds with no
Python loop over weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import ValidationError

INITS = ("linear", "density", "random")


@dataclass(frozen=True)
class Clustering:
    """``codebook`` (k,) float32 sorted; ``indices`` same shape as the weight, int16,
    -1 where the weight is an exact (pruned) zero."""

    codebook: np.ndarray
    indices: np.ndarray

    def weights(self) -> np.ndarray:
        out = np.zeros(self.indices.shape, dtype=np.float32)
        live = self.indices >= 0
        out[live] = self.codebook[self.indices[live]]
        return out


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= int(bits) <= 8:
        raise ValidationError(f"option bits: {bits} must be an integer from 1 to 8")
    return int(bits)


def _assign(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    mids = (codebook[1:] + codebook[:-1]) / 2.0
    return np.searchsorted(mids, values, side="left").astype(np.int16)


_SUMMARY_BINS = 1 << 16


def _lloyd(values: np.ndarray, codebook: np.ndarray, iterations: int, tol: float) -> np.ndarray:
    """Lloyd iterations on a fine histogram summary of ``values`` (per-bin count and
    exact sum), so each iteration costs O(bins), not O(weights)."""
    if values.size > 4 * _SUMMARY_BINS:
        lo, hi = float(values.min()), float(values.max())
        idx = np.minimum(((values - lo) / (hi - lo) * _SUMMARY_BINS).astype(np.int64),
                         _SUMMARY_BINS - 1)
        counts = np.bincount(idx, minlength=_SUMMARY_BINS).astype(np.float64)
        sums = np.bincount(idx, weights=values, minlength=_SUMMARY_BINS)
        points = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)[counts > 0]
        weights = counts[counts > 0]
    else:
        points, weights = values, np.ones_like(values)
    for _ in range(iterations):
        assign = _assign(points, codebook)
        s = np.bincount(assign, weights=points * weights, minlength=codebook.size)
        c = np.bincount(assign, weights=weights, minlength=codebook.size)
        new = np.sort(np.where(c > 0, s / np.maximum(c, 1e-300), codebook))
        shift = float(np.max(np.abs(new - codebook)))
        codebook = new
        if shift <= tol:
            break
    return codebook


def kmeans_1d(weight: np.ndarray, bits: int, *, init: str = "linear", iterations: int = 30,
              seed: int = 0, tol: float = 1e-7) -> Clustering:
    """Cluster the nonzero values of ``weight`` into at most 2**bits shared values."""
    bits = check_bits(bits)
    if init not in INITS:
        raise ValidationError(f"option init: {init!r} is not one of {', '.join(INITS)}")
    flat = np.asarray(weight, dtype=np.float32).reshape(-1)
    live = flat != 0
    values = flat[live].astype(np.float64)
    k = 2**bits
    indices = np.full(flat.shape, -1, dtype=np.int16)
    if values.size == 0:
        return Clustering(np.zeros(1, np.float32), indices.reshape(weight.shape))
    lo, hi = float(values.min()), float(values.max())
    unique = np.unique(values)
    if unique.size <= k:  # already few values: each is its own centroid, exactly
        codebook = unique
    elif init == "linear":
        codebook = np.linspace(lo, hi, k)
    elif init == "density":
        codebook = np.quantile(values, (np.arange(k) + 0.5) / k)
    else:
        rng = np.random.default_rng(seed)
        codebook = np.sort(rng.choice(values, size=k, replace=False))
    codebook = np.sort(codebook)
    if unique.size > k:
        codebook = _lloyd(values, codebook, iterations, tol * max(1.0, abs(hi - lo)))
    assign = _assign(values, codebook)
    # one exact update from the real assignment: centroids are the true cluster means
    sums = np.bincount(assign, weights=values, minlength=codebook.size)
    counts = np.bincount(assign, minlength=codebook.size)
    codebook = np.where(counts > 0, sums / np.maximum(counts, 1), codebook)
    assign = _assign(values, codebook)
    used = np.unique(assign)  # drop empty clusters so the codebook is tight
    remap = np.full(codebook.size, -1, dtype=np.int16)
    remap[used] = np.arange(used.size, dtype=np.int16)
    codebook = codebook[used].astype(np.float32)
    indices[live] = remap[assign]
    return Clustering(codebook, indices.reshape(weight.shape))
