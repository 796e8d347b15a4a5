"""Shared pieces of the benchmarks: data, trained models, side-by-side timing."""

from __future__ import annotations

import numpy as np


def digits_upsampled(side: int = 32, channels: int = 3, seed: int = 0):
    """The bundled digits, upsampled (nearest) to side x side, repeated over channels."""
    from lowbit.data import digits_split

    x_tr, y_tr, x_te, y_te = digits_split(seed)
    factor = side // 8

    def up(x: np.ndarray) -> np.ndarray:
        big = x.repeat(factor, axis=2).repeat(factor, axis=3)  # (N, 1, side, side)
        return np.ascontiguousarray(np.repeat(big, channels, axis=1), dtype=np.float32)

    return up(x_tr), y_tr, up(x_te), y_te


def train(module, x, y, epochs: int, lr: float = 1e-3, batch_size: int = 32, seed: int = 0):
    from lowbit.backends.torch.train import train_classifier

    return train_classifier(module, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


def time_side_by_side(paths_or_models, feed, *, batch: int, threads: int = 1,
                      iterations: int = 200):
    from lowbit.backends.onnx.session import make_session
    from lowbit.runtime.latency import measure_side_by_side

    sessions = [make_session(m, threads=threads) for m in paths_or_models]
    return measure_side_by_side(sessions, [feed] * len(sessions), batch=batch, threads=threads,
                                iterations=iterations, warmup=10)
