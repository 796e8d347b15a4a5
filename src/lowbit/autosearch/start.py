"""What a search reads once: the model (normalised), the training and validation parts
of the data, the float model's reference outputs, and the valid start (the float model
itself, as a ``CompressedModel``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from lowbit.autosearch.sensitivity import Scorer
from lowbit.autosearch.space import SearchOptions
from lowbit.backends.onnx.checks import check_token_ids
from lowbit.backends.onnx.session import first_output_shape, input_specs_of_model, make_session
from lowbit.backends.onnx.store import FloatModel
from lowbit.config import DistillSettings
from lowbit.container import encode
from lowbit.data import LABEL_KEYS, Dataset, as_dataset, run_batch, split_holdout
from lowbit.errors import DataError
from lowbit.model_io import external_data_files, resolve_model
from lowbit.pipeline import HOLDOUT_FRACTION, CompressedModel
from lowbit.report.build import build_report, weight_section
from lowbit.runtime.latency import measure_side_by_side

LATENCY_SECONDS = 1.5  # about this long per configuration timed beside the float model


@dataclass
class SearchData:
    """``source``: what each run is given (the user's file, so a save never overwrites
    it; an exported torch module as ONNX); ``train``/``val``: the parts of the data;
    ``val`` scores against the float model's outputs; ``tunes``: fine-tuning is possible
    (labels, or distillation from the float model when there are none)."""

    fm: FloatModel
    name: str
    input_size: int | None
    source: Any
    inputs: tuple[Any, ...]
    train: Dataset
    val: Scorer
    train_arrays: dict[str, np.ndarray]
    val_arrays: dict[str, np.ndarray]
    batch: int
    threads: int
    distill: DistillSettings | None
    tunes: bool
    float_bytes: int
    float_session: Any = None
    feed: dict[str, np.ndarray] | None = None

    @property
    def latency_setting(self) -> str:
        return f"batch {self.batch}, {self.threads} thread(s), timed alternating"


def _arrays(data: Dataset) -> dict[str, np.ndarray]:
    """``data`` as the arrays ``as_dataset`` reads back (labels under a free label key)."""
    out = dict(data.inputs)
    if data.labels is not None:
        key = next(k for k in LABEL_KEYS if k not in out)
        labels = data.labels
        if data.label_rows > 1:  # whole samples: one row of labels per output row
            labels = labels.reshape(data.num_samples, data.label_rows, *labels.shape[1:])
        out[key] = labels
    return out


def load(model: Any, data: Any, eval_data: Any, options: SearchOptions,
         batch: int | None) -> SearchData:
    fm, name, size = resolve_model(model, data)
    specs, output = input_specs_of_model(fm.proto), first_output_shape(fm.proto)
    full = as_dataset(data, specs, output=output)
    check_token_ids(fm, full)
    if eval_data is not None:
        train, val = full, as_dataset(eval_data, specs, output=output)
        check_token_ids(fm, val)
    else:
        train, val, separate = split_holdout(full, HOLDOUT_FRACTION)
        if not separate:
            raise DataError("data: the search needs at least 2 samples (one part trains, "
                            "the other validates)")
    by_accuracy = options.max_drop is not None
    scorer = Scorer.of(fm, val, by_accuracy=by_accuracy, threads=options.threads)
    distill = DistillSettings() if options.epochs and train.labels is None else None
    file_like = isinstance(model, (str, os.PathLike, onnx.ModelProto))
    batch = run_batch(specs, batch, val)
    d = SearchData(fm=fm, name=name, input_size=size, source=model if file_like else fm.joined(),
                   inputs=(model, *external_data_files(model), data, eval_data), train=train,
                   val=scorer, train_arrays=_arrays(train), val_arrays=_arrays(val), batch=batch,
                   threads=options.threads, distill=distill, tunes=options.epochs > 0,
                   float_bytes=len(encode(fm.joined())))
    if options.objective == "latency":
        d.float_session = make_session(fm, threads=options.threads, name="float model")
        d.feed = val.feed(batch)
    return d


def float_start(d: SearchData) -> CompressedModel:
    """The float model as a result: the valid start every search has."""
    model = d.fm.joined()
    lbz = encode(model)
    report = build_report(tool="lowbit search", name=d.name, input_size=d.input_size, stages=[],
                          sections=weight_section(model.ByteSize(), model.ByteSize(), len(lbz),
                                                  d.fm),
                          plan=None, notes=["the float model: nothing tried beat it within the "
                                            "target"], warnings=[], skipped={},
                          verification=None, seconds={})
    return CompressedModel(model, report, fm=d.fm, original=d.fm, lbz=lbz, inputs=d.inputs)


def latency_ratio(d: SearchData, model: onnx.ModelProto) -> float:
    """The model's latency over the float model's (lower is better): median of runs
    alternating with the float model, at the search's batch and threads."""
    session = make_session(model, threads=d.threads, name="candidate")
    t = time.perf_counter()
    session.run(None, d.feed)
    d.float_session.run(None, d.feed)
    once = max(time.perf_counter() - t, 1e-6)
    runs = int(min(100, max(5, LATENCY_SECONDS / once)))
    stats = measure_side_by_side([d.float_session, session], [d.feed, d.feed], batch=d.batch,
                                 threads=d.threads, iterations=runs, warmup=3)
    return stats[1].p50_ms / stats[0].p50_ms if stats[0].p50_ms > 0 else 1.0
