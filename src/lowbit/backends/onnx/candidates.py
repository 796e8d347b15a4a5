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

MIN_SEARCH_SECONDS = 1.0  # the default time budget: this, or a share of the quantize time
SEARCH_SHARE = 0.3
FLOAT_TIMING_MAX_BYTES = 32 * 2**20
OUT_OF_RACE = 1.25  # after the first round, candidates this much slower than the fastest stop
MIN_ROUNDS = 3  # timed runs of each model at least, whatever the budget


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
                   calib: Dataset, selection: Dataset, reference: list[np.ndarray],
                   known: dict[int, float], *, batch: int, threads: int, budget_s: float,
                   progress: Callable[[str, int, int], None] | None = None) -> SearchOutcome:
    """Write each plan, time every model whole (float included) alternating at ``batch``
    and ``threads`` within about ``budget_s`` seconds, and keep one. Quality: output SQNR
    vs ``reference`` (the float outputs on ``selection``), or ``known[k]`` if measured."""
    t0 = time.perf_counter()
    if sum(w.nbytes for w in fm.weights.values()) > FLOAT_TIMING_MAX_BYTES:
        return _one_at_a_time(fm, plans, calib, selection, reference, known, batch=batch,
                              threads=threads, budget_s=budget_s)
    models, quality = [], []
    sessions = [make_session(fm, threads=threads, name="float model")]
    for k, (_, plan) in enumerate(plans):
        model = write_model(fm, plan)
        session = make_session(model, threads=threads, name="INT8 candidate")
        quality.append(_quality(session, k, selection, reference, known))
        models.append(model)
        sessions.append(session)
        if progress is not None:
            progress("building candidates", k + 1, len(plans))
    feed = calib.feed(batch)
    start = time.perf_counter()
    for session in sessions:  # (also the warm-up)
        session.run(None, feed)
    once = max(time.perf_counter() - start, 1e-6)  # one run of every model
    left = max(budget_s - (time.perf_counter() - t0), 0.0)
    # a short first round, then the rest of the time on the float model and the
    # candidates that can still be kept (within OUT_OF_RACE of the fastest); rounds are
    # bounded by the budget (at least MIN_ROUNDS: a 1-second model runs a few times)
    rounds = int(min(10, max(MIN_ROUNDS, 0.25 * left / once)))
    warmup = 1 if once < 0.05 * budget_s else 0  # (the run above warmed a slow model)
    first = _timed(sessions, feed, batch, threads, rounds, warmup=warmup)
    speeds = [first[0] / p if p > 0 else 0.0 for p in first[1:]]
    alive = [0] + [k + 1 for k, v in enumerate(speeds) if v * OUT_OF_RACE >= max(speeds)]
    left = budget_s - (time.perf_counter() - t0)
    iterations = rounds
    more = int(min(100, left / (once * len(alive) / len(sessions))))
    if more >= MIN_ROUNDS:
        second = _timed([sessions[k] for k in alive], feed, batch, threads, more, warmup=warmup)
        for k, p50 in zip(alive[1:], second[1:]):
            speeds[k - 1] = second[0] / p50 if p50 > 0 else 0.0
        iterations = more
    index = pick_fast_and_accurate(speeds, quality)
    rows = [{"name": v.name, "speedup": round(speeds[k], 4), "sqnr_db": round(quality[k], 2),
             "kept": k == index} for k, (v, _) in enumerate(plans)]
    chosen = models[index]
    del sessions, models
    release_memory()
    return SearchOutcome(index, chosen, rows, round(time.perf_counter() - t0, 3), iterations)


def relative_speeds(models: list[onnx.ModelProto], calib: Dataset, *, batch: int,
                    threads: int, iterations: int = 10) -> list[float]:
    """Speed of each model relative to the first, timed alternating at ``batch`` and
    ``threads``."""
    sessions = [make_session(m, threads=threads, name="INT8 candidate") for m in models]
    p50s = _timed(sessions, calib.feed(batch), batch, threads, iterations)
    del sessions
    release_memory()
    return [p50s[0] / p if p > 0 else 0.0 for p in p50s]


def _quality(session: Any, k: int, selection: Dataset, reference: list[np.ndarray],
             known: dict[int, float]) -> float:
    if k not in known:
        outs = run_batches(session, selection)
        known[k] = float(np.mean([sqnr_db(r, o) for r, o in zip(reference, outs)]))
    return known[k]


def _one_at_a_time(fm: FloatModel, plans: list[tuple[Variant, QuantizationPlan]],
                   calib: Dataset, selection: Dataset, reference: list[np.ndarray],
                   known: dict[int, float], *, batch: int, threads: int,
                   budget_s: float) -> SearchOutcome:
    """For a big model: one candidate session alive at a time (no float session, no model
    kept), timed in turn; speeds relative to the first candidate; the kept one is
    written again. Memory stays at one INT8 model."""
    t0 = time.perf_counter()
    feed = calib.feed(batch)
    p50s, quality, iterations = [], [], 5
    for k, (_, plan) in enumerate(plans):
        data = write_model(fm, plan).SerializeToString()
        session = make_session(data, threads=threads, name="INT8 candidate")
        del data
        quality.append(_quality(session, k, selection, reference, known))
        start = time.perf_counter()
        session.run(None, feed)  # (also the warm-up)
        once = max(time.perf_counter() - start, 1e-6)
        left = max(budget_s - (time.perf_counter() - t0), 0.0) / (len(plans) - k)
        iterations = int(min(50, max(MIN_ROUNDS, left / once)))
        p50s.append(_timed([session], feed, batch, threads, iterations,
                           warmup=1 if once < 0.05 * budget_s else 0)[0])
        del session
        release_memory()
    speeds = [p50s[0] / p if p > 0 else 0.0 for p in p50s]
    index = pick_fast_and_accurate(speeds, quality)
    rows = [{"name": v.name, "speed_vs_first": round(speeds[k], 4),
             "sqnr_db": round(quality[k], 2), "kept": k == index}
            for k, (v, _) in enumerate(plans)]
    chosen = write_model(fm, plans[index][1])
    return SearchOutcome(index, chosen, rows, round(time.perf_counter() - t0, 3), iterations)


def _timed(sessions: list[Any], feed: dict[str, np.ndarray], batch: int, threads: int,
           iterations: int, warmup: int = 1) -> list[float]:
    """p50 ms of each session, run alternating."""
    stats = measure_side_by_side(sessions, [feed] * len(sessions), batch=batch, threads=threads,
                                 iterations=iterations, warmup=warmup)
    return [s.p50_ms for s in stats]
