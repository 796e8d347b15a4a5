"""Calibration: run the float model in ONNX Runtime over the data, batch by batch,
and feed the requested intermediate tensors into streaming observers.

Memory stays bounded by the model plus one run's exposed activations, whatever the
data size: each run's outputs are folded into fixed-size histograms and dropped. The
activations a run exposes are sized before it runs (from the shapes the loader
inferred, or one probe row): the batch of a model without a fixed batch is the largest
(up to ``batch_size``) whose exposed activations fit ``RUN_BYTES``, and where even one
run's do not fit, the tensors are observed in groups, one pass over the data each.

The runs are not timed for the user, so they need not run at the user's ``threads``: a
pass of at least ``TRIAL_RUNS`` runs times its first runs with every CPU this process
may use (``work_threads``) and then with ``threads``, and goes on with the faster (on a
busy machine more threads can be slower: each parallel step waits for a core another
process holds). The later untimed work (scoring calibration methods) uses the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.graph import GraphIndex
from lowbit.backends.onnx.session import make_session, work_threads
from lowbit.backends.onnx.store import FloatModel
from lowbit.data import Dataset
from lowbit.quant.observers import HistogramObserver

# Exposed activations one calibration run may hold (the observed tensors of a batch of 32
# images of 3x736x1216 are GBs; of one such image, a DBNet-style detector with a 16-128
# channel backbone, 155 MB).
RUN_BYTES = 512 * 2**20
TRIAL_RUNS = 8  # a pass this long (or longer) tries more threads on its first runs
MORE_THREADS_GAIN = 0.9  # ... and keeps them if a run takes at most this share of the time


@dataclass
class CalibrationRun:
    """Observers, and what the pass cost (sizes the later method search)."""

    observers: dict[str, HistogramObserver]
    batch: int  # rows per run (the model's fixed batch, one whole sample, or the chosen)
    bytes_per_sample: float  # of the observed tensors, for one sample (row or whole)
    seconds_per_sample: float  # of the calibration runs
    passes: int  # groups of tensors, one pass over the data each
    threads: int = 1  # intra-op threads the runs settled on (``TRIAL_RUNS``)


def expose_tensors(fm: FloatModel, names: list[str]) -> FloatModel:
    """A copy of ``fm`` whose graph also outputs ``names`` (float tensors)."""
    out = onnx.ModelProto()
    out.CopyFrom(fm.proto)  # light: large weights live in fm.weights
    existing = {o.name for o in out.graph.output}
    inputs = {i.name for i in out.graph.input}
    for name in names:
        if name in existing or name in inputs:
            continue
        out.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
        existing.add(name)
    return FloatModel(out, fm.weights)


def run_calibration(
    model: FloatModel,
    dataset: Dataset,
    tensors: list[str],
    *,
    batch_size: int,
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
    run_bytes: int | None = None,
) -> CalibrationRun:
    """Observers for ``tensors`` after streaming ``dataset`` through ``model``, with the
    batch, the activation bytes per sample and the passes taken.
    ``run_bytes``: the exposed activations one run may hold (default ``RUN_BYTES``).
    ``threads``: intra-op threads, unless more measure faster (``TRIAL_RUNS``)."""
    run_bytes = RUN_BYTES if run_bytes is None else int(run_bytes)
    index = GraphIndex(model.proto, model.weights)
    wanted = list(dict.fromkeys(tensors))
    from_graph = [t for t in wanted if t not in index.graph_inputs]
    observers = {t: HistogramObserver() for t in wanted}
    rows = dataset.rows_per_run(batch_size)
    per_row = _bytes_per_row(index, from_graph, rows)
    if per_row is None:  # a shape is unknown: measure one run of one row (or sample)
        probe = dataset.take(0, 1)
        session = make_session(expose_tensors(model, from_graph), threads=threads,
                               name="model (calibration)", lean=True)
        results = session.run(from_graph, next(probe.batches(1)))
        per_row = {t: r.nbytes / probe.rows_per_run(1) for t, r in zip(from_graph, results)}
        del session, results
    batch = rows
    if not dataset.whole and not dataset.fixed_batch:  # rows: a batch whose activations fit
        batch = int(min(batch_size, max(1, run_bytes // max(sum(per_row.values()), 1.0))))
    groups = _groups(from_graph, {t: b * dataset.rows_per_run(batch) for t, b in per_row.items()},
                     run_bytes)
    from_inputs = [t for t in wanted if t in index.graph_inputs]
    many = work_threads(threads)
    n_runs = dataset.num_samples if dataset.whole else \
        -(-dataset.num_samples // (dataset.fixed_batch or batch))
    chosen: int | None = threads if many == threads or n_runs < TRIAL_RUNS or not groups \
        else None
    t0 = time.perf_counter()
    for k, group in enumerate(groups or [[]]):
        session = _session(model, group, many if chosen is None else chosen) if group else None
        took: list[float] = []
        for i, (samples, feed) in enumerate(dataset.runs(batch)):
            start = time.perf_counter()
            results = session.run(group, feed) if session is not None else []
            seconds = time.perf_counter() - start
            _observe(observers, group, results)
            if k == 0:
                for name in from_inputs:
                    observers[name].update(feed[name])
                if progress is not None:
                    progress(samples)
            del results  # (an array of them alive keeps this session's whole arena)
            if chosen is None and i in (1, 3):  # each trial session's second run (the
                took.append(seconds)  # first one warms it up)
                if i == 3:
                    chosen = many if took[0] <= MORE_THREADS_GAIN * took[1] else threads
                if i == 1 or chosen != threads:
                    session = None  # (one session alive at a time: memory)
                    session = _session(model, group, threads if i == 1 else many)
        del session
    sample_rows = dataset.rows_per_run(1) if dataset.whole else 1
    return CalibrationRun(observers, batch, float(sum(per_row.values())) * sample_rows,
                          (time.perf_counter() - t0) / max(dataset.num_samples, 1),
                          max(1, len(groups)), chosen or threads)


def _observe(observers: dict[str, HistogramObserver], names: list[str],
             results: list[np.ndarray]) -> None:
    """Each result into its observer. (A function: no loop variable outlives it holding
    one of the arrays, which would keep the session's whole arena of 0.5 GB alive.)"""
    for name, value in zip(names, results):
        observers[name].update(value)


def _session(model: FloatModel, group: list[str], threads: int) -> Any:
    return make_session(expose_tensors(model, group), threads=threads,
                        name="model (calibration)", lean=True)


def _bytes_per_row(index: GraphIndex, tensors: list[str], rows: int) -> dict[str, float] | None:
    """Bytes of each tensor per row of a run of ``rows`` rows, from the inferred shapes
    (a leading unknown or named dimension is the batch); None if a shape is unknown."""
    out: dict[str, float] = {}
    for name in tensors:
        shape = index.shape(name)
        elem = index.elem_type(name)
        if shape is None or elem is None or not shape:
            return None
        if any(not isinstance(d, int) or d < 0 for d in shape[1:]):
            return None
        size = float(np.prod([d for d in shape[1:]], dtype=np.float64))
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize
        lead = shape[0]
        # a fixed leading dimension covers the run's rows (or is a whole sample's axis)
        out[name] = size * itemsize * (lead / max(rows, 1) if isinstance(lead, int) else 1.0)
    return out


def _groups(tensors: list[str], bytes_per_run: dict[str, float], budget: int) -> list[list[str]]:
    """``tensors`` in graph order, cut into groups whose bytes per run fit ``budget`` (a
    tensor larger than it alone)."""
    groups: list[list[str]] = []
    size = 0.0
    for name in tensors:
        b = bytes_per_run.get(name, 0.0)
        if not groups or size + b > budget:
            if groups and not groups[-1]:
                groups.pop()
            groups.append([])
            size = 0.0
        groups[-1].append(name)
        size += b
    return [g for g in groups if g]
