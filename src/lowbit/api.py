"""The public Python API: one verb per technique, each a thin front-end over
``lowbit.pipeline.run``; plus sensitivity, evaluate, bench, inspect and load.

Everything after a verb's first two arguments is keyword-only.
"""

from __future__ import annotations

import json
import os
from typing import Any

import onnx

from lowbit.autosearch import search_compression
from lowbit.config import (
    ClusterConfig,
    DistillConfig,
    Int8Config,
    MixedPrecisionConfig,
    PruneConfig,
    QatConfig,
    StageConfig,
    StructuredPruneConfig,
    WeightOnlyConfig,
    check_run_settings,
)
from lowbit.errors import DataError, ValidationError
from lowbit.fileio import input_file
from lowbit.model_io import read_any
from lowbit.pipeline import CompressedModel, run
from lowbit.stages.base import ProgressFn

PLAN_MAX_BYTES = 64 * 2**20

__all__ = ["quantize", "prune", "cluster", "compress", "sensitivity", "read_mixed_plan",
           "evaluate", "bench", "inspect_model", "load", "run", "CompressedModel",
           "search_compression"]


def _quantize_config(mode: str | None, calibration: str | None, bits: int | None,
                     group_size: int | None, algorithm: str | None, strict: bool | None
                     ) -> StageConfig:
    if str(mode or "auto").lower() == "weight-only":
        if calibration is not None or strict is not None:
            raise ValidationError("options calibration and strict apply to INT8 modes, not "
                                  "weight-only")
        return WeightOnlyConfig(bits=8 if bits is None else bits,
                                group_size=128 if group_size is None else group_size,
                                algorithm=algorithm or "rtn")
    if bits is not None and bits != 8:
        raise ValidationError(f"option bits: {bits} needs mode weight-only (static, dynamic "
                              "and auto modes are INT8)")
    if group_size is not None or algorithm is not None:
        raise ValidationError("options group_size and algorithm need mode weight-only")
    return Int8Config(mode=mode or "auto", calibration=calibration or "auto",
                      strict=bool(strict))


def quantize(model: Any, data: Any, *, mode: str | None = None, calibration: str | None = None,
             bits: int | None = None, group_size: int | None = None, algorithm: str | None = None,
             strict: bool | None = None, config: StageConfig | None = None,
             eval_data: Any = None, threads: int = 1, batch: int | None = None, verify: bool = True,
             progress: ProgressFn | None = None) -> CompressedModel:
    """Quantize an ONNX model or a torch module: INT8 (static QDQ and/or dynamic), 2-8 bit
    weight-only, or a mixed-precision plan. Give either the options or a ``config``
    (``Int8Config``, ``WeightOnlyConfig``, ``MixedPrecisionConfig``) for full control.

    ``data`` calibrates (an .npz path, arrays, ``(x, y)``, a dict by input name, or a
    DataLoader); ``eval_data`` verifies (default: the last 20% of ``data``, held back).
    ``batch``: the batch the result is timed at (default: the model's fixed batch, else
    8; one that disagrees with a fixed batch is refused). Arrays with one more axis than
    the model's input hold whole samples, run one at a time (``lowbit.layouts``).

    >>> qm = quantize("model.onnx", "calib.npz", mode="static")       # doctest: +SKIP
    >>> qm.save("model.int8.onnx")                                     # doctest: +SKIP
    """
    options = (mode, calibration, bits, group_size, algorithm, strict)
    if config is None:
        config = _quantize_config(*options)
    elif any(o is not None for o in options):
        raise ValidationError("give either config or the options mode/calibration/bits/"
                              "group_size/algorithm/strict, not both")
    if not isinstance(config, (Int8Config, WeightOnlyConfig, MixedPrecisionConfig)):
        raise ValidationError(f"config must be a quantization config, not {type(config).__name__}")
    tool = {WeightOnlyConfig: "lowbit quantize (weight-only)",
            MixedPrecisionConfig: "lowbit quantize (mixed precision plan)"}.get(
        type(config), "lowbit quantize")
    return run(model, [config], data=data, eval_data=eval_data, threads=threads, batch=batch,
               verify=verify, progress=progress, tool=tool)


