"""``lowbit bench``: several models side by side on the same inputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.data import Dataset, InputSpec, as_dataset
from lowbit.errors import ValidationError
from lowbit.report.metrics import accuracy
from lowbit.runtime.latency import measure_side_by_side
from lowbit.runtime.session import cpu_info, input_specs, make_session, versions

DEFAULT_DYNAMIC_DIM = 16  # non-batch dynamic dims (e.g. sequence length) without data


def synthetic_feed(specs: list[InputSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of the right shape and dtype (for timing only)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = [batch] + [d if isinstance(d, int) and d > 0 else DEFAULT_DYNAMIC_DIM
                           for d in spec.shape[1:]]
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feed


def feed_for(data: Dataset | None, specs: list[InputSpec], batch: int) -> dict[str, np.ndarray]:
    """One batch of inputs for timing: from ``data`` if given, else seeded synthetic."""
    return data.feed(batch) if data is not None else synthetic_feed(specs, batch)


def bench_models(paths: list[str | os.PathLike[str]], *, data: Any = None, batch: int = 8,
                 threads: int = 1, iterations: int = 50) -> dict[str, Any]:
    if not paths:
        raise ValidationError("bench needs at least one model")
    if batch < 1 or threads < 1 or iterations < 1:
        raise ValidationError("options batch, threads and iterations must be >= 1")
    sessions, feeds, datasets = [], [], []
    for path in paths:
        from lowbit.api import read_any

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
