"""Weight-sharing stage: per-layer k-means, centroids fine-tuned when data allows."""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.backends.torch.finetune import finetune, with_weights
from lowbit.clustering.kmeans import Clustering, kmeans_1d
from lowbit.config import ClusterConfig
from lowbit.stages.base import RunContext, register
from lowbit.stages.prune import selected_layers


@register(ClusterConfig)
def cluster_stage(config: ClusterConfig, ctx: RunContext) -> dict[str, Any]:
    fm = ctx.fm
    items = selected_layers(fm, config.layers)
    targets = [w.weight for w in items]
    biases = config.biases and not config.layers  # named layers: only their weights
    if biases:
        targets += [w.bias for w in items if w.bias and w.bias not in targets]
    clusters: dict[str, Clustering] = {}
    for name in targets:
        w = np.asarray(fm.constant(name))
        if np.count_nonzero(w) == 0:
            ctx.skipped[name] = "all weights are zero"
            continue
        clusters[name] = kmeans_1d(w, config.bits, init=config.init.value, seed=config.seed)
    tune = ctx.fine_tune_possible(config.epochs)
    if tune:
        # earlier cluster stages' shared values stay shared while these train
        spec = ctx.training_spec(config, fm, shared={**ctx.clusters, **{
            n: (c.codebook, c.indices) for n, c in clusters.items()}})
        values = finetune(fm, ctx.require_train("fine-tuning"), spec,
                          ctx.epoch_progress("fine-tuning centroids"))
    else:
        values = {n: c.weights() for n, c in clusters.items()}
    ctx.fm = with_weights(fm, values)
    for name, c in clusters.items():  # later training stages keep the shared values
        ctx.clusters[name] = (c.codebook, c.indices)
    for name, (book, indices) in list(ctx.clusters.items()):  # (and earlier ones trained)
        if name in values:
            ctx.clusters[name] = (trained_codebook(book, indices, values[name]), indices)
    return {"bits": config.bits, "init": config.init.value, "biases": biases,
            "epochs": config.epochs if tune else 0}


def trained_codebook(codebook: np.ndarray, indices: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The shared values of ``weight`` (clustered as ``indices`` into ``codebook``, then
    trained), in the order of the codebook."""
    book = np.array(codebook, np.float32, copy=True)
    flat, idx = np.asarray(weight).reshape(-1), np.asarray(indices).reshape(-1)
    used = idx >= 0
    book[idx[used]] = flat[used]  # (every member of a cluster holds the same value)
    return book
