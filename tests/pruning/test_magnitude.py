"""Unstructured magnitude masks: exact counts, smallest |w| first, ties by position,
masks that only shrink, one global threshold, and option validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.errors import ValidationError
from lowbit.pruning.magnitude import check_sparsity, global_masks, layer_mask, sparsity_of

FLOATS = st.floats(-100, 100, allow_nan=False, width=32)
SPARSITY = st.floats(0.0, 0.999, allow_nan=False)
WEIGHTS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9),
                     elements=FLOATS)


def _reference_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep the n - round(s*n) largest |w|; among equal |w| the lower positions are kept."""
    flat = np.abs(weight).reshape(-1)
    n_keep = flat.size - int(round(sparsity * flat.size))
    order = np.argsort(-flat, kind="stable")  # descending, ties: lower index first
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:n_keep]] = True
    return keep.reshape(weight.shape)


# ---------------------------------------------------------------- golden numbers


def test_layer_mask_golden_small_vector():
    w = np.array([0.5, -0.1, 0.3, -0.9, 0.05, 0.2, -0.4, 0.0], dtype=np.float32)
    mask = layer_mask(w, 0.5)  # 4 of 8 go: 0.0, 0.05, -0.1, 0.2
    assert mask.tolist() == [True, False, True, True, False, False, True, False]


def test_layer_mask_ties_are_broken_by_position():
    w = np.ones(10, dtype=np.float32)
    mask = layer_mask(w, 0.3)
    assert mask.sum() == 7
    assert mask.tolist() == [True] * 7 + [False] * 3  # lower positions are kept
    w2 = np.array([2.0, -1.0, 1.0, 3.0, 1.0, -1.0], dtype=np.float32)
    # |w| = 2 1 1 3 1 1: two of the four 1s go, the later ones
    assert layer_mask(w2, 2 / 6).tolist() == [True, True, True, True, False, False]


def test_layer_mask_rounds_the_count():
    w = np.arange(1, 289, dtype=np.float32).reshape(32, 1, 3, 3)  # (out, in, kh, kw)
    mask = layer_mask(w, 0.9)
    assert mask.shape == w.shape and mask.dtype == bool
    assert int((~mask).sum()) == round(0.9 * 288) == 259
    assert mask.reshape(-1).tolist() == [False] * 259 + [True] * 29


def test_zero_sparsity_keeps_everything():
    w = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    assert layer_mask(w, 0.0).all()


def test_sparsity_of():
    assert sparsity_of(np.array([0.0, 1.0, 0.0, 2.0])) == 0.5
    assert sparsity_of(np.zeros((0,))) == 0.0


# ---------------------------------------------------------------- keep: masks only shrink


def test_keep_prunes_the_already_pruned_first():
    w = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=np.float32)
    keep = np.array([False, True, True, True, True, True])  # the largest is already pruned
    mask = layer_mask(w, 0.5, keep=keep)
    # 3 go: the already-pruned 5.0, then the smallest live ones 0.5 and 1.0
    assert mask.tolist() == [False, True, True, True, False, False]


def test_keep_that_is_sparser_than_asked_stays_as_is():
    w = np.arange(1, 11, dtype=np.float32)
    keep = np.zeros(10, dtype=bool)
    keep[[0, 9]] = True  # 80% already pruned, only 20% asked
    mask = layer_mask(w, 0.2, keep=keep)
    assert mask.tolist() == keep.tolist()


@settings(max_examples=60, deadline=None)
@given(WEIGHTS, SPARSITY, SPARSITY, st.integers(0, 2**31 - 1))
def test_property_masks_only_shrink(w, s1, s2, seed):
    rng = np.random.default_rng(seed)
    keep = rng.random(w.shape) < 0.7
    mask = layer_mask(w, s1, keep=keep)
    assert not np.any(mask & ~keep)  # nothing pruned comes back
    n = w.size
    assert int((~mask).sum()) == max(int(round(s1 * n)), int((~keep).sum()))
    again = layer_mask(w * np.float32(1.5), s2, keep=mask)
    assert not np.any(again & ~mask)


# ---------------------------------------------------------------- properties


@settings(max_examples=100, deadline=None)
@given(WEIGHTS, SPARSITY)
def test_property_layer_mask_removes_exactly_the_smallest(w, s):
    mask = layer_mask(w, s)
    assert mask.shape == w.shape
    assert int((~mask).sum()) == int(round(s * w.size))
    a = np.abs(w)
    if mask.any() and (~mask).any():
        assert a[~mask].max() <= a[mask].min()  # everything removed is no larger than anything kept
    np.testing.assert_array_equal(mask, _reference_mask(w, s))


@settings(max_examples=50, deadline=None)
@given(WEIGHTS, SPARSITY)
def test_property_mask_depends_on_magnitude_only(w, s):
    np.testing.assert_array_equal(layer_mask(w, s), layer_mask(-w, s))


@settings(max_examples=60, deadline=None)
@given(st.lists(WEIGHTS, min_size=1, max_size=4), SPARSITY)
def test_property_global_masks_use_one_threshold(ws, s):
    weights = {f"w{i}": w for i, w in enumerate(ws)}
    masks = global_masks(weights, s)
    assert list(masks) == list(weights)
    total = sum(w.size for w in ws)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == int(round(s * total))
    kept = np.concatenate([np.abs(weights[k])[masks[k]] for k in masks])
    gone = np.concatenate([np.abs(weights[k])[~masks[k]] for k in masks])
    if kept.size and gone.size:
        assert gone.max() <= kept.min()
    for k in masks:
        assert masks[k].shape == weights[k].shape


def test_global_mask_takes_more_from_a_layer_of_tiny_weights():
    rng = np.random.default_rng(0)
    big = (rng.uniform(0.5, 1.0, (64, 64)) * rng.choice([-1, 1], (64, 64))).astype(np.float32)
    tiny = (rng.uniform(-1e-3, 1e-3, (64, 64))).astype(np.float32)
    masks = global_masks({"big": big, "tiny": tiny}, 0.5)
    assert sparsity_of(masks["tiny"].astype(np.float32)) == 1.0  # all tiny weights go
    assert sparsity_of(masks["big"].astype(np.float32)) == 0.0
    per_layer = {k: layer_mask(v, 0.5) for k, v in {"big": big, "tiny": tiny}.items()}
    assert sparsity_of(per_layer["tiny"].astype(np.float32)) == 0.5


def test_global_masks_respect_keep():
    w = {"a": np.array([3.0, 2.0, 1.0], np.float32), "b": np.array([10.0, 20.0], np.float32)}
    keep = {"b": np.array([False, True])}
    masks = global_masks(w, 0.4, keep)  # 2 of 5 go: b[0] (already pruned) and a[2]
    assert masks["a"].tolist() == [True, True, False]
    assert masks["b"].tolist() == [False, True]


def test_global_masks_of_nothing():
    assert global_masks({}, 0.5) == {}


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_sparsity_out_of_range_is_a_validation_error(bad):
    w = np.ones(4, np.float32)
    with pytest.raises(ValidationError, match="sparsity"):
        layer_mask(w, bad)
    with pytest.raises(ValidationError, match="sparsity"):
        global_masks({"w": w}, bad)
    with pytest.raises(ValidationError, match="final_sparsity"):
        check_sparsity(bad, "final_sparsity")


def test_sparsity_bounds_that_are_allowed():
    assert check_sparsity(0) == 0.0
    assert check_sparsity(0.999) == 0.999