def prune(model: Any, data: Any = None, *, sparsity: float | None = None, structured: bool = False,
          scope: str = "layer", nm: tuple[int, int] | None = None, importance: str = "l1",
          epochs: int = 0, lr: float = 1e-3, batch_size: int = 32, eval_data: Any = None,
          layers: list[str] | tuple[str, ...] = (), seed: int = 0, threads: int = 1,
          progress: ProgressFn | None = None) -> CompressedModel:
    """Magnitude pruning: unstructured (gradual while fine-tuning), N:M, or structured
    channel removal. ``layers``: node names (default every Conv/Gemm/MatMul).

    >>> cm = prune("lenet.onnx", "train.npz", sparsity=0.9, epochs=5)   # doctest: +SKIP
    >>> cm.save("lenet.pruned.lbz")                                      # doctest: +SKIP
    """
    if sparsity is None and nm is None:
        raise ValidationError("option sparsity: give the fraction to remove (or nm, e.g. 2:4)")
    if structured and (nm is not None or scope != "layer"):
        raise ValidationError("options nm and scope apply to unstructured pruning, not structured")
    if not structured and importance != "l1":
        raise ValidationError("option importance applies to structured pruning")
    common = dict(sparsity=sparsity, epochs=epochs, lr=lr, batch_size=batch_size,
                  layers=layers, seed=seed)
    config: StageConfig = StructuredPruneConfig(importance=importance, **common) if structured \
        else PruneConfig(scope=scope, nm=nm, **common)
    return run(model, [config], data=data, eval_data=eval_data, threads=threads,
               progress=progress, tool="lowbit prune")


def cluster(model: Any, data: Any = None, *, bits: int, epochs: int = 0, lr: float = 1e-4,
            batch_size: int = 32, init: str = "linear", eval_data: Any = None,
            layers: list[str] | tuple[str, ...] = (), biases: bool = True, seed: int = 0,
            threads: int = 1, progress: ProgressFn | None = None) -> CompressedModel:
    """k-means weight sharing: at most 2**bits shared values per layer; zeros stay zero.

    >>> cm = cluster("lenet.pruned.onnx", "train.npz", bits=5, epochs=2)   # doctest: +SKIP
    """
    config = ClusterConfig(bits=bits, epochs=epochs, lr=lr, batch_size=batch_size, init=init,
                           layers=layers, biases=biases, seed=seed)
    return run(model, [config], data=data, eval_data=eval_data, threads=threads,
               progress=progress, tool="lowbit cluster")


def compress(model: Any, data: Any = None, *, recipe: Any = None, sparsity: float | None = None,
             bits: int | None = None, epochs: int | None = None, cluster_epochs: int | None = None,
             lr: float | None = None, eval_data: Any = None, scope: str | None = None,
             seed: int | None = None, student: Any = None, checkpoints: Any = None,
             resume: bool = False, threads: int = 1, batch: int | None = None,
             progress: ProgressFn | None = None) -> CompressedModel:
    """Compress with a ``recipe`` (a built-in name such as ``"edge"``, a YAML file, or a
    ``Recipe``: its stages in order over one model), or without one Deep Compression:
    prune ``sparsity`` (gradually, with data), then cluster to ``bits`` (centroids
    fine-tuned at a tenth of ``lr``); save as ``.lbz`` for the small file.

    ``student``: a smaller model to compress instead, taught by ``model`` (distillation
    on in every training stage). ``checkpoints``: a folder where each finished stage is
    saved; ``resume`` continues after the last one there.

    >>> cm = compress("lenet.onnx", "train.npz", sparsity=0.95, bits=5, epochs=30)  # doctest: +SKIP
    >>> cm = compress("cnn.onnx", "train.npz", recipe="edge", eval_data="val.npz")  # doctest: +SKIP
    """
    from lowbit.config.recipe import load_recipe

    options = {"sparsity": sparsity, "bits": bits, "epochs": epochs,
               "cluster_epochs": cluster_epochs, "lr": lr, "scope": scope, "seed": seed}
    distill = None
    if recipe is not None:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise ValidationError(f"option {', '.join(given)}: does not apply with a recipe (the "
                                  "recipe sets its stages' options)")
        loaded = load_recipe(recipe)
        stages, distill = list(loaded.stages), loaded.distill
        if data is None:
            _refuse_without_data(loaded.name, stages)
        tool = f"lowbit compress (recipe {loaded.name})"
    else:
        lr = 1e-3 if lr is None else lr
        epochs = 0 if epochs is None else epochs
        stages = [PruneConfig(sparsity=0.9 if sparsity is None else sparsity,
                              scope=scope or "global", epochs=epochs, lr=lr, seed=seed or 0),
                  ClusterConfig(bits=5 if bits is None else bits,
                                epochs=epochs if cluster_epochs is None else cluster_epochs,
                                lr=lr / 10, seed=seed or 0)]
        tool = "lowbit compress"
    if not isinstance(resume, bool):
        raise ValidationError(f"resume: expected true or false, got {resume!r}")
    target, teacher = (model, None) if student is None else (student, model)
    result = run(target, stages, data=data, eval_data=eval_data, threads=threads, batch=batch,
                 progress=progress, tool=tool, distill=distill, teacher=teacher,
                 checkpoints=checkpoints, resume=resume)
    if recipe is not None:
        result.report["recipe"] = {"name": loaded.name, "description": loaded.description,
                                   "distill": loaded.to_dict()["distill"],
                                   "stages": [c.kind for c in loaded.stages]}
    return result


