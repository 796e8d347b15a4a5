"""N:M semi-structured sparsity masks (e.g. 2:4): in every group of M consecutive
weights along the input (reduction) axis, the N largest magnitudes are kept.

Some GPUs run 2:4 sparse matrix products faster; CPUs (and ONNX Runtime's CPU
kernels) do not, so lowbit reports N:M sparsity but never claims a CPU speedup.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import ValidationError


def nm_mask(weight: np.ndarray, n: int = 2, m: int = 4, *, axis: int = -1) -> np.ndarray:
    """Keep the ``n`` largest |w| of every ``m`` consecutive weights along ``axis``."""
    if not (1 <= n < m):
        raise ValidationError(f"option n:m: need 1 <= n < m, got {n}:{m}")
    axis = axis % weight.ndim
    moved = np.moveaxis(np.abs(weight), axis, -1)  # (..., K)
    k = moved.shape[-1]
    if k % m:
        raise ValidationError(
            f"n:m sparsity {n}:{m} does not apply: the input axis has {k} weights, not a "
            f"multiple of {m}")
    groups = moved.reshape(-1, k // m, m)  # (rows, groups, m)
    order = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def is_nm_sparse(weight: np.ndarray, n: int = 2, m: int = 4, *, axis: int = -1) -> bool:
    axis = axis % weight.ndim
    moved = np.moveaxis(weight, axis, -1)
    if moved.shape[-1] % m:
        return False
    nonzero = (moved.reshape(-1, moved.shape[-1] // m, m) != 0).sum(axis=-1)
    return bool(np.all(nonzero <= n))
