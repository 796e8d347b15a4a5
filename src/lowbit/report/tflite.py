"""Verify a TFLite file in LiteRT next to the float TFLite model and the ONNX models:
agreement, accuracy, output SQNR, and latency timed side by side in one alternating run."""

from __future__ import annotations

from typing import Any

import onnx

from lowbit.backends.onnx.session import make_session, run_batches
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.tflite.session import TfliteSession
from lowbit.backends.tflite.writer import write_tflite
from lowbit.data import Dataset
from lowbit.metrics import accuracy, sqnr_db, top1_agreement
from lowbit.runtime.latency import measure_side_by_side

TIMING_ROUNDS = 30


def verify_tflite(fm: FloatModel, content: bytes, held: Dataset, *, batch: int, threads: int,
                  onnx_int8: onnx.ModelProto | None = None) -> dict[str, Any]:
    """Run ``content`` on ``held`` in LiteRT and compare (see module docstring)."""
    models: dict[str, Any] = {
        "tflite": TfliteSession(content, threads=threads, source="the TFLite output"),
        "float tflite": TfliteSession(write_tflite(fm), threads=threads, source="float TFLite"),
        "float onnx": make_session(fm, threads=threads, name="float ONNX model"),
    }
    if onnx_int8 is not None:
        models["int8 onnx"] = make_session(onnx_int8, threads=threads, name="INT8 ONNX model")
    outs = {k: run_batches(s, held) for k, s in models.items()}
    ref = outs["float onnx"][0]
    mine = outs["tflite"][0]
    out: dict[str, Any] = {
        "samples": held.num_samples, "source": held.source,
        "loads_and_runs_in_litert": True,
        "sqnr_db_vs_float": round(float(sqnr_db(ref, mine)), 2),
        "agreement": {k: _round(top1_agreement(o[0], mine)) for k, o in outs.items()
                      if k != "tflite"},
    }
    if held.labels is not None:
        out["accuracy"] = {k: _round(accuracy(o[0], held.labels)) for k, o in outs.items()}
    names = list(models)
    feed = held.feed(batch)
    stats = measure_side_by_side([models[k] for k in names], [feed] * len(names), batch=batch,
                                 threads=threads, iterations=TIMING_ROUNDS, warmup=3,
                                 min_time_s=1.0)
    p50 = {k: s.p50_ms for k, s in zip(names, stats)}
    out["latency"] = {
        "batch": batch, "threads": threads, "p50_ms": {k: round(v, 4) for k, v in p50.items()},
        "speedup_vs_float_tflite": round(p50["float tflite"] / p50["tflite"], 3),
        "speedup_vs_float_onnx": round(p50["float onnx"] / p50["tflite"], 3),
    }
    out["float_tflite_bytes"] = len(models["float tflite"].content)
    out["size_ratio_vs_float_tflite"] = round(len(content) / out["float_tflite_bytes"], 4)
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)



