"""Pruning stages: unstructured magnitude (gradual while fine-tuning, or N:M) and
structured channel removal that physically shrinks the layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weights import WeightedNode, weighted_nodes
from lowbit.backends.torch.finetune import MaskUpdate, finetune, steps_per_epoch, with_weights
from lowbit.config import ChannelImportance, PruneConfig, PruneScope, StructuredPruneConfig
from lowbit.errors import ValidationError
from lowbit.pruning.magnitude import global_masks, layer_mask
from lowbit.pruning.nm import nm_mask
from lowbit.pruning.schedules import polynomial_decay_schedule
from lowbit.stages.base import RunContext, register


def selected_layers(fm: FloatModel, layers: tuple[str, ...]) -> list[WeightedNode]:
    """The weighted layers named by ``layers`` (node names; all if empty), each weight once."""
    found, refused = weighted_nodes(fm)
    if layers:
        known = {w.name for w in found}
        unknown = [n for n in layers if n not in known]
        if unknown:
            why = "; ".join(f"{n}: {refused[n]}" for n in unknown if n in refused)
            raise ValidationError(f"option layers: no prunable layer named {unknown}"
                                  + (f" ({why})" if why else "")
                                  + f"; layers are {[w.name for w in found]}")
        found = [w for w in found if w.name in layers]
    seen: set[str] = set()
    out = []
    for w in found:
        if w.weight not in seen:
            seen.add(w.weight)
            out.append(w)
    return out


def _masked(weights: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.where(masks[n], w, np.float32(0)).astype(np.float32) for n, w in weights.items()}


def _nm(item: WeightedNode, w: np.ndarray, nm: tuple[int, int]) -> np.ndarray:
    """N:M groups run along the reduction axis (a Conv's input channels x kernel)."""
    if item.op_type == "Conv":  # (out, in, kh, kw)
        return nm_mask(w.reshape(w.shape[0], -1), *nm, axis=1).reshape(w.shape)
    return nm_mask(w, *nm, axis=item.in_axis)


def gradual_masks(schedule: Callable[[int], float | None], scope: PruneScope) -> MaskUpdate:
    """The trainer hook of gradual pruning: at the steps ``schedule`` names, masks grow
    (never shrink) to its target sparsity, per layer or with one global threshold."""
    def update(step: int, weights: dict[str, np.ndarray], masks: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray] | None:
        target = schedule(step)
        if target is None:
            return None
        if scope is PruneScope.GLOBAL:
            return global_masks(weights, target, {n: m for n, m in masks.items() if n in weights})
        return {n: layer_mask(w, target, keep=masks.get(n)) for n, w in weights.items()}
    return update


def _schedule(config: PruneConfig, total_steps: int) -> MaskUpdate:
    """Masks that grow along a polynomial schedule over the first 70% of the steps."""
    end = max(1, int(0.7 * total_steps))
    return gradual_masks(polynomial_decay_schedule(0.0, config.sparsity, 0, end,
                                                   frequency=max(1, end // 20)), config.scope)


@register(PruneConfig)
def prune_stage(config: PruneConfig, ctx: RunContext) -> dict[str, Any]:
    fm = ctx.fm
    items = selected_layers(fm, config.layers)
    weights = {w.weight: np.asarray(fm.constant(w.weight)) for w in items}
    masks: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}  # this stage's; earlier stages' skips do not carry over
    for item in items:
        w = weights[item.weight]
        if round(w.size * (1 - config.sparsity)) < 1 and config.nm is None:
            skipped[item.weight] = f"too small to prune to {config.sparsity:.0%} ({w.size} weights)"
        elif config.nm is not None:
            try:
                masks[item.weight] = _nm(item, w, config.nm)
            except ValidationError as exc:
                skipped[item.weight] = str(exc)
    ctx.skipped.update(skipped)
    kept = ctx.zero_masks(fm)  # zeros of earlier prune stages stay zero
    if config.nm is None:
        weights = {n: w for n, w in weights.items() if n not in skipped}
        masks = global_masks(weights, config.sparsity, kept) if config.scope is PruneScope.GLOBAL \
            else {n: layer_mask(w, config.sparsity, keep=kept.get(n)) for n, w in weights.items()}
    else:
        masks = {n: m & kept[n] if n in kept else m for n, m in masks.items()}
    weights = {n: w for n, w in weights.items() if n in masks}
    tune = ctx.fine_tune_possible(config.epochs)
    spec = ctx.training_spec(config, fm)
    if tune and config.nm is None:  # gradual: masks grow while the weights adapt
        train = ctx.require_train("fine-tuning")
        spec.mask_update = _schedule(config, steps_per_epoch(train.num_samples, config.batch_size)
                                     * config.epochs)
        spec.mask_layers = list(weights)
        values = finetune(fm, train, spec, ctx.epoch_progress("pruning + fine-tuning"))
    elif tune:
        spec.masks = {**kept, **masks}
        values = finetune(with_weights(fm, _masked(weights, masks)),
                          ctx.require_train("fine-tuning"), spec, ctx.epoch_progress("fine-tuning"))
    else:
        values = _masked(weights, masks)
    ctx.sparse |= set(masks)
    ctx.fm = with_weights(fm, values)
    if config.nm is not None:
        ctx.notes.append(f"{config.nm[0]}:{config.nm[1]} semi-structured sparsity: some GPUs "
                         "run it faster; CPUs and ONNX Runtime's CPU kernels do not, so no CPU "
                         "speedup is claimed")
    return {"sparsity": config.sparsity, "structured": False, "epochs":
            config.epochs if tune else 0,
            "unstructured": {"scope": config.scope.value, "nm": list(config.nm) if config.nm else None}}


@register(StructuredPruneConfig)
def structured_prune_stage(config: StructuredPruneConfig, ctx: RunContext) -> dict[str, Any]:
    from lowbit.backends.onnx.fold import fold_batchnorm
    from lowbit.backends.onnx.structured import (
        apply_channel_pruning,
        conv_channel_block,
        plan_channel_pruning,
    )

    block = config.channel_multiple or conv_channel_block()
    plan = plan_channel_pruning(ctx.fm, ratio=config.sparsity, importance=config.importance,
                                min_channels=config.min_channels,
                                layers=set(config.layers) if config.layers else None,
                                channel_block=block)
    ctx.skipped.update(plan.skipped)
    result = apply_channel_pruning(ctx.fm, plan)
    if config.importance is ChannelImportance.BN:
        fold_batchnorm(result)  # BN was kept for its gammas; the rest of the run wants it folded
    tune = ctx.fine_tune_possible(config.epochs)
    if tune:
        spec = ctx.training_spec(config, result)
        values = finetune(result, ctx.require_train("fine-tuning"), spec,
                          ctx.epoch_progress("fine-tuning"))
        result = with_weights(result, values)
    ctx.fm = result
    return {"sparsity": config.sparsity, "structured": True,
            "importance": config.importance.value, "epochs": config.epochs if tune else 0,
            "conv_channel_multiple": block,
            "channels_kept": {n: int(len(k)) for n, k in plan.keep.items()}}
