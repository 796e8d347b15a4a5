"""INT8 post-training quantization of an ONNX model: plan, calibrate, choose, write."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from lowbit.data import Dataset
from lowbit.errors import DataError
from lowbit.onnx.calibrate import calibrate
from lowbit.onnx.graph import GraphIndex
from lowbit.onnx.plan import QuantPlan, Treatment, build_plan
from lowbit.onnx.qdq import write_quantized
from lowbit.onnx.store import FloatModel
from lowbit.quant import affine
from lowbit.quant.observers import HistogramObserver, select_range
from lowbit.quant.scheme import CalibrationMethod, QuantizeConfig, QuantMode, TensorQuantParams
from lowbit.report.metrics import sqnr_db
from lowbit.runtime.memory import release_memory
from lowbit.runtime.session import make_session, run_batches

CONCRETE_METHODS = (CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE,
                    CalibrationMethod.MSE, CalibrationMethod.ENTROPY)
SELECTION_SAMPLES = 64


@dataclass
class QuantizeOutcome:
    model: onnx.ModelProto
    plan: QuantPlan
    treatments: dict[str, str]
    method: CalibrationMethod | None
    method_sqnr_db: dict[str, float] = field(default_factory=dict)
    calibration_samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def weighted_treatments(model: onnx.ModelProto, mode: QuantMode) -> dict[str, str]:
    """What each weighted op type gets in ``mode``.

    auto: Conv is always static (ONNX Runtime's ConvInteger path is several times
    slower than float). A MatMul/Gemm is static when its input is already 8-bit
    (the output of a quantized op, or a graph input): 8-bit data then flows
    between layers with no re-quantization, which measured fastest (QGemm).
    Otherwise (e.g. after LayerNorm or Softmax in a transformer) it is dynamic:
    the input must be quantized anyway, and a per-batch range is more accurate
    than a calibrated one. The rule is fixed, so the output is deterministic.
    """
    if mode is QuantMode.STATIC:
        return {"Conv": Treatment.STATIC, "Gemm": Treatment.STATIC, "MatMul": Treatment.STATIC}
    if mode is QuantMode.DYNAMIC:
        return {"Conv": Treatment.FLOAT, "Gemm": Treatment.DYNAMIC, "MatMul": Treatment.DYNAMIC}
    return {"Conv": Treatment.STATIC, "Gemm": Treatment.AUTO, "MatMul": Treatment.AUTO}


def activation_params_for(
    observers: dict[str, HistogramObserver],
    plan: QuantPlan,
    method: CalibrationMethod,
    *,
    percentile: float,
    clip_caps: dict[str, tuple[float, float]],
) -> dict[str, TensorQuantParams]:
    out: dict[str, TensorQuantParams] = {}
    for tensor in plan.observed:
        lo, hi = select_range(observers[tensor], method, percentile=percentile)
        if tensor in clip_caps:
            cap_lo, cap_hi = clip_caps[tensor]
            lo, hi = max(lo, cap_lo), min(hi, cap_hi)
        out[tensor] = affine.activation_params(lo, hi)
    return out


def _slow_int8_convs(model: FloatModel, plan: QuantPlan,
                     observers: dict[str, HistogramObserver], threads: int) -> dict[str, str]:
    """Convs that measured clearly slower in INT8 than in float, with the reason."""
    from lowbit.onnx.plan import node_name
    from lowbit.onnx.speed_probe import PROBE_MAX_REDUCTION, SLOWER_FACTOR, conv_int8_slowdown

    static = set(plan.static_nodes)
    index = GraphIndex(model.proto, model.weights)
    slow: dict[str, str] = {}
    for i, node in enumerate(model.proto.graph.node):
        name = node_name(node, i)
        if node.op_type != "Conv" or name not in static:
            continue
        weight = index.constant(node.input[1])
        obs = observers.get(node.input[0])
        if weight is None or obs is None or obs.batch_shape is None:
            continue
        if int(np.prod(weight.shape[1:])) > PROBE_MAX_REDUCTION:
            continue
        bias = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        ratio, t_float, t_int8 = conv_int8_slowdown(node, weight, bias, obs.batch_shape,
                                                    threads=threads)
        if ratio > SLOWER_FACTOR:
            slow[name] = (f"auto: INT8 measured {ratio:.2f}x slower than float for this Conv "
                          f"on this CPU ({t_int8:.3f} vs {t_float:.3f} ms at input "
                          f"{list(obs.batch_shape)})")
    return slow


def _outputs(session: Any, data: Dataset, batch_size: int) -> list[np.ndarray]:
    return [o.astype(np.float64) for o in run_batches(session, data, batch_size)]


def quantize_onnx(
    model: FloatModel,
    calibration: Dataset,
    config: QuantizeConfig,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    threads: int = 1,
) -> QuantizeOutcome:
    """Quantize a normalised float ONNX model with ``calibration`` data."""
    t0 = time.perf_counter()
    treatments = weighted_treatments(model.proto, config.mode)
    plan = build_plan(model.proto, weighted_treatment=treatments, exclude=config.exclude_nodes,
                      strict=config.strict, weights=model.weights)
    seconds: dict[str, float] = {"plan": time.perf_counter() - t0}
    warnings: list[str] = []
    if not plan.static_nodes and not plan.dynamic_nodes:
        warnings.append("no operator was quantized; the output equals the input model")
    needs_calibration = bool(plan.observed)
    meta = {"mode": config.mode.value, "treatments": treatments}
    if not needs_calibration:
        qmodel = write_quantized(model, plan, {}, granularity=config.weight_granularity, metadata=meta)
        return QuantizeOutcome(qmodel, plan, treatments, None, {}, 0, seconds, warnings)

    calib = calibration.take(0, min(calibration.num_samples, config.max_calibration_samples))
    total = calib.num_samples
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress("calibrating", done[0], total)

    t1 = time.perf_counter()
    observers = calibrate(model, calib, plan.observed, batch_size=config.batch_size,
                          threads=threads, progress=step)
    release_memory()
    seconds["calibrate"] = time.perf_counter() - t1
    nonfinite = sorted(t for t, o in observers.items() if o.nonfinite)
    if nonfinite:
        raise DataError(
            f"{calibration.source}: the float model produces NaN/inf in tensor(s) "
            f"{', '.join(nonfinite[:5])} on the calibration data"
        )
    if config.mode is QuantMode.AUTO:
        slow = _slow_int8_convs(model, plan, observers, threads)
        if slow:
            plan = build_plan(model.proto, weighted_treatment=treatments,
                              exclude=config.exclude_nodes, keep_float=slow, strict=config.strict,
                              weights=model.weights)
            missing = [t for t in plan.observed if t not in observers]
            if missing:
                observers.update(calibrate(model, calib, missing, batch_size=config.batch_size,
                                           threads=threads))
            if not plan.observed:
                qmodel = write_quantized(model, plan, {}, granularity=config.weight_granularity,
                                         metadata=meta)
                return QuantizeOutcome(qmodel, plan, treatments, None, {}, total, seconds, warnings)
    methods = list(CONCRETE_METHODS) if config.calibration is CalibrationMethod.AUTO \
        else [config.calibration]
    scores: dict[str, float] = {}
    t2 = time.perf_counter()
    chosen = methods[0]
    if len(methods) > 1:
        # Each candidate is written, run on a few calibration samples and dropped;
        # only the winner is written again at the end (memory: one candidate at a time).
        selection = calib.take(0, min(total, SELECTION_SAMPLES))
        reference = _outputs(make_session(model, threads=threads, lean=True), selection,
                             config.batch_size)
        release_memory()
        best_score = -np.inf
        for k, method in enumerate(methods):
            params = activation_params_for(observers, plan, method, percentile=config.percentile,
                                           clip_caps=plan.clip_caps)
            candidate = write_quantized(model, plan, params, granularity=config.weight_granularity,
                                        infer_shapes=False)
            serialized = candidate.SerializeToString()
            del candidate  # one copy of the candidate at a time
            session = make_session(serialized, threads=threads, name="quantized candidate",
                                   lean=True)
            del serialized
            outs = _outputs(session, selection, config.batch_size)
            del session
            release_memory()
            score = float(np.mean([sqnr_db(r, o) for r, o in zip(reference, outs)]))
            scores[method.value] = round(score, 3)
            if score > best_score:
                best_score, chosen = score, method
            if progress is not None:
                progress("choosing calibration", k + 1, len(methods))
    params = activation_params_for(observers, plan, chosen, percentile=config.percentile,
                                   clip_caps=plan.clip_caps)
    release_memory()
    # No shape inference on the result: ONNX Runtime does not need stored shapes, and
    # it would hold two more copies of the model at the memory peak.
    qmodel = write_quantized(model, plan, params, granularity=config.weight_granularity,
                             metadata={**meta, "calibration": chosen.value}, infer_shapes=False)
    seconds["choose_and_write"] = time.perf_counter() - t2
    return QuantizeOutcome(qmodel, plan, treatments, chosen, scores, total, seconds, warnings)
