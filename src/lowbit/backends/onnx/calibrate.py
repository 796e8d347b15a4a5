"""Calibration: run the float model in ONNX Runtime over the data, batch by batch,
and feed the requested intermediate tensors into streaming observers.

Memory stays bounded by the model plus one batch of activations: each batch's
outputs are folded into fixed-size histograms and dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from lowbit.backends.onnx.graph import GraphIndex
from lowbit.backends.onnx.session import make_session
from lowbit.backends.onnx.store import FloatModel
from lowbit.data import Dataset
from lowbit.quant.observers import HistogramObserver


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


def calibrate(
    model: FloatModel,
    dataset: Dataset,
    tensors: list[str],
    *,
    batch_size: int,
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, HistogramObserver]:
    """Observers for ``tensors`` after streaming ``dataset`` through ``model``."""
    index = GraphIndex(model.proto, model.weights)
    wanted = [t for t in dict.fromkeys(tensors)]
    from_inputs = [t for t in wanted if t in index.graph_inputs]
    from_graph = [t for t in wanted if t not in index.graph_inputs]
    augmented = expose_tensors(model, from_graph)
    session = make_session(augmented, threads=threads, name="model (calibration)", lean=True)
    observers = {t: HistogramObserver() for t in wanted}
    for samples, feed in dataset.runs(batch_size):
        results = session.run(from_graph, feed) if from_graph else []
        for name, value in zip(from_graph, results):
            observers[name].update(value)
        for name in from_inputs:
            observers[name].update(feed[name])
        if progress is not None:
            progress(samples)
        del results
    return observers