def _refuse_without_data(recipe: str, stages: list[StageConfig]) -> None:
    """Name the first stage of a recipe that cannot run without data."""
    for i, config in enumerate(stages, 1):
        epochs = getattr(config, "epochs", 0)
        if epochs > 0:
            need = f"fine-tunes for {epochs} epoch(s) and needs data with labels (--data)"
        elif isinstance(config, (Int8Config, MixedPrecisionConfig, QatConfig, DistillConfig)):
            need = "calibrates and verifies on data (--data)"
        else:
            continue
        raise DataError(f"recipe {recipe}: stage {i} ({config.kind}) {need}")


def read_mixed_plan(path: str | os.PathLike[str]) -> MixedPrecisionConfig:
    """The config of a mixed-precision plan file written by ``sensitivity`` (JSON); any
    problem is one error naming the file."""
    from lowbit.stages.mixed import PLAN_FORMAT

    if not isinstance(path, (str, os.PathLike)):
        raise ValidationError(f"plan: expected a file path, got {type(path).__name__}")
    p = input_file(path, "plan")
    if p.stat().st_size > PLAN_MAX_BYTES:
        raise ValidationError(f"plan file {p} is {p.stat().st_size:,} bytes; a plan is small JSON")
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValidationError(f"plan file {p} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), dict):
        raise ValidationError(f"plan file {p}: expected an object with a 'layers' mapping")
    if plan.get("format") != PLAN_FORMAT:
        raise ValidationError(f"plan file {p}: format {plan.get('format')!r} is not "
                              f"{PLAN_FORMAT!r} (write plans with `lowbit sensitivity`)")
    if not plan["layers"]:
        raise ValidationError(f"plan file {p} lists no layers: nothing would be quantized")
    try:
        return MixedPrecisionConfig(layers=plan["layers"], group_size=plan.get("group_size", 128))
    except ValidationError as exc:
        raise ValidationError(f"plan file {p}: {str(exc).replace('option ', '')}") from None


def sensitivity(model: Any, data: Any, *, min_cosine: float | None = None,
                max_bits: float | None = None, group_size: int = 128, threads: int = 1,
                progress: ProgressFn | None = None) -> dict[str, Any]:
    """Per-layer sensitivity (only that layer INT4 / INT8) and a mixed-precision plan for
    a quality (``min_cosine``) or size (``max_bits`` per weight) target.

    >>> plan = sensitivity("gpt.onnx", "calib.npz", min_cosine=0.999)   # doctest: +SKIP
    """
    from lowbit.backends.onnx.checks import check_token_ids
    from lowbit.backends.onnx.session import input_specs_of_model
    from lowbit.data import as_dataset
    from lowbit.model_io import resolve_model
    from lowbit.stages.mixed import plan_for_target

    if (min_cosine is None) == (max_bits is None):
        raise ValidationError("options min_cosine or max_bits: give exactly one target")
    if min_cosine is not None:
        Int8Config(min_cosine=min_cosine)  # validates the range: (0, 1]
    if max_bits is not None and not (isinstance(max_bits, (int, float)) and 4.0 <= max_bits <= 32.0):
        raise ValidationError(f"option max_bits: {max_bits!r} must be a number in [4, 32] "
                              "(average bits per weight)")
    MixedPrecisionConfig(group_size=group_size)  # validates the group size
    check_run_settings(threads=threads)
    fm, _, _ = resolve_model(model, data)
    calib = as_dataset(data, input_specs_of_model(fm.proto), limit=256)
    check_token_ids(fm, calib)
    return plan_for_target(fm, calib, min_cosine=min_cosine, max_bits=max_bits,
                           group_size=group_size, threads=threads, progress=progress)


def load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and check a model file lowbit can use (ONNX or .lbz)."""
    return read_any(path)


def evaluate(model: str | os.PathLike[str] | onnx.ModelProto, data: Any, *,
             threads: int = 1) -> dict[str, Any]:
    """Accuracy (with labels) and the outputs' shapes on ``data``."""
    from lowbit.report.bench import evaluate_model

    return evaluate_model(model, data, threads=threads)


def bench(models: list[str | os.PathLike[str]], *, data: Any = None, batch: int | None = None,
          threads: int = 1, iterations: int = 50) -> dict[str, Any]:
    """Latency, throughput, size and accuracy of several models side by side, at
    ``batch`` (default: the models' fixed batch, else 8)."""
    from lowbit.report.bench import bench_models

    return bench_models(models, data=data, batch=batch, threads=threads, iterations=iterations)


def inspect_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Operators, parameters, dtypes, per-layer sizes; what is quantized and why not."""
    from lowbit.report.inspect import inspect_file

    return inspect_file(path)
