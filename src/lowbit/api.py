"""The public Python API: quantize, load, evaluate, bench, inspect_model."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.data import Dataset, as_dataset
from lowbit.errors import DataError, ValidationError
from lowbit.fileio import write_bytes_atomic, write_json_atomic
from lowbit.onnx.load import load_model, read_model
from lowbit.onnx.store import FloatModel
from lowbit.quant.scheme import QuantizeConfig, QuantMode
from lowbit.runtime.session import cpu_info, input_specs_of_model, make_session, versions

ProgressFn = Callable[[str, int, int], None]


class QuantizedModel:
    """A quantized ONNX model with its verification report.

    >>> qm = lowbit.quantize("model.onnx", "calib.npz")      # doctest: +SKIP
    >>> qm.save("model.int8.onnx")   # also writes report.json beside it  # doctest: +SKIP
    """

    def __init__(self, model: onnx.ModelProto, float_model: FloatModel,
                 report: dict[str, Any]) -> None:
        self.model = model
        self._float = float_model
        self.report = report

    @property
    def float_model(self) -> onnx.ModelProto:
        """The normalised float model lowbit quantized (self-contained ONNX)."""
        return self._float.joined()

    def save(self, path: str | os.PathLike[str], *, report: bool = True) -> Path:
        """Write the model (atomically) and ``report.json`` in the same folder."""
        out = Path(path)
        data = self.model.SerializeToString()
        write_bytes_atomic(out, data)
        self.report["output"] = {"path": str(out), "size_bytes": out.stat().st_size}
        if "input" in self.report and self.report["input"].get("size_bytes"):
            self.report["output"]["size_ratio"] = round(
                self.report["input"]["size_bytes"] / max(1, out.stat().st_size), 3)
        if report:
            write_json_atomic(out.parent / "report.json", self.report)
        return out

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray, *, threads: int = 1) -> list[Any]:
        session = make_session(self.model, threads=threads)
        if not isinstance(inputs, dict):
            inputs = {session.get_inputs()[0].name: np.asarray(inputs)}
        return list(session.run(None, inputs))


def _is_torch_module(obj: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")  # never import torch (hundreds of MB) just to check
    return torch is not None and isinstance(obj, torch.nn.Module)


def _first_batch(data: Any) -> Any:
    if isinstance(data, tuple) and len(data) == 2:
        return data[0]
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k not in ("y", "labels", "label")}
    if isinstance(data, (str, os.PathLike)):
        from lowbit.data import load_npz

        arrays = load_npz(data, limit=2)  # export needs one small batch only
        return arrays.get("x", next(iter(arrays.values())))
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        return data
    for batch in data:
        return batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
    raise DataError("data is empty")


def resolve_model(model: Any, data: Any, *, fold_bn: bool = True
                  ) -> tuple[FloatModel, str, int | None]:
    """(normalised float ONNX model, display name, size on disk if a file)."""
    if _is_torch_module(model):
        from lowbit.torch.export import export_module

        sample = _first_batch(data)
        if isinstance(sample, dict):
            names = list(sample)
            proto = export_module(model, tuple(np.asarray(sample[k])[:2] for k in names),
                                  input_names=names)
        else:
            arr = sample.detach().cpu().numpy() if hasattr(sample, "detach") else np.asarray(sample)
            proto = export_module(model, arr[:2])
        normalised, _ = load_model(proto, fold_bn=fold_bn)
        return normalised, type(model).__name__, len(proto.SerializeToString())
    if isinstance(model, onnx.ModelProto):
        normalised, name = load_model(model, fold_bn=fold_bn)
        return normalised, name, len(model.SerializeToString())
    if isinstance(model, (str, os.PathLike)):
        from lowbit.onnx.load import normalise

        normalised = normalise(read_any(model), name=str(model), fold_bn=fold_bn)
        return normalised, str(model), Path(model).stat().st_size
    raise ValidationError(
        f"model must be an ONNX file path, an onnx.ModelProto or a torch.nn.Module, "
        f"not {type(model).__name__}")


def split_holdout(data: Dataset, fraction: float, cap: int) -> tuple[Dataset, Dataset, bool]:
    """(calibration, verification, verification_is_separate)."""
    n = data.num_samples
    if n < 2 or fraction <= 0:
        return data, data, False
    hold = min(max(1, int(round(n * fraction))), n - 1)
    calib = data.take(0, min(n - hold, cap))
    verify = data.take(n - hold, n)
    verify.source = f"{data.source} (last {hold} samples, held back from calibration)"
    return calib, verify, True


def quantize(
    model: Any,
    data: Any,
    *,
    mode: str = "auto",
    calibration: str = "auto",
    bits: int = 8,
    group_size: int = 128,
    algorithm: str = "rtn",
    eval_data: Any = None,
    config: QuantizeConfig | None = None,
    strict: bool = False,
    threads: int = 1,
    batch: int = 8,
    verify: bool = True,
    progress: ProgressFn | None = None,
) -> QuantizedModel:
    """INT8 post-training quantization of an ONNX model or a torch module.

    ``data`` calibrates (an .npz path, arrays, ``(x, y)``, a dict by input name,
    or a DataLoader); ``eval_data`` (same forms) verifies. Without ``eval_data``
    the last 20% of ``data`` is held back for verification.

    >>> qm = quantize("model.onnx", "calib.npz", mode="static")   # doctest: +SKIP
    >>> qm.report["verification"]["agreement"]["top1_agreement"]  # doctest: +SKIP
    """
    from lowbit.onnx.quantize import quantize_onnx
    from lowbit.report.verify import verify as run_verification

    if config is None:
        config = QuantizeConfig(mode=mode, calibration=calibration, strict=strict,  # type: ignore[arg-type]
                                bits=bits, group_size=group_size, algorithm=algorithm)
    if int(threads) < 1:
        raise ValidationError(f"option threads: {threads} must be >= 1")
    if int(batch) < 1:
        raise ValidationError(f"option batch: {batch} must be >= 1")
    t0 = time.perf_counter()
    float_model, name, in_size = resolve_model(model, data)
    specs = input_specs_of_model(float_model.proto)
    limit = config.max_calibration_samples * 2 + 1024
    dataset = as_dataset(data, specs, limit=limit)
    if eval_data is not None:
        calib = dataset.take(0, min(dataset.num_samples, config.max_calibration_samples))
        holdout, separate = as_dataset(eval_data, specs), True
    else:
        calib, holdout, separate = split_holdout(dataset, config.holdout_fraction,
                                                 config.max_calibration_samples)
    check_token_ids(float_model, dataset)
    if config.mode is QuantMode.WEIGHT_ONLY:
        return _weight_only(float_model, name, in_size, calib, holdout, separate, config,
                            threads=threads, batch=batch, verify=verify, progress=progress, t0=t0)
    outcome = quantize_onnx(float_model, calib, config, progress=progress, threads=threads)
    search = None
    if config.min_cosine is not None or config.max_drop is not None:
        outcome, search = _search_min_cosine(float_model, calib, config, outcome, threads,
                                             progress)
    report: dict[str, Any] = {
        "tool": "lowbit quantize",
        "input": {"model": name, "size_bytes": in_size},
        "config": config.to_dict(),
        "mode_by_op": outcome.treatments,
        "calibration": {
            "method": outcome.method.value if outcome.method else None,
            "requested": config.calibration.value,
            "sqnr_db_by_method": outcome.method_sqnr_db,
            "samples": outcome.calibration_samples,
            "source": calib.source,
        },
        "nodes": {"counts": outcome.plan.counts(), "decisions": _decisions(outcome.model)},
        "warnings": outcome.warnings,
        "seconds": {k: round(v, 3) for k, v in outcome.seconds.items()},
    }
    if search is not None:
        report["quality_target"] = {
            "min_cosine": config.min_cosine, "max_drop": config.max_drop, "met": search.met,
            ("cosine_on_calibration_samples" if config.max_drop is None else
             "minus_accuracy_drop_on_calibration_samples"): round(search.score, 6),
            "kept_in_float": search.kept_float, "sensitivity": search.sensitivity,
            "smoothquant_inputs": search.smoothquant_inputs,
            "smoothquant_alpha": search.smoothquant_alpha}
        if not search.met:
            report["warnings"].append(
                f"quality target (min_cosine {config.min_cosine}, max_drop {config.max_drop}) "
                f"not reached; best score {search.score:.5f}")
    if verify:
        if progress is not None:
            progress("verifying", 0, 1)
        result = run_verification(float_model, outcome.model, holdout, threads=threads, batch=batch)
        if not separate:
            result["agreement"]["note"] = ("only one sample was given: verification reuses the "
                                           "calibration data")
        report["verification"] = result
        if progress is not None:
            progress("verifying", 1, 1)
    report["environment"] = {**cpu_info(), **versions()}
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return QuantizedModel(outcome.model, float_model, report)


SMOOTHQUANT_ALPHAS = (0.5, 0.7, 0.85)


def _search_min_cosine(float_model: FloatModel, calib: Dataset, config: QuantizeConfig,
                       first: Any, threads: int, progress: ProgressFn | None) -> tuple[Any, Any]:
    import dataclasses

    from lowbit.onnx.accuracy import meet_min_cosine
    from lowbit.onnx.quantize import quantize_onnx

    selection = calib.take(0, min(calib.num_samples, 256 if config.max_drop is not None else 64))
    from lowbit.runtime.session import run_batches

    reference = run_batches(make_session(float_model, threads=threads), selection, 16)
    if config.max_drop is not None:
        from lowbit.report.metrics import accuracy

        if selection.labels is None:
            raise DataError(f"{calib.source}: option max_drop needs labels ('y') in the data")
        base_acc = accuracy(reference[0], selection.labels)
        if base_acc is None:
            raise DataError("option max_drop needs a classifier output (batch, classes)")

        def score(model: onnx.ModelProto) -> float:  # minus the drop in points
            out = run_batches(make_session(model, name="candidate"), selection, 16)[0]
            return -100.0 * (float(base_acc) - float(accuracy(out, selection.labels) or 0.0))

        target, metric = -float(config.max_drop), "minus_accuracy_drop"
    else:
        def score(model: onnx.ModelProto) -> float:
            return output_cosine(model, selection, reference)

        target, metric = float(config.min_cosine), "cosine"

    from lowbit.onnx.accuracy import output_cosine

    base, smoothed_inputs, smoothquant_alpha = float_model, 0, None
    if config.smoothquant and first.plan.dynamic_nodes and score(first.model) < target:
        # SmoothQuant first: it keeps every layer INT8 (full speed) when it suffices
        from lowbit.onnx.smoothquant import smooth

        best_cos = score(first.model)
        for alpha in SMOOTHQUANT_ALPHAS:  # migration strength; the best on calibration wins
            smoothed, n_inputs = smooth(float_model, calib, alpha=alpha, threads=threads)
            if not n_inputs:
                break
            candidate = quantize_onnx(smoothed, calib, config, threads=threads)
            c = score(candidate.model)
            if c > best_cos:
                base, first, best_cos, smoothed_inputs = smoothed, candidate, c, n_inputs
                smoothquant_alpha = alpha
            if best_cos >= target:
                break

    def build(excluded: tuple[str, ...]) -> Any:
        cfg = dataclasses.replace(config, exclude_nodes=tuple(config.exclude_nodes) + excluded,
                                  calibration=first.method or config.calibration)
        return quantize_onnx(base, calib, cfg, threads=threads)

    search = meet_min_cosine(build, first, selection, reference, target, progress, score=score,
                             metric=metric)
    search.smoothquant_inputs = smoothed_inputs if base is not float_model else 0
    search.smoothquant_alpha = smoothquant_alpha
    return search.outcome, search


def check_token_ids(fm: FloatModel, data: Dataset) -> None:
    """Integer inputs that index an embedding table must lie inside its vocabulary."""
    from lowbit.onnx.graph import GraphIndex

    index = GraphIndex(fm.proto, fm.weights)
    for name, arr in data.inputs.items():
        if arr.dtype.kind not in "iu":
            continue
        for node in index.consumers.get(name, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name \
                    and node.input[0] in index.initializers:
                vocab = int(index.initializers[node.input[0]].dims[0])
                lo, hi = int(arr.min()), int(arr.max())
                if lo < -vocab or hi >= vocab:
                    raise DataError(
                        f"{data.source}: token ids in '{name}' range over [{lo}, {hi}], but the "
                        f"embedding table '{node.input[0]}' has {vocab} rows")


def _weight_only(float_model: FloatModel, name: str, in_size: int | None, calib: Dataset,
                 holdout: Dataset, separate: bool, config: QuantizeConfig, *, threads: int,
                 batch: int, verify: bool, progress: ProgressFn | None, t0: float) -> QuantizedModel:
    from lowbit.onnx.weight_only import WeightOnlyConfig, quantize_weight_only
    from lowbit.report.verify import verify as run_verification

    cfg = WeightOnlyConfig(config.bits, config.group_size, config.algorithm, config.symmetric,
                           config.accuracy_level, config.exclude_nodes)
    outcome = quantize_weight_only(float_model, cfg, calib, batch_size=min(config.batch_size, 8),
                                   threads=threads, progress=progress)
    report: dict[str, Any] = {
        "tool": "lowbit quantize (weight-only)",
        "input": {"model": name, "size_bytes": in_size},
        "config": config.to_dict(),
        "weight_only": {"bits": cfg.bits, "group_size": cfg.group_size,
                        "algorithm": cfg.algorithm, "symmetric": cfg.symmetric,
                        "accuracy_level": cfg.accuracy_level,
                        "relative_weight_error_by_layer": outcome.layer_error},
        "calibration": {"method": None, "samples": calib.num_samples if cfg.algorithm == "gptq"
                        else 0, "source": calib.source},
        "nodes": {"counts": dict(Counter(d["treatment"] for d in outcome.decisions)),
                  "decisions": outcome.decisions},
        "warnings": [],
        "seconds": {},
    }
    if verify:
        result = run_verification(float_model, outcome.model, holdout, threads=threads,
                                  batch=batch)
        if not separate:
            result["agreement"]["note"] = "verification reuses the calibration data"
        report["verification"] = result
    report["environment"] = {**cpu_info(), **versions()}
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return QuantizedModel(outcome.model, float_model, report)


def _decisions(model: onnx.ModelProto) -> list[dict[str, str]]:
    import json

    meta = {p.key: p.value for p in model.metadata_props}
    return list(json.loads(meta.get("lowbit.decisions", "[]")))


def quantize_with_plan(model: str | os.PathLike[str], data: Any, plan_path: str, *,
                       threads: int = 1, batch: int = 8) -> QuantizedModel:
    """Apply a mixed-precision plan (from ``lowbit sensitivity``) and verify the result.

    >>> qm = quantize_with_plan("gpt.onnx", "calib.npz", "plan.json")   # doctest: +SKIP
    """
    from lowbit.onnx.mixed import apply_plan, read_plan
    from lowbit.report.verify import verify

    fm, name, in_size = resolve_model(model, data)
    plan = read_plan(plan_path, fm)
    dataset = as_dataset(data, input_specs_of_model(fm.proto), limit=1536)
    calib, holdout, _ = split_holdout(dataset, 0.2, 256)
    proto = apply_plan(fm, plan, calib, group_size=int(plan.get("group_size", 128)),
                       threads=threads)
    report = {"tool": "lowbit quantize (mixed precision plan)",
              "input": {"model": name, "size_bytes": in_size},
              "plan": {"file": str(plan_path), "layers": plan["layers"],
                       "counts": dict(Counter(plan["layers"].values()))},
              "verification": verify(fm, proto, holdout, threads=threads, batch=batch),
              "environment": {**cpu_info(), **versions()}}
    return QuantizedModel(proto, fm, report)


def is_lbz(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a file that starts with the .lbz magic (content, not name)."""
    from lowbit.container.format import MAGIC

    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def decode_lbz(data: bytes, source: str) -> onnx.ModelProto:
    """Decode .lbz bytes and run the ONNX checker on the result."""
    from lowbit.container import decode
    from lowbit.errors import ModelLoadError

    model = decode(data, source=source)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{source}: the decoded model fails the ONNX checker: {exc}") from None
    return model


