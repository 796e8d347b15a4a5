"""Fine-tune an ONNX model's weights in PyTorch under compression constraints.

The trainer knows no compression algorithm; stages hand it constraints as data
and hooks:
- ``masks``: pruned weights stay exactly zero (re-applied after every step);
- ``mask_update(step, weights, masks)``: called before each step; new masks it
  returns replace the old ones (a sparsity schedule lives in the pruning stage);
- ``shared``: a weight-shared tensor is ``codebook[indices]`` (index -1: a pruned
  zero); the codebook is the trainable parameter, so each shared value moves by
  the summed gradient of its cluster and assignments never change;
- ``weight_transforms``: a weight is used as ``transform(weight)`` (QAT's fake
  quantization), after its masks and codebook;
- ``tensor_hooks``: torch modules applied to graph tensors by name as they are
  computed (QAT's activation fake quantization; their parameters train too);
- ``teacher`` and ``distill``: the loss mixes the labels' loss with a loss against
  the teacher's outputs on the same inputs (knowledge distillation); with a teacher,
  labels are optional.

Returns the new weight values by initializer name; the graph is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.torch.distill import capture, distill_loss, feature_loss
from lowbit.backends.torch.distributed import shard, sum_over_processes, world, wrap
from lowbit.backends.torch.from_onnx import build_torch_module
from lowbit.config.training import DistillSettings
from lowbit.data import Dataset
from lowbit.errors import DataError

# one run's inputs -> first output (with ``features``: [output, *feature tensors])
Teacher = Callable[[list[np.ndarray]], Any]
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
    weight_transforms: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    tensor_hooks: dict[str, Any] = field(default_factory=dict)  # tensor name -> torch module
    teacher: Teacher | None = None
    distill: DistillSettings | None = None
    bf16: bool = False  # bfloat16 autocast for the forward and backward passes
    features: tuple[str, ...] = ()  # intermediate tensors distilled (the teacher gives them too)
    captured: dict[str, Any] = field(default_factory=dict)  # their values in the latest run


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def finetune(fm: FloatModel, train: Dataset, spec: FinetuneSpec,
             progress: Callable[[int, int, float], None] | None = None) -> dict[str, np.ndarray]:
    import torch

    if train.labels is None and spec.teacher is None:
        raise DataError(f"{train.source}: fine-tuning needs labels ('y')")
    torch.manual_seed(spec.seed)
    module, external, codebooks = _module(fm, spec)
    trainable = _container(module, external, codebooks)
    rank, size = world()
    model = wrap(trainable)  # DistributedDataParallel under torchrun
    opt = torch.optim.Adam(trainable.parameters(), lr=spec.lr, foreach=True)
    masks = {k: torch.from_numpy(np.asarray(v, dtype=bool)) for k, v in spec.masks.items()}
    xs = [torch.from_numpy(np.ascontiguousarray(v)) for v in train.inputs.values()]
    y = None if train.labels is None else torch.from_numpy(np.ascontiguousarray(train.labels))
    classify = y is not None and y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
    settings = spec.distill or DistillSettings()
    first = torch.arange(min(train.num_samples, train.fixed_batch or 1))
    if y is not None:
        _check_targets(module, *_runs(train, xs, y, first)[0], y, train.whole, classify,
                       train.source)
    rng = np.random.default_rng(spec.seed)
    n, step = train.num_samples, 0
    params = _Weights(module, external)
    params.mask(masks)
    model.train()
    for epoch in range(spec.epochs):
        order = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for start in range(0, n, spec.batch_size):
            if spec.mask_update is not None:
                _update_masks(params, masks, spec.mask_update, spec.mask_layers, step)
            idx = shard(order[start : start + spec.batch_size], rank, size)
            opt.zero_grad(set_to_none=True)
            runs = _runs(train, xs, y, idx)
            for inputs, target in runs:  # gradients summed; the loss is their mean
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
                    out = model(*inputs)[0]
                    loss = _loss(out.float(), target, inputs, spec, settings, classify,
                                 train.whole, spec.captured)
                (loss if len(runs) == 1 else loss / len(runs)).backward()
                total += loss.item() * len(idx) / len(runs)
            opt.step()
            params.mask(masks)
            step += 1
        if progress is not None:
            progress(epoch + 1, spec.epochs, sum_over_processes(total) / n)
    module.eval()
    values = module.parameter_values()
    values.update({name: p.detach().numpy().copy() for name, p in external.items()})
    for name, (book, idx) in codebooks.items():
        values[name] = _gather(book, idx).detach().numpy().copy()
    for name, mask in masks.items():
        if name in values:
            values[name] = np.where(mask.numpy(), values[name], np.float32(0)).astype(np.float32)
    return values


def _container(module: Any, external: dict[str, Any], codebooks: dict[str, Any]) -> Any:
    """One module that owns every trained tensor (the bridge's parameters and its hooks',
    the overridden weights, the codebooks), so one optimizer and DDP see them all."""
    import torch

    class Trainable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bridge = module
            self.overridden = torch.nn.ParameterList(list(external.values()))
            self.codebooks = torch.nn.ParameterList([c for c, _ in codebooks.values()])

        def forward(self, *inputs: Any) -> Any:
            return self.bridge(*inputs)

    return Trainable()


def _module(fm: FloatModel, spec: FinetuneSpec) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The bridge module, the parameters of transformed weights that it reads through
    an override (by initializer name), and the codebooks of shared weights."""
    import torch

    codebooks: dict[str, tuple[Any, Any]] = {}
    external: dict[str, Any] = {}
    overrides: dict[str, Callable[[], Any]] = {}
    identity = (lambda w: w)  # noqa: E731
    for name, (codebook, indices) in spec.shared.items():
        book = torch.nn.Parameter(torch.from_numpy(np.asarray(codebook, np.float32).copy()))
        # index k points at a constant zero appended in _gather: pruned stays exactly 0
        idx = torch.from_numpy(np.where(indices >= 0, indices, codebook.size).astype(np.int64))
        codebooks[name] = (book, idx)
        t = spec.weight_transforms.get(name, identity)
        overrides[name] = (lambda c=book, i=idx, t=t: t(_gather(c, i)))
    for name, t in spec.weight_transforms.items():
        value = fm.constant(name)
        if name in overrides or value is None:
            continue
        p = torch.nn.Parameter(torch.from_numpy(np.array(value, np.float32, copy=True)))
        external[name] = p
        overrides[name] = (lambda p=p, t=t: t(p))
    hooks = dict(spec.tensor_hooks)
    for name in spec.features:  # the student's side of feature distillation
        hooks[name] = capture(spec.captured, name, hooks.get(name))
    module = build_torch_module(fm, weight_override=overrides, tensor_hooks=hooks)
    return module, external, codebooks


