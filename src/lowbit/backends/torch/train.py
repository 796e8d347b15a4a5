"""A small, seeded classification training loop (used by the demo and tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def train_classifier(
    module: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Any:
    """Train ``module`` with Adam and cross-entropy; returns it in eval mode.

    Deterministic for a given seed on one machine (fixed init, fixed shuffles).
    """
    import torch

    torch.manual_seed(seed)
    for layer in module.modules():  # re-initialise so the seed alone fixes the weights
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    rng = np.random.default_rng(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    module.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(xt)))
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(module(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if progress is not None:
            progress(epoch + 1, epochs, total / len(xt))
    module.eval()
    return module


def predict(module: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    import torch

    module.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            outs.append(module(torch.from_numpy(np.ascontiguousarray(
                x[start : start + batch_size], dtype=np.float32))).numpy())
    return np.concatenate(outs)
