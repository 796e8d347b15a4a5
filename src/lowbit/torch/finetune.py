"""Fine-tune an ONNX model's weights in PyTorch under compression constraints.

- masks: pruned weights stay exactly zero (re-applied after every step);
- a sparsity schedule: masks are recomputed by magnitude at the scheduled steps
  and only ever grow; after the schedule ends they are fixed;
- clusters: a clustered weight is ``codebook[indices]``; the codebook is the
  trainable parameter, so each shared value moves by the summed gradient of
  all the weights in its cluster, and assignments never change.

Returns the new weight values by initializer name; the graph is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.clustering.kmeans import Clustering
from lowbit.data import Dataset
from lowbit.errors import DataError
from lowbit.onnx.store import FloatModel
from lowbit.pruning.magnitude import global_masks, layer_mask
from lowbit.torch.from_onnx import OnnxModule


@dataclass
class FinetuneSpec:
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    schedule: Callable[[int], float | None] | None = None  # step -> target sparsity
    schedule_layers: list[str] = field(default_factory=list)
    schedule_scope: str = "layer"  # "global": one magnitude threshold over all layers
    clusters: dict[str, Clustering] = field(default_factory=dict)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def finetune(fm: FloatModel, train: Dataset, spec: FinetuneSpec,
             progress: Callable[[int, int, float], None] | None = None) -> dict[str, np.ndarray]:
    import torch

    if train.labels is None:
        raise DataError(f"{train.source}: fine-tuning needs labels ('y')")
    torch.manual_seed(spec.seed)
    codebooks: dict[str, Any] = {}
    overrides: dict[str, Callable[[], Any]] = {}
    for name, cl in spec.clusters.items():
        codebook = torch.nn.Parameter(torch.from_numpy(cl.codebook.astype(np.float32).copy()))
        # index k points at a constant zero appended in _gather: pruned stays exactly 0
        idx = np.where(cl.indices >= 0, cl.indices, cl.codebook.size).astype(np.int64)
        idx_t = torch.from_numpy(idx)
        codebooks[name] = (codebook, idx_t)
        overrides[name] = (lambda c=codebook, i=idx_t: _gather(c, i))
    module = OnnxModule.build(fm, weight_override=overrides)
    params = list(module.parameters()) + [c for c, _ in codebooks.values()]
    opt = torch.optim.Adam(params, lr=spec.lr)
    masks = {k: torch.from_numpy(np.asarray(v, dtype=bool)) for k, v in spec.masks.items()}
    input_names = list(train.inputs)
    xs = [torch.from_numpy(np.ascontiguousarray(train.inputs[n])) for n in input_names]
    y = torch.from_numpy(np.ascontiguousarray(train.labels))
    classify = y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    rng = np.random.default_rng(spec.seed)
    n = train.num_samples
    step = 0
    _apply_masks(module, masks)
    module.train()
    for epoch in range(spec.epochs):
        order = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for start in range(0, n, spec.batch_size):
            if spec.schedule is not None:
                target = spec.schedule(step)
                if target is not None:
                    _grow_masks(module, masks, spec.schedule_layers, target,
                                global_scope=spec.schedule_scope == "global")
            idx = order[start : start + spec.batch_size]
            opt.zero_grad()
            out = module(*[x[idx] for x in xs])[0]
            target_y = y[idx].long() if classify else y[idx].float()
            loss = loss_fn(out, target_y)
            loss.backward()
            opt.step()
            _apply_masks(module, masks)
            total += loss.item() * len(idx)
            step += 1
        if progress is not None:
            progress(epoch + 1, spec.epochs, total / n)
    module.eval()
    values = module.parameter_values()
    for name, (codebook, idx) in codebooks.items():
        values[name] = _gather(codebook, idx).detach().numpy().copy()
    for name, mask in masks.items():
        if name in values:
            values[name] = np.where(mask.numpy(), values[name], np.float32(0)).astype(np.float32)
    return values


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


def _grow_masks(module: Any, masks: dict[str, Any], layers: list[str], sparsity: float,
                *, global_scope: bool = False) -> None:
    import torch

    if global_scope:
        current = {n: getattr(module, module.keys[n]).detach().numpy() for n in layers
                   if n in module.keys}
        keep = {n: masks[n].numpy() for n in current if n in masks}
        for n, m in global_masks(current, sparsity, keep).items():
            masks[n] = torch.from_numpy(m)
        _apply_masks(module, masks)
        return
    for name in layers:
        key = module.keys.get(name)
        if key is None:
            continue
        w = getattr(module, key).detach().numpy()
        old = masks[name].numpy() if name in masks else None
        masks[name] = torch.from_numpy(layer_mask(w, sparsity, keep=old))
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
