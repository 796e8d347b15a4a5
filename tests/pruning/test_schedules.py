"""Sparsity schedules: polynomial decay endpoints, monotonicity, update steps; constant; validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ValidationError
from lowbit.pruning.schedules import (
    ConstantSparsity,
    PolynomialDecaySparsity,
    polynomial_decay_schedule,
)


def test_polynomial_decay_golden_values():
    s = polynomial_decay_schedule(0.0, 0.8, 0, 100, power=3.0, frequency=10)
    assert isinstance(s, PolynomialDecaySparsity)
    assert s.sparsity_at(0) == 0.0
    assert s.sparsity_at(100) == 0.8
    # final + (initial - final) * (1 - progress) ** 3 at progress 0.5: 0.8 - 0.8 / 8
    assert math.isclose(s.sparsity_at(50), 0.7, abs_tol=1e-12)
    assert math.isclose(s.sparsity_at(10), 0.8 - 0.8 * 0.9**3, abs_tol=1e-12)


def test_polynomial_decay_holds_outside_the_window():
    s = polynomial_decay_schedule(0.2, 0.9, 10, 50)
    assert s.sparsity_at(0) == 0.2
    assert s.sparsity_at(10) == 0.2
    assert s.sparsity_at(50) == 0.9
    assert s.sparsity_at(1000) == 0.9


def test_polynomial_decay_call_only_at_update_steps():
    s = polynomial_decay_schedule(0.0, 0.5, 5, 27, frequency=10)
    updates = {step: s(step) for step in range(0, 60) if s(step) is not None}
    assert sorted(updates) == [5, 15, 25, 27]  # every 10 steps from begin, plus the end step
    assert updates[5] == 0.0
    assert updates[27] == 0.5
    assert updates[5] <= updates[15] <= updates[25] <= updates[27]


def test_polynomial_decay_frequency_one_updates_every_step():
    s = polynomial_decay_schedule(0.0, 0.5, 0, 4, frequency=1)
    assert [s(i) is not None for i in range(7)] == [True] * 5 + [False] * 2


@settings(max_examples=100, deadline=None)
@given(st.floats(0.0, 0.99), st.floats(0.0, 0.99), st.integers(0, 1000), st.integers(1, 1000),
       st.floats(0.5, 6.0), st.integers(1, 50))
def test_property_polynomial_decay(a, b, begin, length, power, freq):
    initial, final = min(a, b), max(a, b)
    end = begin + length
    s = polynomial_decay_schedule(initial, final, begin, end, power=power, frequency=freq)
    assert s.sparsity_at(begin) == initial
    assert s.sparsity_at(end) == final
    steps = range(max(0, begin - 3), end + 4)
    values = [s.sparsity_at(i) for i in steps]
    assert all(x <= y + 1e-12 for x, y in zip(values, values[1:]))  # non-decreasing
    assert all(initial - 1e-12 <= v <= final + 1e-12 for v in values)
    for i in steps:
        due = begin <= i <= end and ((i - begin) % freq == 0 or i == end)
        assert (s(i) is not None) == due
        if due:
            assert s(i) == s.sparsity_at(i)
    assert s(end) == final


def test_constant_sparsity_fires_once_at_begin():
    c = ConstantSparsity(0.75, begin_step=3)
    assert [c(i) for i in range(6)] == [None, None, None, 0.75, None, None]
    assert ConstantSparsity(0.5)(0) == 0.5


@pytest.mark.parametrize("begin,end", [(10, 10), (10, 5), (0, -1)])
def test_end_not_after_begin_is_a_validation_error(begin, end):
    with pytest.raises(ValidationError, match="end_step"):
        polynomial_decay_schedule(0.0, 0.5, begin, end)


@pytest.mark.parametrize("freq", [0, -3])
def test_bad_frequency_is_a_validation_error(freq):
    with pytest.raises(ValidationError, match="frequency"):
        polynomial_decay_schedule(0.0, 0.5, 0, 10, frequency=freq)


@pytest.mark.parametrize("initial,final,name", [(-0.1, 0.5, "initial_sparsity"),
                                                (0.0, 1.0, "final_sparsity"),
                                                (0.0, 1.2, "final_sparsity")])
def test_bad_sparsity_in_a_schedule_names_the_option(initial, final, name):
    with pytest.raises(ValidationError, match=name):
        polynomial_decay_schedule(initial, final, 0, 10)


@pytest.mark.parametrize("bad", [1.0, -0.5])
def test_constant_sparsity_validates(bad):
    with pytest.raises(ValidationError, match="sparsity"):
        ConstantSparsity(bad)