def read_any(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file or a lowbit .lbz file (told apart by content, not name)."""
    if is_lbz(path):
        return decode_lbz(Path(path).read_bytes(), str(path))
    return read_model(path)


def load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and check a model file lowbit can use (ONNX or .lbz)."""
    return read_any(path)


def evaluate(model: str | os.PathLike[str] | onnx.ModelProto, data: Any, *,
             threads: int = 1) -> dict[str, Any]:
    """Accuracy (with labels) and the outputs' shapes on ``data``."""
    from lowbit.report.metrics import accuracy
    from lowbit.runtime.session import run_batches

    proto = read_any(model) if not isinstance(model, onnx.ModelProto) else model
    session = make_session(proto, threads=threads, name=str(model) if not isinstance(
        model, onnx.ModelProto) else "model")
    from lowbit.runtime.session import input_specs

    dataset = as_dataset(data, input_specs(session))
    outputs = run_batches(session, dataset)
    result: dict[str, Any] = {"samples": dataset.num_samples,
                              "output_shapes": [list(o.shape) for o in outputs]}
    if dataset.labels is not None:
        result["accuracy"] = accuracy(outputs[0], dataset.labels)
    return result


def bench(models: list[str | os.PathLike[str]], *, data: Any = None, batch: int = 8,
          threads: int = 1, iterations: int = 50) -> dict[str, Any]:
    from lowbit.runtime.bench import bench_models

    return bench_models(models, data=data, batch=batch, threads=threads, iterations=iterations)


def inspect_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    from lowbit.inspect import inspect_file

    return inspect_file(path)
