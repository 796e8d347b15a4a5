"""``lowbit bench`` and ``lowbit eval``: models run on the same inputs, side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from lowbit.backends.onnx.checks import check_token_ids
from lowbit.backends.onnx.session import first_output_shape, input_specs, make_session, run_batches
from lowbit.config import check_run_settings
from lowbit.data import (
    DEFAULT_BATCH,
    Dataset,
    InputSpec,
    as_dataset,
    run_batch,
    synthetic_dataset,
)
from lowbit.errors import ValidationError
from lowbit.layouts import own_batch
from lowbit.metrics import accuracy
from lowbit.model_io import read_any
from lowbit.runtime.environment import cpu_info, versions
from lowbit.runtime.latency import measure_side_by_side


def bench_models(paths: list[str | os.PathLike[str]], *, data: Any = None,
                 batch: int | None = None, threads: int = 1, iterations: int = 50
                 ) -> dict[str, Any]:
    """Latency, size and accuracy of every model, timed side by side at one batch (the
    one a model fixes, else ``batch``, default 8: ``_one_batch``)."""
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, (list, tuple)):
        raise ValidationError("bench needs a list of model paths")
    if not paths:
        raise ValidationError("bench needs at least one model")
    check_run_settings(threads=threads, iterations=iterations)
    if batch is not None:
        check_run_settings(batch=batch)
    sessions, datasets, timed, specs = [], [], [], []
    for path in paths:
        sess, spec, shape, proto = open_model(path, threads)
        specs.append(spec)
        ds: Dataset | None = (as_dataset(data, specs[-1], output=shape)
                              if data is not None else None)
        if ds is not None and proto is not None:
            check_token_ids(proto, ds)
        sessions.append(sess)
        datasets.append(ds)
        timed.append(ds or synthetic_dataset(specs[-1], batch or DEFAULT_BATCH))
    at = _one_batch([str(p) for p in paths], specs, timed, batch)
    feeds = [t.feed(at) for t in timed]
    stats = measure_side_by_side(sessions, feeds, batch=at, threads=threads,
                                 iterations=iterations, min_time_s=0.5)
    rows = []
    base_p50 = stats[0].p50_ms
    base_size = Path(paths[0]).stat().st_size
    for path, st, sess, ds in zip(paths, stats, sessions, datasets):
        size = Path(path).stat().st_size
        row: dict[str, Any] = {
            "model": str(path), "size_bytes": size, "latency": st.to_dict(),
            "speedup_vs_first": round(base_p50 / st.p50_ms, 3) if st.p50_ms else None,
            "size_ratio_vs_first": round(base_size / size, 3) if size else None,
        }
        if ds is not None and ds.labels is not None:
            row["accuracy"] = accuracy(run_batches(sess, ds)[0], ds.labels)
        rows.append(row)
    return {"batch": at, "threads": threads, "models": rows,
            "environment": {**cpu_info(), **versions()}}


def open_model(model: str | os.PathLike[str] | onnx.ModelProto, threads: int
               ) -> tuple[Any, list[InputSpec], Any, onnx.ModelProto | None]:
    """(session, input specs, first output shape, ONNX proto or None) of an ONNX / .lbz
    file or proto, or of a .tflite file (run in LiteRT)."""
    from lowbit.backends.tflite.session import TfliteSession, is_tflite

    if is_tflite(model):
        sess = TfliteSession(model, threads=threads)
        return sess, sess.get_inputs(), sess.output_shape(), None
    proto = model if isinstance(model, onnx.ModelProto) else read_any(model)
    label = "model" if isinstance(model, onnx.ModelProto) else str(model)
    sess = make_session(proto, threads=threads, name=label)
    return sess, input_specs(sess), first_output_shape(sess), proto


def _one_batch(paths: list[str], specs: list[list[InputSpec]], timed: list[Dataset],
               batch: int | None) -> int:
    """The one batch every model is timed at: the batch a model or its data fixes
    (``lowbit.layouts``), else ``batch`` (default 8); models that fix different ones
    cannot be compared and are refused."""
    owns = {p: own for p, s, t in zip(paths, specs, timed)
            if (own := own_batch(s, t.rows_per_run(DEFAULT_BATCH) if t.whole else None))}
    if len({own[0] for own in owns.values()}) > 1:
        raise ValidationError("bench: the models run at different batches ("
                              + "; ".join(f"{p}: {own[1]}" for p, own in owns.items())
                              + "); models are compared at one batch")
    k = next((paths.index(p) for p in owns), 0)
    return run_batch(specs[k], batch, timed[k])


def evaluate_model(model: str | os.PathLike[str] | onnx.ModelProto, data: Any, *,
                   threads: int = 1) -> dict[str, Any]:
    """Accuracy (with labels) and the outputs' shapes of one model on ``data``."""
    check_run_settings(threads=threads)
    session, specs, shape, proto = open_model(model, threads)
    dataset = as_dataset(data, specs, output=shape)
    if proto is not None:
        check_token_ids(proto, dataset)
    outputs = run_batches(session, dataset)
    result: dict[str, Any] = {"samples": dataset.num_samples,
                              "output_shapes": [list(o.shape) for o in outputs]}
    if dataset.labels is not None:
        result["accuracy"] = accuracy(outputs[0], dataset.labels)
    return result
