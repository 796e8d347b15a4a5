"""``lowbit bench`` and ``lowbit eval``: models run on the same inputs, side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.session import input_specs, make_session, run_batches
from lowbit.data import Dataset, as_dataset, synthetic_feed
from lowbit.errors import ValidationError
from lowbit.metrics import accuracy
from lowbit.model_io import read_any
from lowbit.runtime.environment import cpu_info, versions
from lowbit.runtime.latency import measure_side_by_side


def bench_models(paths: list[str | os.PathLike[str]], *, data: Any = None, batch: int = 8,
                 threads: int = 1, iterations: int = 50) -> dict[str, Any]:
    if not paths:
        raise ValidationError("bench needs at least one model")
    if batch < 1 or threads < 1 or iterations < 1:
        raise ValidationError("options batch, threads and iterations must be >= 1")
    sessions, feeds, datasets = [], [], []
    for path in paths:
        proto = read_any(path)  # ONNX or .lbz; one clear error for a bad file
        sess = make_session(proto, threads=threads, name=str(path))
        specs = input_specs(sess)
        ds: Dataset | None = as_dataset(data, specs) if data is not None else None
        sessions.append(sess)
        datasets.append(ds)
        feeds.append(ds.feed(batch) if ds is not None else synthetic_feed(specs, batch))
    stats = measure_side_by_side(sessions, feeds, batch=batch, threads=threads,
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
            outs = []
            for feed in ds.batches(64):
                outs.append(np.asarray(sess.run(None, feed)[0]))
            row["accuracy"] = accuracy(np.concatenate(outs), ds.labels)
        rows.append(row)
    return {"batch": batch, "threads": threads, "models": rows,
            "environment": {**cpu_info(), **versions()}}


def evaluate_model(model: str | os.PathLike[str] | onnx.ModelProto, data: Any, *,
                   threads: int = 1) -> dict[str, Any]:
    """Accuracy (with labels) and the outputs' shapes of one model on ``data``."""
    proto = model if isinstance(model, onnx.ModelProto) else read_any(model)
    label = "model" if isinstance(model, onnx.ModelProto) else str(model)
    session = make_session(proto, threads=threads, name=label)
    dataset = as_dataset(data, input_specs(session))
    outputs = run_batches(session, dataset)
    result: dict[str, Any] = {"samples": dataset.num_samples,
                              "output_shapes": [list(o.shape) for o in outputs]}
    if dataset.labels is not None:
        result["accuracy"] = accuracy(outputs[0], dataset.labels)
    return result
