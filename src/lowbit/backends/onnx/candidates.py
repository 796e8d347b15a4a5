"""Whole-model INT8 decisions: a few plausible variants of one model, each written and
timed whole at the user's batch and threads, side by side with the float model.

A variant fixes what each weighted op type gets (static, dynamic or float) and which
nodes stay float; the one kept is the fastest, unless one nearly as fast is clearly more
accurate (``quant.search.pick_fast_and_accurate``). Timing per-op guesses (e.g. "this
Conv is slower in INT8") can be wrong for the whole model, where the quantize/dequantize
pairs a float island adds cost more than the island saves; timing whole models cannot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.session import make_session, run_batches
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.writer import write_model
from lowbit.data import Dataset
from lowbit.metrics import sqnr_db
from lowbit.quant.plan import QuantizationPlan, Treatment
from lowbit.quant.search import pick_fast_and_accurate
from lowbit.runtime.latency import measure_side_by_side
from lowbit.runtime.memory import release_memory

MIN_SEARCH_SECONDS = 3.0  # the default time budget: this, or a share of the quantize time
SEARCH_SHARE = 0.3
QUALITY_SAMPLES = 64


@dataclass(frozen=True)
class Variant:
    """What each weighted op type gets, and the nodes kept in float (name -> reason)."""

    name: str
    treatments: dict[str, Any]
    keep_float: dict[str, str] = field(default_factory=dict)


def alternatives() -> list[Variant]:
    """The variants auto mode times besides its own rule."""
    static, dynamic, flt = Treatment.STATIC, Treatment.DYNAMIC, Treatment.FLOAT
    return [
        Variant("all static", {"Conv": static, "Gemm": static, "MatMul": static,
                               "LSTM": flt}),
        Variant("dynamic MatMul/Gemm", {"Conv": static, "Gemm": dynamic, "MatMul": dynamic,
                                        "LSTM": dynamic}),
        Variant("dynamic MatMul/Gemm, float Conv", {"Conv": flt, "Gemm": dynamic,
                                                   "MatMul": dynamic, "LSTM": dynamic}),
    ]


def signature(plan: QuantizationPlan) -> tuple[tuple[str, str], ...]:
    """Two plans with one signature write the same model."""
    return tuple(sorted((d.name, d.treatment.value) for d in plan.decisions))


@dataclass
class SearchOutcome:
    index: int  # of the variant kept
    model: onnx.ModelProto  # its model, written
    rows: list[dict[str, Any]]  # every candidate: name, speedup vs float, SQNR, kept
    seconds: float
    iterations: int


def choose_variant(fm: FloatModel, plans: list[tuple[Variant, QuantizationPlan]],
                   calib: Dataset, *, batch: int, threads: int, budget_s: float,
                   progress: Callable[[str, int, int], None] | None = None) -> SearchOutcome:
    """Write each plan, time every model whole (float included) alternating at ``batch``
    and ``threads`` within about ``budget_s`` seconds, measure each one's output SQNR on
    a few calibration samples, and keep one."""
    t0 = time.perf_counter()
    selection = calib.take(0, min(calib.num_samples, QUALITY_SAMPLES))
    reference = [o.astype(np.float64) for o in run_batches(
        make_session(fm, threads=threads, lean=True, name="float model"), selection)]
    models, sessions, quality = [], [make_session(fm, threads=threads, name="float model")], []
    for k, (_, plan) in enumerate(plans):
        model = write_model(fm, plan)
        session = make_session(model, threads=threads, name="INT8 candidate")
        outs = run_batches(session, selection)
        quality.append(float(np.mean([sqnr_db(r, o) for r, o in zip(reference, outs)])))
        models.append(model)
        sessions.append(session)
        if progress is not None:
            progress("building candidates", k + 1, len(plans))
    feed = calib.feed(batch)
    start = time.perf_counter()
    for session in sessions:
        session.run(None, feed)
    once = max(time.perf_counter() - start, 1e-6)
    left = max(budget_s - (time.perf_counter() - t0), 0.2 * budget_s)
    iterations = int(min(100, max(5, left / once)))
    stats = measure_side_by_side(sessions, [feed] * len(sessions), batch=batch, threads=threads,
                                 iterations=iterations, warmup=2)
    speeds = [stats[0].p50_ms / s.p50_ms if s.p50_ms > 0 else 0.0 for s in stats[1:]]
    index = pick_fast_and_accurate(speeds, quality)
    rows = [{"name": v.name, "speedup": round(speeds[k], 3), "sqnr_db": round(quality[k], 2),
             "kept": k == index} for k, (v, _) in enumerate(plans)]
    chosen = models[index]
    del sessions, models
    release_memory()
    return SearchOutcome(index, chosen, rows, round(time.perf_counter() - t0, 3), iterations)
