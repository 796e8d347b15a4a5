"""Agreement between float and compressed outputs; plain numpy."""

from __future__ import annotations

import numpy as np


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; 200 when identical, -200 for a zero signal.

    Sums in float64 over chunks, so a large weight costs little extra memory.
    """
    ref = np.asarray(reference).reshape(-1)
    app = np.asarray(approx).reshape(-1)
    signal = noise = 0.0
    step = 1 << 20
    for start in range(0, ref.size, step):
        r = ref[start : start + step].astype(np.float64)
        e = r - app[start : start + step].astype(np.float64)
        signal += float(np.dot(r, r))
        noise += float(np.dot(e, e))
    if noise == 0.0:
        return 200.0
    if signal == 0.0:
        return -200.0
    return float(min(200.0, 10.0 * np.log10(signal / noise)))


def mean_cosine(reference: np.ndarray, approx: np.ndarray, chunk: int = 1 << 20) -> float:
    """Mean over samples (first axis) of the cosine similarity of flattened outputs, a
    few rows (about ``chunk`` values) at a time so large outputs need little memory."""
    n = len(reference)
    step = max(1, chunk // max(1, int(np.prod(np.shape(reference)[1:]))))
    total = 0.0
    for i in range(0, n, step):
        ref = np.asarray(reference[i : i + step], dtype=np.float64)
        ref = ref.reshape(len(ref), -1)
        app = np.asarray(approx[i : i + step], dtype=np.float64).reshape(len(ref), -1)
        num = np.sum(ref * app, axis=1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(app, axis=1)
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0),
                       np.where(np.all(ref == app, axis=1), 1.0, 0.0))
        total += float(np.sum(cos))
    return float(total / n) if n else float("nan")


def top1_agreement(reference: np.ndarray, approx: np.ndarray) -> float | None:
    """Fraction of samples whose arg-max class agrees; None if outputs are not class scores."""
    if reference.ndim != 2 or reference.shape[1] < 2:
        return None
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(approx, axis=1)))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float | None:
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        return None
    return float(np.mean(np.argmax(scores, axis=1) == labels.reshape(-1)))
