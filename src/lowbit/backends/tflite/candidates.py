"""Speed-aware TFLite: whole-model candidates timed in LiteRT, the fastest good one kept.

LiteRT's INT8 kernels are not always faster than its float ones (a 1-channel convolution
in INT8 runs at about half the float speed), and the QUANTIZE/DEQUANTIZE a float island
adds has a cost of its own, so per-layer guesses are not enough: every candidate is
written and timed whole, alternating, at the user's batch and threads:

- full INT8 (the plan as lowbit calibrated it);
- full INT8 with one weighted layer in float, for each layer (while the budget lasts),
  then all the layers whose float version was faster, together, with the others INT8
  or dynamic range;
- dynamic range (INT8 weights, float activations);
- and the float model itself: when no quantized candidate beats it, the float model is
  what lowbit keeps, and the report says so.

Quality is output SQNR against the float TFLite model on held-back samples;
``quant.search.pick_fast_and_accurate`` keeps the fastest unless a nearly-as-fast one is
clearly more accurate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.backends.onnx.session import run_batches
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.tflite.plan import as_hybrid, keep_float
from lowbit.backends.tflite.session import TfliteSession
from lowbit.backends.tflite.writer import write_tflite
from lowbit.data import Dataset
from lowbit.metrics import sqnr_db
from lowbit.quant.plan import QuantizationPlan, Treatment
from lowbit.quant.search import pick_fast_and_accurate
from lowbit.runtime.latency import measure_side_by_side

MIN_GAIN = 1.02  # a layer kept in float must make the whole model at least 2% faster
TIE = 0.97  # a quantized model this close to the float one's speed is as fast (timing noise)
ROUNDS = 15


@dataclass
class Candidate:
    name: str
    plan: QuantizationPlan | None  # None: the float model
    data: bytes
    session: Any = None
    sqnr_db: float = float("inf")
    speedup: float = 0.0


@dataclass
class TfliteChoice:
    name: str
    data: bytes
    plan: QuantizationPlan | None
    rows: list[dict[str, Any]]
    note: str
    seconds: float


def choose_tflite(fm: FloatModel, plan: QuantizationPlan, selection: Dataset, *, batch: int,
                  threads: int, budget_s: float = 20.0, io: str = "float",
                  progress: Callable[[str, int, int], None] | None = None) -> TfliteChoice:
    """Time the candidates (module docstring) and keep one; ``plan`` is a completed
    static INT8 plan (``plan.complete``)."""
    t0 = time.perf_counter()
    feed = selection.feed(batch)

    def make(name: str, p: QuantizationPlan | None) -> Candidate:
        data = write_tflite(fm, p, io=io if p is not None else "float")
        return Candidate(name, p, data, TfliteSession(data, threads=threads, source=name))

    flt = make("float", None)
    reference = run_batches(flt.session, selection)
    static = all(d.treatment is not Treatment.DYNAMIC for d in plan.decisions)
    pool = [flt, make("int8" if static else "the plan as trained", plan)]
    hybrid = as_hybrid(plan)
    if [d.label for d in hybrid.decisions] != [d.label for d in plan.decisions]:
        pool.append(make("dynamic range", hybrid))
    for c in pool[1:]:
        c.sqnr_db = _quality(c.session, selection, reference)
    layers = [n.name for n in plan.nodes_with(Treatment.STATIC) if n.weight is not None]
    helped: list[str] = []
    tried = 0
    for k, layer in enumerate(layers):
        if time.perf_counter() - t0 > 0.6 * budget_s:
            break
        if progress is not None:
            progress("timing TFLite candidates", k + 1, len(layers))
        c = make(f"int8, {layer} float", keep_float(plan, {layer}, "float: faster in LiteRT"))
        c.sqnr_db = _quality(c.session, selection, reference)
        speed = _speeds([flt, pool[1], c], feed, batch, threads)
        tried += 1
        if speed[2] >= MIN_GAIN * speed[1]:
            helped.append(layer)
        c.session = None
    if helped:
        mixed = keep_float(plan, set(helped), "kept float: the whole model ran faster in LiteRT")
        pool.append(make("int8, float where faster", mixed))
        if any(n.weight is not None for n in mixed.nodes.values()):
            pool.append(make("dynamic range, float where faster", as_hybrid(mixed)))
        for c in pool[-2:]:
            c.sqnr_db = _quality(c.session, selection, reference)
    speeds = _speeds(pool, feed, batch, threads, rounds=ROUNDS, min_time_s=1.0)
    for c, s in zip(pool, speeds):
        c.speedup = s
    quantized = pool[1:]
    best = quantized[pick_fast_and_accurate([c.speedup for c in quantized],
                                            [c.sqnr_db for c in quantized])]
    note = f"kept {best.name}: {best.speedup:.2f}x the float TFLite model"
    if TIE <= best.speedup < 1.0:
        note = (f"kept {best.name}: {best.speedup:.2f}x the float TFLite model, as fast within "
                f"timing noise (>= {TIE}x) and {len(flt.data) / len(best.data):.1f}x smaller")
    elif best.speedup < TIE:
        best = flt
        note = ("no quantized TFLite candidate ran faster than the float model in LiteRT "
                f"(best {max(c.speedup for c in quantized):.2f}x): the float model is kept")
    if tried < len(layers):
        note += f"; {len(layers) - tried} of {len(layers)} layers not tried in float (budget)"
    rows = [{"name": c.name, "speedup": round(c.speedup, 3),
             "sqnr_db": None if c.plan is None else round(c.sqnr_db, 2),
             "bytes": len(c.data), "kept": c is best} for c in pool]
    return TfliteChoice(best.name, best.data, best.plan, rows, note,
                        round(time.perf_counter() - t0, 2))


def _quality(session: Any, selection: Dataset, reference: list[np.ndarray]) -> float:
    outs = run_batches(session, selection)
    return float(np.mean([sqnr_db(r, o) for r, o in zip(reference, outs)]))


def _speeds(pool: list[Candidate], feed: dict[str, np.ndarray], batch: int, threads: int,
            rounds: int = 8, min_time_s: float = 0.3) -> list[float]:
    """Speed of each candidate relative to the first (the float model), alternating."""
    stats = measure_side_by_side([c.session for c in pool], [feed] * len(pool), batch=batch,
                                 threads=threads, iterations=rounds, warmup=2,
                                 min_time_s=min_time_s)
    return [stats[0].p50_ms / s.p50_ms if s.p50_ms > 0 else 0.0 for s in stats]
