"""Unstructured magnitude pruning masks on numpy arrays.

A mask is a bool array (True = keep) of the weight's shape. Per-layer scope
removes the smallest-magnitude fraction of each layer; global scope uses one
threshold over all layers together (layers with smaller weights lose more).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lowbit.errors import ValidationError


def check_sparsity(sparsity: float, option: str = "sparsity") -> float:
    value = float(sparsity)
    if not 0.0 <= value < 1.0 or not np.isfinite(value):
        raise ValidationError(f"option {option}: {sparsity} must be in [0, 1)")
    return value


def layer_mask(weight: np.ndarray, sparsity: float, *, keep: np.ndarray | None = None) -> np.ndarray:
    """Mask that zeroes the ``sparsity`` fraction of smallest |w| (ties broken by position).

    ``keep``: an existing mask; weights already pruned stay pruned (masks only shrink).
    """
    sparsity = check_sparsity(sparsity)
    flat = np.abs(weight).reshape(-1)
    n_prune = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, dtype=bool)
    if keep is not None:
        mask &= keep.reshape(-1)
        n_prune = max(n_prune, int(flat.size - mask.sum()))
    if n_prune > 0:
        score = np.where(mask, flat, -1.0)  # already pruned sort first
        mask = _keep_largest(score, flat.size - n_prune)
    return mask.reshape(weight.shape)


def _keep_largest(score: np.ndarray, n_keep: int) -> np.ndarray:
    """Bool mask keeping the ``n_keep`` largest scores; ties go to the lower positions.
    O(n) selection (``np.partition``), not a full sort."""
    n = score.size
    keep = np.zeros(n, dtype=bool)
    if n_keep <= 0:
        return keep
    if n_keep >= n:
        keep[:] = True
        return keep
    kth = np.partition(score, n - n_keep)[n - n_keep]  # smallest kept value
    keep = score > kth
    ties = np.flatnonzero(score == kth)
    keep[ties[: n_keep - int(keep.sum())]] = True
    return keep


def global_masks(weights: Mapping[str, np.ndarray], sparsity: float,
                 keep: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One magnitude threshold over all ``weights`` so that ``sparsity`` of them go."""
    sparsity = check_sparsity(sparsity)
    names = list(weights)
    if not names:
        return {}
    scores = []
    for n in names:
        s = np.abs(weights[n]).reshape(-1).astype(np.float64)
        if keep is not None and n in keep:
            s = np.where(keep[n].reshape(-1), s, -1.0)
        scores.append(s)
    allscores = np.concatenate(scores)
    n_prune = int(round(sparsity * allscores.size))
    already = int((allscores < 0).sum())
    n_prune = max(n_prune, already)
    flat_mask = np.ones(allscores.size, dtype=bool)
    if n_prune > 0:
        flat_mask = _keep_largest(allscores, allscores.size - n_prune)
    out, start = {}, 0
    for n in names:
        size = weights[n].size
        out[n] = flat_mask[start : start + size].reshape(weights[n].shape)
        start += size
    return out


def sparsity_of(array: np.ndarray) -> float:
    return float(1.0 - np.count_nonzero(array) / array.size) if array.size else 0.0
