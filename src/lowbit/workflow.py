"""Pruning and weight sharing as API verbs: ``prune``, ``cluster``, ``compress``.

Each takes an ONNX file/proto or a torch module, optional training data (for
fine-tuning; without it the step is post-training), and returns a
``CompressedModel`` whose ``save`` writes ONNX or the compressed ``.lbz``
(by suffix) plus ``report.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.api import ProgressFn
from lowbit.clustering.kmeans import Clustering, check_bits, kmeans_1d
from lowbit.data import Dataset, as_dataset
from lowbit.errors import UnsupportedOpError, ValidationError
from lowbit.fileio import write_bytes_atomic, write_json_atomic
from lowbit.onnx.graph import attr
from lowbit.onnx.store import FloatModel
from lowbit.pruning.magnitude import check_sparsity, global_masks, layer_mask
from lowbit.pruning.nm import nm_mask
from lowbit.pruning.schedules import polynomial_decay_schedule
from lowbit.runtime.session import input_specs_of_model
from lowbit.torch.finetune import FinetuneSpec, finetune, steps_per_epoch, with_weights
from lowbit.torch.from_onnx import bias_names, weight_names


class CompressedModel:
    """A pruned and/or clustered model with its report. ``save("x.lbz")`` writes the
    compressed container, ``save("x.onnx")`` a plain (dense) ONNX file."""

    def __init__(self, fm: FloatModel, report: dict[str, Any], *, original: FloatModel,
                 eval_data: Dataset | None) -> None:
        self.fm = fm
        self.report = report
        self._original = original
        self._eval = eval_data

    @property
    def model(self) -> onnx.ModelProto:
        return self.fm.joined()

    def save(self, path: str | os.PathLike[str], *, report: bool = True) -> Path:
        from lowbit.container import encode

        out = Path(path)
        proto = self.model
        data = encode(proto) if out.suffix == ".lbz" else proto.SerializeToString()
        write_bytes_atomic(out, data)
        self.report["output"] = {"path": str(out), "size_bytes": out.stat().st_size,
                                 "format": "lbz" if out.suffix == ".lbz" else "onnx"}
        base = self.report.get("sizes", {}).get("float_onnx_bytes")
        if base:
            self.report["output"]["ratio_vs_float_onnx"] = round(base / out.stat().st_size, 2)
        if report:
            write_json_atomic(out.parent / "report.json", self.report)
        return out


def _prepare(model: Any, data: Any, eval_data: Any, *, fold_bn: bool = True
             ) -> tuple[FloatModel, str, Dataset | None, Dataset | None]:
    from lowbit.api import resolve_model, split_holdout

    fm, name, _ = resolve_model(model, data if data is not None else eval_data, fold_bn=fold_bn)
    specs = input_specs_of_model(fm.proto)
    train = as_dataset(data, specs) if data is not None else None
    evals = as_dataset(eval_data, specs) if eval_data is not None else None
    if evals is None and train is not None and train.num_samples >= 10:
        train, evals, _ = split_holdout(train, 0.2, train.num_samples)
    return fm, name, train, evals


def _fine_tune_possible(fm: FloatModel, train: Dataset | None, epochs: int,
                        notes: list[str]) -> bool:
    if epochs <= 0 or train is None:
        return False
    if train.labels is None:
        notes.append("no labels ('y') in the data: post-training only, no fine-tuning")
        return False
    from lowbit.torch.from_onnx import OnnxModule

    try:
        OnnxModule.build(fm)
    except UnsupportedOpError as exc:
        notes.append(f"post-training only: {exc}")
        return False
    return True


def _layers(fm: FloatModel, layers: list[str] | None) -> list[str]:
    names = weight_names(fm)
    if layers:
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValidationError(f"option layers: no prunable weight named {unknown}; "
                                  f"weights are {names}")
        names = [n for n in names if n in layers]
    return names


def prune(model: Any, data: Any = None, *, sparsity: float, structured: bool = False,
          scope: str = "layer", nm: tuple[int, int] | None = None, importance: str = "l1",
          epochs: int = 0, lr: float = 1e-3, batch_size: int = 32, eval_data: Any = None,
          layers: list[str] | None = None, seed: int = 0, threads: int = 1,
          progress: ProgressFn | None = None) -> CompressedModel:
    """Magnitude pruning (unstructured, N:M or structured channel removal).

    >>> cm = prune("lenet.onnx", "train.npz", sparsity=0.9, epochs=5)   # doctest: +SKIP
    >>> cm.save("lenet.pruned.lbz")                                      # doctest: +SKIP
    """
    sparsity = check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValidationError(f"option scope: {scope!r} must be 'layer' or 'global'")
    if nm is not None and not (1 <= nm[0] < nm[1]):
        raise ValidationError(f"option nm (n:m): need 1 <= n < m, got {nm[0]}:{nm[1]}")
    t0 = time.perf_counter()
    fm, name, train, evals = _prepare(model, data, eval_data, fold_bn=importance != "bn")
    notes: list[str] = []
    tune = _fine_tune_possible(fm, train, epochs, notes)
    skipped: dict[str, str] = {}
    if structured:
        from lowbit.pruning.structured import apply_channel_pruning, plan_channel_pruning

        plan = plan_channel_pruning(fm, ratio=sparsity, importance=importance,
                                    layers=set(layers) if layers else None)
        skipped.update(plan.skipped)
        result = apply_channel_pruning(fm, plan)
        if tune and train is not None:
            values = finetune(result, train, FinetuneSpec(epochs=epochs, lr=lr, seed=seed,
                                                          batch_size=batch_size),
                              _epoch_progress(progress, "fine-tuning"))
            result = with_weights(result, values)
        kind: dict[str, Any] = {"channels_kept": {n: int(len(k)) for n, k in plan.keep.items()}}
    else:
        names = _layers(fm, layers)
        weights = {n: np.asarray(fm.constant(n)) for n in names}
        for n in list(names):
            if round(weights[n].size * (1 - sparsity)) < 1:
                skipped[n] = f"too small to prune to {sparsity:.0%} ({weights[n].size} weights)"
                names.remove(n)
                weights.pop(n)
        if nm is not None:
            masks = {}
            for n in list(names):
                try:
                    masks[n] = _nm_mask(fm, n, weights[n], nm)
                except ValidationError as exc:
                    skipped[n] = str(exc)
                    names.remove(n)
                    weights.pop(n)
        elif scope == "global":
            masks = global_masks(weights, sparsity)
        else:
            masks = {n: layer_mask(w, sparsity) for n, w in weights.items()}
        if tune and train is not None and nm is None:
            total = steps_per_epoch(train.num_samples, batch_size) * epochs
            end = max(1, int(0.7 * total))
            schedule = polynomial_decay_schedule(0.0, sparsity, 0, end,
                                                 frequency=max(1, end // 20))
            spec = FinetuneSpec(epochs=epochs, lr=lr, seed=seed, batch_size=batch_size,
                                schedule=schedule, schedule_layers=names, schedule_scope=scope)
            values = finetune(fm, train, spec, _epoch_progress(progress, "pruning + fine-tuning"))
        elif tune and train is not None:
            spec = FinetuneSpec(epochs=epochs, lr=lr, seed=seed, batch_size=batch_size, masks=masks)
            values = finetune(with_weights(fm, _masked(weights, masks)), train, spec,
                              _epoch_progress(progress, "fine-tuning"))
        else:
            values = _masked(weights, masks)
        result = with_weights(fm, values)
        kind = {"unstructured": {"scope": scope, "nm": list(nm) if nm else None}}
    if nm is not None:
        sparsity = 1.0 - nm[0] / nm[1]  # what N:M means; the option value is not used
    report = _report("lowbit prune", name, fm, result, evals, notes, skipped, threads,
                     {"sparsity": sparsity, "structured": structured, "importance": importance,
                      "epochs": epochs if tune else 0, **kind}, t0)
    if nm is not None:
        report["notes"].append(f"{nm[0]}:{nm[1]} semi-structured sparsity: some GPUs run it "
                               "faster; CPUs and ONNX Runtime's CPU kernels do not, so no CPU "
                               "speedup is claimed")
    return CompressedModel(result, report, original=fm, eval_data=evals)


def _nm_mask(fm: FloatModel, name: str, w: np.ndarray, nm: tuple[int, int]) -> np.ndarray:
    node = next(n for n in fm.proto.graph.node if len(n.input) > 1 and n.input[1] == name)
    if node.op_type == "Conv":  # (out, in, kh, kw): groups run along the input channels
        return nm_mask(w.reshape(w.shape[0], -1), *nm, axis=1).reshape(w.shape)
    trans_b = bool(attr(node, "transB", 0))
    return nm_mask(w, *nm, axis=1 if (node.op_type == "Gemm" and trans_b) else 0)


def _masked(weights: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.where(masks[n], w, np.float32(0)).astype(np.float32) for n, w in weights.items()}


def cluster(model: Any, data: Any = None, *, bits: int, epochs: int = 0, lr: float = 1e-4,
            batch_size: int = 32, init: str = "linear", eval_data: Any = None,
            layers: list[str] | None = None, biases: bool = True, seed: int = 0,
            threads: int = 1, progress: ProgressFn | None = None) -> CompressedModel:
    """k-means weight sharing: at most 2**bits shared values per layer; zeros stay zero.
    With ``biases`` (default) each layer's bias vector is clustered too (own codebook).

    >>> cm = cluster("lenet.pruned.onnx", "train.npz", bits=5, epochs=2)   # doctest: +SKIP
    """
    bits = check_bits(bits)
    t0 = time.perf_counter()
    fm, name, train, evals = _prepare(model, data, eval_data)
    notes: list[str] = []
    tune = _fine_tune_possible(fm, train, epochs, notes)
    clusters: dict[str, Clustering] = {}
    skipped: dict[str, str] = {}
    targets = _layers(fm, layers) + ([b for b in bias_names(fm)] if biases and not layers else [])
    for n in targets:
        w = np.asarray(fm.constant(n))
        if np.count_nonzero(w) == 0:
            skipped[n] = "all weights are zero"
            continue
        clusters[n] = kmeans_1d(w, bits, init=init, seed=seed)
    if tune and train is not None:
        values = finetune(fm, train, FinetuneSpec(epochs=epochs, lr=lr, seed=seed,
                                                  batch_size=batch_size, clusters=clusters),
                          _epoch_progress(progress, "fine-tuning centroids"))
    else:
        values = {n: c.weights() for n, c in clusters.items()}
    result = with_weights(fm, values)
    report = _report("lowbit cluster", name, fm, result, evals, notes, skipped, threads,
                     {"bits": bits, "init": init, "biases": biases, "epochs": epochs if tune else 0},
                     t0)
    return CompressedModel(result, report, original=fm, eval_data=evals)


def compress(model: Any, data: Any = None, *, sparsity: float = 0.9, bits: int = 5,
             epochs: int = 0, cluster_epochs: int | None = None, lr: float = 1e-3,
             eval_data: Any = None, scope: str = "global", seed: int = 0, threads: int = 1,
             progress: ProgressFn | None = None) -> CompressedModel:
    """Deep-Compression pipeline: prune (gradually, if data), cluster (centroids fine-tuned,
    if data); save as ``.lbz`` for the small file."""
    t0 = time.perf_counter()
    check_sparsity(sparsity)
    check_bits(bits)  # fail before any fine-tuning, not after the pruning stage
    pruned = prune(model, data, sparsity=sparsity, scope=scope, epochs=epochs, lr=lr,
                   eval_data=eval_data, seed=seed, threads=threads, progress=progress)
    clustered = cluster(pruned.model, data, bits=bits, eval_data=eval_data, seed=seed,
                        epochs=epochs if cluster_epochs is None else cluster_epochs,
                        lr=lr / 10, threads=threads, progress=progress)
    original = pruned._original
    report = _report("lowbit compress", pruned.report["input"]["model"], original, clustered.fm,
                     pruned._eval, pruned.report["notes"] + clustered.report["notes"],
                     {**pruned.report["skipped"], **clustered.report["skipped"]}, threads,
                     {"prune": pruned.report["settings"], "cluster": clustered.report["settings"]},
                     t0)
    return CompressedModel(clustered.fm, report, original=original, eval_data=pruned._eval)


def _epoch_progress(progress: ProgressFn | None, stage: str) -> Callable[[int, int, float], None] | None:
    if progress is None:
        return None
    return lambda done, total, loss: progress(f"{stage} (loss {loss:.3f})", done, total)


def _report(tool: str, name: str, before: FloatModel, after: FloatModel, evals: Dataset | None,
            notes: list[str], skipped: dict[str, str], threads: int, settings: dict[str, Any],
            t0: float) -> dict[str, Any]:
    from lowbit.report.compression import compression_report

    body = compression_report(before, after, evals, threads=threads)
    return {"tool": tool, "input": {"model": name}, "settings": settings, **body,
            "skipped": skipped, "notes": notes,
            "seconds": {"total": round(time.perf_counter() - t0, 3)}}
