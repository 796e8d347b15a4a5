"""The verification every compressed model gets: checker, runtime, agreement, latency.

The result is a plain dict (the ``verification`` and ``latency`` parts of
``OUT.report.json``) plus flags that say plainly when quality dropped or when the
compressed model is not faster, with the reason found.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.graph import outputs_class_scores
from lowbit.backends.onnx.session import (
    input_specs,
    make_session,
    op_counts,
    optimized_graph,
    run_batches,
    unfused_qdq,
)
from lowbit.data import Dataset, synthetic_dataset
from lowbit.metrics import accuracy, mean_cosine, sqnr_db, top1_agreement
from lowbit.report.inspect import INTEGER_OPS
from lowbit.report.speed import speedup_text, stored_ratio
from lowbit.runtime.environment import cpu_info
from lowbit.runtime.latency import measure_side_by_side

# A degradation beyond any of these is flagged in the report.
MIN_TOP1_AGREEMENT = 0.98
MIN_SQNR_DB = 15.0
MAX_ACCURACY_DROP_POINTS = 1.0
# Without data, outputs are compared on seeded random inputs, far from the real data:
# a miss there is "unverified", and a collapse (agreement or cosine this low) a degradation.
SYNTHETIC_SAMPLES = 64
COLLAPSE_TOP1_AGREEMENT = 0.5
COLLAPSE_COSINE = 0.9
TIMING_SECONDS = 10.0  # the latency comparison lasts about this long (at least 5 runs each)
SYNTHETIC_SOURCE = ("synthetic: 64 seeded random inputs from the model's input spec (no data "
                    "given; pass --eval-data for a real check)")


def check_model(model: onnx.ModelProto) -> str:
    """'passed', or the first line of what the full ONNX checker objects to."""
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        return "failed: " + (str(exc).strip().splitlines() or ["?"])[0][:300]
    return "passed"


def agreement(reference: list[np.ndarray], approx: list[np.ndarray],
              labels: np.ndarray | None, class_scores: bool = True) -> dict[str, Any]:
    """SQNR and cosine always; top-1 agreement only for class scores (or with labels)."""
    ref, app = reference[0], approx[0]  # (float64 row by row: no copies of big outputs)
    out: dict[str, Any] = {
        "samples": int(ref.shape[0]),
        "sqnr_db": round(float(np.mean([sqnr_db(r, a) for r, a in zip(reference, approx)])), 3),
        "cosine": round(mean_cosine(ref, app), 6),
        "top1_agreement": top1_agreement(ref, app) if class_scores or labels is not None
        else None,
    }
    if labels is not None:
        acc_f, acc_q = accuracy(ref, labels), accuracy(app, labels)
        if acc_f is not None and acc_q is not None:
            out["accuracy"] = {"float": round(acc_f, 6), "compressed": round(acc_q, 6),
                               "drop_points": round(100.0 * (acc_f - acc_q), 3)}
    return out


def speed_reasons(model: onnx.ModelProto, optimized: onnx.ModelProto | None = None) -> list[str]:
    """Causes found for a compressed model not being faster than float (``optimized``:
    the graph ONNX Runtime runs, to find QDQ patterns it did not fuse)."""
    reasons = []
    ops = Counter(n.op_type for n in model.graph.node)
    if ops.get("ConvInteger"):
        reasons.append(f"{ops['ConvInteger']} Conv(s) use dynamic INT8 (ConvInteger), which "
                       "ONNX Runtime runs several times slower than float Conv")
    unfused = unfused_qdq(optimized) if optimized is not None else []
    if unfused:
        reasons.append(f"{len(unfused)} QDQ pattern(s) were not fused into integer kernels by "
                       f"ONNX Runtime (e.g. {', '.join(unfused[:3])}); they run in float plus "
                       "(de)quantization")
    integer = any(n.op_type in INTEGER_OPS or n.domain == "com.microsoft" or
                  n.op_type == "DequantizeLinear" for n in model.graph.node)
    if integer and cpu_info().get("vnni") is False:
        reasons.append("this CPU has no VNNI (int8 dot-product) instructions")
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        decisions = json.loads(meta.get("lowbit.decisions", "[]"))
    except ValueError:
        decisions = []
    kept = [d for d in decisions if d.get("treatment") == "float"
            and d.get("op_type") in ("Conv", "Gemm", "MatMul")]
    if kept:
        first = kept[0]
        reasons.append(f"{len(kept)} Conv/Gemm/MatMul op(s) stay in float (e.g. "
                       f"{first.get('name')}: {first.get('reason')})")
    return reasons


def verify(
    float_model: Any,
    compressed: onnx.ModelProto,
    holdout: Dataset | None,
    *,
    threads: int = 1,
    batch: int = 8,
    iterations: int = 50,
    quantized: bool = True,
    claims_speed: bool = True,
    timed: bool = True,
) -> dict[str, Any]:
    """Check, run, compare and time ``compressed`` against ``float_model``.

    Without ``holdout`` data there is no agreement, and the timing uses seeded
    synthetic inputs. ``quantized``: flag a low output SQNR (a pruned model's outputs
    may move far and still classify alike, so only agreement/accuracy flag it);
    ``claims_speed``: flag a result that is not faster (a model with the original's
    operators and shapes is not expected to be); ``timed``: time the two models (a model
    left as it was is not). The timing lasts about ``TIMING_SECONDS`` (5 to
    ``iterations`` runs of each): a 1-second model is not run a hundred times."""
    result: dict[str, Any] = {"checker": check_model(compressed)}
    sess_f = make_session(float_model, threads=threads, name="float model")
    sess_q, optimized = optimized_graph(compressed, threads=threads)  # one session for both
    result["runtime"] = "onnxruntime loads and runs it"
    synthetic = holdout is None
    compared = holdout if holdout is not None else synthetic_dataset(
        input_specs(sess_f), SYNTHETIC_SAMPLES, seed=1, source=SYNTHETIC_SOURCE)
    ref, app = run_batches(sess_f, compared), run_batches(sess_q, compared)
    shapes_ok = [r.shape == a.shape for r, a in zip(ref, app)] + [len(ref) == len(app)]
    if all(shapes_ok):  # outputs of other shapes cannot be compared
        proto = float_model.proto if hasattr(float_model, "proto") else float_model
        scores = not isinstance(proto, onnx.ModelProto) or outputs_class_scores(proto)
        result["agreement"] = agreement(ref, app, compared.labels, class_scores=scores)
        result["agreement"]["source"] = compared.source
        result["agreement"]["samples"] = compared.num_samples  # (rows may be more: whole samples)
    feed = compared.feed(batch)
    batch = compared.rows_per_run(batch)  # the model's own, if it fixes one (lowbit.layouts)
    speedup = 1.0
    if timed:
        runs, warmup = _timing_runs([sess_f, sess_q], feed, iterations)
        stats = measure_side_by_side([sess_f, sess_q], [feed, feed], batch=batch,
                                     threads=threads, iterations=runs, warmup=warmup,
                                     min_time_s=0.5)
        speedup = stats[0].p50_ms / stats[1].p50_ms if stats[1].p50_ms > 0 else float("inf")
        result["latency"] = {"batch": batch, "threads": threads, "float": stats[0].to_dict(),
                             "compressed": stats[1].to_dict(), "speedup": stored_ratio(speedup)}
    else:
        result["latency_note"] = "not timed: nothing was quantized or compressed"
    result["runtime_ops"] = dict(op_counts(optimized))
    flags: list[dict[str, str]] = []
    if not all(shapes_ok):
        flags.append({"kind": "shape", "message": "an output's shape differs from the float model's"})
    if result["checker"] != "passed":
        flags.append({"kind": "checker", "message": f"ONNX checker {result['checker']}"})
    ag = result.get("agreement", {"top1_agreement": None, "sqnr_db": float("inf")})
    quality = _quality_flags(ag, quantized)
    if synthetic:
        quality = _synthetic(ag, quality)
    flags += quality
    if timed and claims_speed and speedup < 1.0:
        reasons = speed_reasons(compressed, optimized) or [
            "no specific cause found: the model is likely too small for integer kernels to "
            "pay for quantizing its inputs and dequantizing its outputs"]
        flags.append({"kind": "not_faster",
                      "message": f"the compressed model is NOT faster than float here "
                                 f"({speedup_text(speedup)} at batch {batch}, {threads} "
                                 "thread(s)): "
                                 + "; ".join(reasons)})
    result["flags"] = flags
    return result


def _timing_runs(sessions: list[Any], feed: dict[str, np.ndarray], iterations: int
                 ) -> tuple[int, int]:
    """(runs of each model, warm-up runs) for a comparison of about ``TIMING_SECONDS``."""
    start = time.perf_counter()
    for session in sessions:
        session.run(None, feed)
    once = max(time.perf_counter() - start, 1e-6)
    runs = int(min(iterations, max(5, TIMING_SECONDS / once)))
    return runs, 5 if runs == iterations else 1


def _quality_flags(ag: dict[str, Any], quantized: bool) -> list[dict[str, str]]:
    flags = []
    if ag["top1_agreement"] is not None and ag["top1_agreement"] < MIN_TOP1_AGREEMENT:
        flags.append({"kind": "degradation",
                      "message": f"top-1 agreement with float is {ag['top1_agreement']:.3f} "
                                 f"(< {MIN_TOP1_AGREEMENT})"})
    if quantized and ag["sqnr_db"] < MIN_SQNR_DB:
        flags.append({"kind": "degradation",
                      "message": f"output SQNR is {ag['sqnr_db']:.1f} dB (< {MIN_SQNR_DB} dB)"})
    if "accuracy" in ag and ag["accuracy"]["drop_points"] > MAX_ACCURACY_DROP_POINTS:
        flags.append({"kind": "degradation",
                      "message": f"accuracy dropped {ag['accuracy']['drop_points']:.2f} points "
                                 f"(> {MAX_ACCURACY_DROP_POINTS})"})
    return flags


def _synthetic(ag: dict[str, Any], flags: list[dict[str, str]]) -> list[dict[str, str]]:
    """On synthetic inputs (no data), far from the real data, a miss of the usual targets
    says only that the quality is unknown ("unverified"); a collapse (arg-max agreement
    or cosine very low) is a degradation on any data."""
    if not flags:
        return []
    top1, cosine = ag.get("top1_agreement"), ag.get("cosine")
    collapsed = (top1 is not None and top1 < COLLAPSE_TOP1_AGREEMENT) or \
        (cosine is not None and cosine < COLLAPSE_COSINE)
    what = "; ".join(f["message"] for f in flags)
    if collapsed:
        return [{"kind": "degradation",
                 "message": f"{what} on synthetic inputs (no data given): the outputs have "
                            "collapsed; check the model on real data (--eval-data)"}]
    return [{"kind": "unverified",
             "message": f"{what} on synthetic inputs (no data given); whether accuracy "
                        "dropped is unknown: check the model on real data (--eval-data)"}]