def _loss(out: Any, target: Any, inputs: list[Any], spec: FinetuneSpec,
          settings: DistillSettings, classify: bool, whole: bool,
          captured: dict[str, Any] | None = None) -> Any:
    """The labels' loss, the teacher's, or their mix (``settings.alpha`` the teacher's)."""
    import torch

    hard = None
    if target is not None:
        target = _target(out, target, whole)
        if classify:  # classes on the last axis: (N, C) or (N, T, C)
            hard = torch.nn.functional.cross_entropy(out.movedim(-1, 1) if out.ndim > 2
                                                     else out, target.long())
        else:
            hard = torch.nn.functional.mse_loss(out, target.float())
    if spec.teacher is None:
        return hard
    with torch.no_grad():
        given = spec.teacher([x.numpy() for x in inputs])
        outputs = given if spec.features else [given]
        teacher = torch.from_numpy(np.asarray(outputs[0], np.float32)).reshape(out.shape)
    soft = distill_loss(out, teacher, settings, classify=classify)
    if spec.features and captured:
        soft = soft + settings.features * feature_loss(
            [captured[n] for n in spec.features],
            [torch.from_numpy(np.asarray(t, np.float32)) for t in outputs[1:]])
    if hard is None:
        return soft
    return (1.0 - settings.alpha) * hard + settings.alpha * soft


def _runs(train: Dataset, xs: list[Any], y: Any, idx: Any) -> list[tuple[list[Any], Any]]:
    """(inputs, labels) of each model run of one step over samples ``idx``, at the shape
    the model declares (``lowbit.layouts``): all rows at once; runs of exactly the fixed
    batch (the last filled up from the step's first samples); or one run per whole
    sample, with its ``label_rows`` labels."""
    import torch

    if train.whole:
        r = train.label_rows
        return [([x[i] for x in xs], None if y is None else y[i * r : (i + 1) * r])
                for i in idx.tolist()]
    b = train.fixed_batch
    if not b:
        return [([x[idx] for x in xs], None if y is None else y[idx])]
    full = idx[torch.arange(len(idx) + (-len(idx)) % b) % len(idx)]
    return [([x[c] for x in xs], None if y is None else y[c]) for c in full.split(b)]


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


class _Weights:
    """The trainable weights by initializer name, wherever they live (the bridge module's
    own parameters, or those read through an override)."""

    def __init__(self, module: Any, external: dict[str, Any]) -> None:
        self.module, self.external = module, external

    def get(self, name: str) -> Any:
        if name in self.external:
            return self.external[name]
        key = self.module.keys.get(name)
        return None if key is None else getattr(self.module, key)

    def mask(self, masks: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for name, mask in masks.items():
                p = self.get(name)
                if p is not None:
                    p.mul_(mask)


def _update_masks(params: _Weights, masks: dict[str, Any], update: MaskUpdate, layers: list[str],
                  step: int) -> None:
    import torch

    current = {n: p.detach().numpy() for n in layers if (p := params.get(n)) is not None}
    new = update(step, current, {n: m.numpy() for n, m in masks.items()})
    if new is None:
        return
    for n, m in new.items():
        masks[n] = torch.from_numpy(np.asarray(m, dtype=bool))
    params.mask(masks)


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
