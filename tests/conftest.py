"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Fine-tuning uses torch's default thread count; on a small shared machine a busy
    neighbour makes that 10-40x slower. One thread keeps the tests' time steady; the
    previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's bundled digits, the fixed seeded split (``lowbit.data.digits_split``)."""
    from lowbit.data import digits_split

    return digits_split()
