"""Score a candidate model against float outputs on a few samples (search and plans)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.backends.onnx.session import make_session, run_batches
from lowbit.data import Dataset
from lowbit.metrics import accuracy, mean_cosine, sqnr_db


def reference_outputs(model: Any, data: Dataset, *, threads: int = 1) -> list[np.ndarray]:
    """The outputs of ``model`` (usually the float one) on ``data``."""
    return run_batches(make_session(model, threads=threads), data, 16)


def output_cosine(model: Any, data: Dataset, reference: list[np.ndarray]) -> float:
    """Mean output cosine of ``model`` against ``reference`` over samples and outputs."""
    outs = run_batches(make_session(model, name="candidate"), data, 16)
    return float(np.mean([mean_cosine(r, o) for r, o in zip(reference, outs)]))


def sqnr_of(model: Any, data: Dataset, reference: list[np.ndarray]) -> float:
    """Mean output SQNR (dB) of ``model`` against ``reference`` over its outputs."""
    outs = run_batches(make_session(model, name="candidate"), data, 16)
    return float(np.mean([sqnr_db(r, o) for r, o in zip(reference, outs)]))


def accuracy_points(model: Any, data: Dataset) -> float | None:
    """Top-1 accuracy of ``model`` on labelled ``data`` in points (0-100), or None."""
    if data.labels is None:
        return None
    out = run_batches(make_session(model, name="candidate"), data, 16)[0]
    acc = accuracy(out, data.labels)
    return None if acc is None else 100.0 * acc
