"""Fine-tune an ONNX model's weights in PyTorch under compression constraints.

The trainer knows no compression algorithm; stages hand it constraints as data
and hooks:
- ``masks``: pruned weights stay exactly zero (re-applied after every step);
- ``mask_update(step, weights, masks)``: called before each step; new masks it
  returns replace the old ones (a sparsity schedule lives in the pruning stage);
- ``shared``: a weight-shared tensor is ``codebook[indices]`` (index -1: a pruned
  zero); the codebook is the trainable parameter, so each shared value moves by
  the summed gradient of its cluster and assignments never change.

Returns the new weight values by initializer name; the graph is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.torch.from_onnx import build_torch_module
from lowbit.data import Dataset
from lowbit.errors import DataError

MaskUpdate = Callable[[int, dict[str, np.ndarray], dict[str, np.ndarray]],
                      dict[str, np.ndarray] | None]


@dataclass
class FinetuneSpec:
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool, True = keep
    mask_update: MaskUpdate | None = None
    mask_layers: list[str] = field(default_factory=list)  # weights mask_update sees
    shared: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (codebook, indices)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def finetune(fm: FloatModel, train: Dataset, spec: FinetuneSpec,
             progress: Callable[[int, int, float], None] | None = None) -> dict[str, np.ndarray]:
    import torch

    if train.labels is None:
        raise DataError(f"{train.source}: fine-tuning needs labels ('y')")
    torch.manual_seed(spec.seed)
    codebooks: dict[str, tuple[Any, Any]] = {}
    overrides: dict[str, Callable[[], Any]] = {}
    for name, (codebook, indices) in spec.shared.items():
        book = torch.nn.Parameter(torch.from_numpy(np.asarray(codebook, np.float32).copy()))
        # index k points at a constant zero appended in _gather: pruned stays exactly 0
        idx = torch.from_numpy(np.where(indices >= 0, indices, codebook.size).astype(np.int64))
        codebooks[name] = (book, idx)
        overrides[name] = (lambda c=book, i=idx: _gather(c, i))
    module = build_torch_module(fm, weight_override=overrides)
    params = list(module.parameters()) + [c for c, _ in codebooks.values()]
    opt = torch.optim.Adam(params, lr=spec.lr, foreach=True)
    masks = {k: torch.from_numpy(np.asarray(v, dtype=bool)) for k, v in spec.masks.items()}
    xs = [torch.from_numpy(np.ascontiguousarray(v)) for v in train.inputs.values()]
    y = torch.from_numpy(np.ascontiguousarray(train.labels))
    classify = y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    first = torch.arange(min(train.num_samples, train.fixed_batch or 1))
    _check_targets(module, *_runs(train, xs, y, first)[0], y, train.whole, classify,
                   train.source)
    rng = np.random.default_rng(spec.seed)
    n, step = train.num_samples, 0
    _apply_masks(module, masks)
    module.train()
    for epoch in range(spec.epochs):
        order = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for start in range(0, n, spec.batch_size):
            if spec.mask_update is not None:
                _update_masks(module, masks, spec.mask_update, spec.mask_layers, step)
            idx = order[start : start + spec.batch_size]
            opt.zero_grad(set_to_none=True)
            runs = _runs(train, xs, y, idx)
            for inputs, target in runs:  # gradients summed; the loss is their mean
                out = module(*inputs)[0]
                target = _target(out, target, train.whole)
                loss = loss_fn(out, target.long() if classify else target.float())
                (loss if len(runs) == 1 else loss / len(runs)).backward()
                total += loss.item() * len(idx) / len(runs)
            opt.step()
            _apply_masks(module, masks)
            step += 1
        if progress is not None:
            progress(epoch + 1, spec.epochs, total / n)
    module.eval()
    values = module.parameter_values()
    for name, (book, idx) in codebooks.items():
        values[name] = _gather(book, idx).detach().numpy().copy()
    for name, mask in masks.items():
        if name in values:
            values[name] = np.where(mask.numpy(), values[name], np.float32(0)).astype(np.float32)
    return values


def _runs(train: Dataset, xs: list[Any], y: Any, idx: Any) -> list[tuple[list[Any], Any]]:
    """(inputs, labels) of each model run of one step over samples ``idx``, at the shape
    the model declares (``lowbit.layouts``): all rows at once; runs of exactly the fixed
    batch (the last filled up from the step's first samples); or one run per whole
    sample, with its ``label_rows`` labels."""
    import torch

    if train.whole:
        r = train.label_rows
        return [([x[i] for x in xs], y[i * r : (i + 1) * r]) for i in idx.tolist()]
    b = train.fixed_batch
    if not b:
        return [([x[idx] for x in xs], y[idx])]
    full = idx[torch.arange(len(idx) + (-len(idx)) % b) % len(idx)]
    return [([x[c] for x in xs], y[c]) for c in full.split(b)]


def _target(out: Any, labels: Any, whole: bool) -> Any:
    """A whole sample's labels as its output needs them: one row per output row, or the
    sample's one label where the output has no rows (fewer than two axes)."""
    return labels[0] if whole and out.ndim < 2 else labels


def _check_targets(module: Any, inputs: list[Any], target: Any, y: Any, whole: bool,
                   classify: bool, source: str) -> None:
    """Labels the loss can use, checked on the first run (``target``: its labels; ``y``
    all labels) before any training step."""
    import torch

    with torch.no_grad():
        out = module(*inputs)[0]
    target = _target(out, target, whole)
    if classify:
        if out.ndim != target.ndim + 1 or int(y.min()) < 0 or int(y.max()) >= out.shape[-1]:
            raise DataError(f"{source}: labels 'y' run from {int(y.min())} to {int(y.max())} "
                            f"but the model's output {list(out.shape)} has no such classes")
    elif tuple(target.shape[1:]) != tuple(out.shape[1:]) or target.ndim != out.ndim:
        raise DataError(f"{source}: labels 'y' have per-sample shape {list(target.shape[1:])} "
                        f"but the model's output has {list(out.shape[1:])}")


def _gather(codebook: Any, idx: Any) -> Any:
    import torch

    return torch.cat([codebook, codebook.new_zeros(1)])[idx]


def _apply_masks(module: Any, masks: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, mask in masks.items():
            key = module.keys.get(name)
            if key is not None:
                getattr(module, key).mul_(mask)


def _update_masks(module: Any, masks: dict[str, Any], update: MaskUpdate, layers: list[str],
                  step: int) -> None:
    import torch

    current = {n: getattr(module, module.keys[n]).detach().numpy() for n in layers
               if n in module.keys}
    new = update(step, current, {n: m.numpy() for n, m in masks.items()})
    if new is None:
        return
    for n, m in new.items():
        masks[n] = torch.from_numpy(np.asarray(m, dtype=bool))
    _apply_masks(module, masks)


def with_weights(fm: FloatModel, values: dict[str, np.ndarray]) -> FloatModel:
    """A copy of ``fm`` whose initializers ``values`` are replaced (same graph)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(fm.proto)
    weights = dict(fm.weights)
    for t in proto.graph.initializer:
        if t.name not in values:
            continue
        arr = np.ascontiguousarray(values[t.name], dtype=np.float32)
        if t.name in weights:
            weights[t.name] = arr
        else:
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return FloatModel(proto, weights)
