"""Calibration: run the float model in ONNX Runtime over the data, batch by batch,
and feed the requested intermediate tensors into streaming observers.

Memory stays bounded by the model plus one run's exposed activations, whatever the
data size: each run's outputs are folded into fixed-size histograms and dropped. The
activations a run exposes are sized before it runs (from the shapes the loader
inferred, or one probe row): the batch of a model without a fixed batch is the largest
(up to ``batch_size``) whose exposed activations fit ``RUN_BYTES``, and where even one
run's do not fit, the tensors are observed in groups, one pass over the data each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from lowbit.backends.onnx.graph import GraphIndex
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.store import FloatModel
from lowbit.data import Dataset
from lowbit.quant.observers import HistogramObserver

# Exposed activations one calibration run may hold (the observed tensors of a batch of 32
# images of 3x736x1216 are GBs; of one such image, a DBNet-style detector with a 16-128
# channel backbone, 155 MB).
RUN_BYTES = 512 * 2**20


@dataclass
class CalibrationRun:
    """Observers, and what the pass cost (sizes the later method search)."""

    observers: dict[str, HistogramObserver]
    batch: int  # rows per run (the model's fixed batch, one whole sample, or the chosen)
    bytes_per_sample: float  # of the observed tensors, for one sample (row or whole)
    seconds_per_sample: float  # of the calibration runs
    passes: int  # groups of tensors, one pass over the data each


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
    ``run_bytes``: the exposed activations one run may hold (default ``RUN_BYTES``)."""
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
    t0 = time.perf_counter()
    for k, group in enumerate(groups or [[]]):
        session = make_session(expose_tensors(model, group), threads=threads,
                               name="model (calibration)", lean=True) if group else None
        for samples, feed in dataset.runs(batch):
            results = session.run(group, feed) if session is not None else []
            for name, value in zip(group, results):
                observers[name].update(value)
            if k == 0:
                for name in from_inputs:
                    observers[name].update(feed[name])
                if progress is not None:
                    progress(samples)
            del results
        del session
    sample_rows = dataset.rows_per_run(1) if dataset.whole else 1
    return CalibrationRun(observers, batch, float(sum(per_row.values())) * sample_rows,
                          (time.perf_counter() - t0) / max(dataset.num_samples, 1),
                          max(1, len(groups)))


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
