"""N:M semi-structured masks: at most N nonzeros per group of M, the largest kept, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.errors import ValidationError
from lowbit.pruning.nm import is_nm_sparse, nm_mask


def test_nm_mask_golden_2_4():
    w = np.array([[0.1, -0.9, 0.5, 0.2, 4.0, 3.0, -2.0, 1.0]], dtype=np.float32)
    mask = nm_mask(w, 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]
    assert is_nm_sparse(w * mask, 2, 4)
    assert not is_nm_sparse(w, 2, 4)


def test_nm_mask_ties_keep_the_first():
    w = np.ones((1, 4), np.float32)
    assert nm_mask(w, 2, 4).tolist() == [[True, True, False, False]]


def test_nm_mask_along_axis_zero():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3)).astype(np.float32)  # (K, N): groups run down the columns
    mask = nm_mask(w, 2, 4, axis=0)
    assert mask.shape == w.shape
    groups = mask.reshape(2, 4, 3)  # (group, m, column)
    assert (groups.sum(axis=1) == 2).all()
    assert is_nm_sparse(w * mask, 2, 4, axis=0)
    np.testing.assert_array_equal(mask, nm_mask(w.T.copy(), 2, 4, axis=1).T)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]),
       st.integers(0, 2), st.data())
def test_property_nm_groups(rows, groups, nm, axis, data):
    n, m = nm
    shape = [rows, 2, 3]
    shape[axis] = groups * m
    w = data.draw(hnp.arrays(np.float32, tuple(shape),
                             elements=st.floats(-10, 10, allow_nan=False, width=32)))
    mask = nm_mask(w, n, m, axis=axis)
    assert mask.shape == w.shape and mask.dtype == bool
    moved_w = np.moveaxis(np.abs(w), axis, -1).reshape(-1, groups, m)
    moved_m = np.moveaxis(mask, axis, -1).reshape(-1, groups, m)
    assert (moved_m.sum(axis=-1) == n).all()  # exactly n kept per group
    kept = np.where(moved_m, moved_w, np.inf).min(axis=-1)
    dropped = np.where(moved_m, -np.inf, moved_w).max(axis=-1)
    assert (dropped <= kept).all()  # the kept ones are the largest of their group
    assert is_nm_sparse(w * mask, n, m, axis=axis)


def test_is_nm_sparse_counts_nonzeros():
    assert is_nm_sparse(np.array([[0, 1, 0, 2, 3, 0, 0, 0]], np.float32), 2, 4)
    assert not is_nm_sparse(np.array([[1, 1, 1, 0]], np.float32), 2, 4)
    assert not is_nm_sparse(np.zeros((2, 6), np.float32), 2, 4)  # 6 is not a multiple of 4


@pytest.mark.parametrize("k", [3, 6, 9, 10])
def test_axis_not_a_multiple_of_m_is_a_validation_error(k):
    with pytest.raises(ValidationError, match="multiple of 4"):
        nm_mask(np.ones((2, k), np.float32), 2, 4)


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (5, 4), (-1, 2)])
def test_bad_n_m_is_a_validation_error(n, m):
    with pytest.raises(ValidationError, match="n:m"):
        nm_mask(np.ones((2, 8), np.float32), n, m)
