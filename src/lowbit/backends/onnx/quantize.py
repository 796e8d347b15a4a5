"""INT8 post-training quantization of an ONNX model: plan, calibrate, fill parameters, choose.

The planner (``plan.build_int8_plan``) says which nodes and tensors are
quantized; calibration measures activation ranges; the weight rules and the
chosen calibration method fill every scale and zero point into the plan; the
writer only renders it. With calibration ``auto`` each method's plan is written
and scored on a few calibration samples, and the best output SQNR wins.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.calibrate import run_calibration
from lowbit.backends.onnx.candidates import (
    FLOAT_TIMING_MAX_BYTES,
    MIN_SEARCH_SECONDS,
    SEARCH_SHARE,
    Variant,
    alternatives,
    choose_variant,
    signature,
)
from lowbit.backends.onnx.graph import node_name
from lowbit.backends.onnx.plan import AUTO, build_int8_plan
from lowbit.backends.onnx.session import make_session, run_batches
from lowbit.backends.onnx.speed_probe import slow_int8_convs
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weight_only import plan_embeddings
from lowbit.backends.onnx.weights import weighted_nodes
from lowbit.backends.onnx.writer import write_model
from lowbit.config import Int8Config, QuantMode
from lowbit.data import Dataset
from lowbit.errors import DataError
from lowbit.metrics import sqnr_db
from lowbit.quant import affine, weight_rules
from lowbit.quant.observers import CalibrationMethod, HistogramObserver, select_range
from lowbit.quant.plan import QuantizationPlan, Treatment
from lowbit.quant.scheme import TensorQuantParams
from lowbit.runtime.environment import cpu_info
from lowbit.runtime.memory import release_memory

CONCRETE_METHODS = (CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE,
                    CalibrationMethod.MSE, CalibrationMethod.ENTROPY)
SELECTION_SAMPLES = 64  # calibration samples that score methods and candidates, at most
# ... and at most this many bytes of observed activations run through per model scored
# (at least MIN_SELECTION_SAMPLES): each method and candidate runs them all. A DBNet-style
# detector on 1x3x736x1216 (155 MB a sample; PP-OCRv4's detector 434 MB) scores on 4
# samples, PP-OCRv4's recognizer at 3x48x320 (42 MB) on 12; models up to 8 MB a sample
# (MiniLM at seq 64: 6.8 MB) on 64. With 2 GB, L1 scored on 13 samples, which took longer
# than calibrating on 48 and chose a method within 0.3 dB of the 4-sample choice.
SELECTION_BYTES = 512 * 2**20
MIN_SELECTION_SAMPLES = 4
ProgressFn = Callable[[str, int, int], None]


@dataclass
class Int8Outcome:
    plan: QuantizationPlan
    model: onnx.ModelProto  # the plan written (kept: the search scores it, the run ships it)
    method: CalibrationMethod | None
    method_sqnr_db: dict[str, float] = field(default_factory=dict)
    calibration_samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    variant: Variant | None = None  # what the plan was built with (a rebuild reuses it)
    search: dict[str, Any] = field(default_factory=dict)  # the candidates timed, if any
    # how calibration ran: batch, activation bytes per sample, passes, threads, selection samples
    calibration: dict[str, Any] = field(default_factory=dict)


def selection_size(samples: int, bytes_per_sample: float | None) -> int:
    """How many calibration samples score the calibration methods and the candidates:
    ``SELECTION_SAMPLES``, fewer where their activations pass ``SELECTION_BYTES``."""
    cap = SELECTION_SAMPLES
    if bytes_per_sample:
        cap = min(cap, max(MIN_SELECTION_SAMPLES, int(SELECTION_BYTES // bytes_per_sample)))
    return max(1, min(samples, cap))


def weighted_treatments(mode: QuantMode) -> dict[str, Treatment | str]:
    """What each weighted op type gets in ``mode``.

    auto: Conv is always static (ONNX Runtime's ConvInteger path is several times
    slower than float). A MatMul/Gemm is static when its input is already 8-bit
    (the output of a quantized op, or a graph input): 8-bit data then flows between
    layers with no re-quantization, which measured fastest (QGemm). Otherwise (e.g.
    after LayerNorm or Softmax in a transformer) it is dynamic: the input must be
    quantized anyway, and a per-batch range is more accurate than a calibrated one.
    """
    if mode is QuantMode.STATIC:
        return {"Conv": Treatment.STATIC, "Gemm": Treatment.STATIC, "MatMul": Treatment.STATIC,
                "LSTM": Treatment.FLOAT}
    if mode is QuantMode.DYNAMIC:
        return {"Conv": Treatment.FLOAT, "Gemm": Treatment.DYNAMIC, "MatMul": Treatment.DYNAMIC,
                "LSTM": Treatment.DYNAMIC}
    return {"Conv": Treatment.STATIC, "Gemm": AUTO, "MatMul": AUTO, "LSTM": Treatment.DYNAMIC}


def lacks_vnni() -> bool:
    """True on a CPU known to lack int8 dot-product instructions (see ``weight_bits``)."""
    return cpu_info().get("vnni") is False


def fill_weights(plan: QuantizationPlan, fm: FloatModel, granularity: str, *,
                 reduce_range: bool = False) -> None:
    """Weight parameters (they do not depend on calibration) of every quantized node."""
    bits = weight_rules.weight_bits(reduce_range)
    weighted = {w.name: w for w in weighted_nodes(fm)[0]}
    labels: dict[str, str] = {}
    for item in plan.nodes.values():
        if item.weight is None or item.treatment is Treatment.WEIGHT_ONLY:
            continue  # (an embedding table's group codes are already in the plan)
        if item.recurrence is not None:  # LSTM W and R: one scale per gate channel
            for tensor in (item.weight, item.recurrence):
                values = plan.values_of(tensor, fm.constant)
                plan.tensors[tensor] = affine.weight_params_per_channel(
                    values.reshape(-1, values.shape[-1]), axis=0, bits=bits)
            labels[item.name] = "per-channel" + (", 7-bit range" if reduce_range else "")
            continue
        weight = plan.values_of(item.weight, fm.constant)
        out_axis = weighted[item.name].out_axis
        if item.treatment is Treatment.DYNAMIC:
            params = affine.weight_params_per_channel(weight, axis=out_axis, bits=bits)
        else:
            params = weight_rules.static_weight_params(
                weight, out_axis, per_channel_only=item.op_type == "Conv", granularity=granularity,
                bits=bits)
        plan.tensors[item.weight] = params
        labels[item.name] = weight_rules.granularity_label(params) + \
            (", 7-bit range" if reduce_range else "")
    plan.decisions[:] = [dataclasses.replace(d, weights=labels[d.name]) if d.name in labels
                         else d for d in plan.decisions]


def fill_activations(plan: QuantizationPlan, fm: FloatModel,
                     activations: dict[str, TensorQuantParams]) -> QuantizationPlan:
    """A copy of ``plan`` with these activation parameters and the INT32 biases and
    constant operands that follow from them."""
    out = dataclasses.replace(plan, tensors=dict(plan.tensors))
    out.tensors.update(activations)
    weighted = {w.name: w for w in weighted_nodes(fm)[0]}
    nodes = {node_name(n, i): n for i, n in enumerate(fm.proto.graph.node)}
    initializers = {t.name for t in fm.proto.graph.initializer}
    for item in plan.nodes_with(Treatment.STATIC):
        node = nodes[item.name]
        if item.weight is None:  # constant inputs of an 8-bit elementwise op (e.g. Concat)
            for x in node.input:
                value = fm.constant(x) if x in initializers else None
                if value is not None and value.dtype == np.float32:
                    out.tensors[x] = weight_rules.constant_operand_params(value)
            continue
        if item.bias is None:
            continue
        channels = int(plan.values_of(item.weight, fm.constant).shape[weighted[item.name].out_axis])
        if np.asarray(fm.constant(item.bias)).size == channels:
            out.tensors[item.bias] = weight_rules.bias_params(
                out.activation_params(node.input[0]), out.tensors[item.weight], channels)
    return out


def activation_params_for(observers: dict[str, HistogramObserver], plan: QuantizationPlan,
                          method: CalibrationMethod, *, percentile: float
                          ) -> dict[str, TensorQuantParams]:
    out: dict[str, TensorQuantParams] = {}
    caps = plan.clip_caps
    for tensor in plan.observed:
        lo, hi = select_range(observers[tensor], method, percentile=percentile)
        if tensor in caps:
            lo, hi = max(lo, caps[tensor][0]), min(hi, caps[tensor][1])
        out[tensor] = affine.activation_params(lo, hi)
    return out


def quantize_int8(fm: FloatModel, calibration: Dataset, config: Int8Config, *,
                  progress: ProgressFn | None = None, threads: int = 1, batch: int = 8,
                  variant: Variant | None = None) -> Int8Outcome:
    """Plan, calibrate and write INT8 quantization of a normalised float model.

    In auto mode (and no ``variant`` given) the plausible variants are written and timed
    whole (``candidates.choose_variant``); ``variant`` rebuilds a chosen one."""
    t0 = time.perf_counter()
    reduce_range = config.reduce_range if config.reduce_range is not None else \
        lacks_vnni()

    tables: dict[str, Any] = {}  # embedding codes, computed once for every variant

    def make_plan(v: Variant) -> QuantizationPlan:
        plan = build_int8_plan(fm, treatments=v.treatments, exclude=config.exclude_nodes,
                               keep_float=v.keep_float, strict=config.strict)
        plan.metadata.update({"mode": config.mode.value, "reduce_range": reduce_range,
                              "variant": v.name, "treatments": {
                                  k: getattr(t, "value", t) for k, t in v.treatments.items()}})
        if config.embeddings:
            plan_embeddings(fm, plan, bits=8, group_size=128, exclude=config.exclude_nodes,
                            cache=tables)
        fill_weights(plan, fm, config.weight_granularity.value, reduce_range=reduce_range)
        return plan

    first = variant or Variant(config.mode.value, weighted_treatments(config.mode))
    plan = make_plan(first)
    seconds: dict[str, float] = {"plan": time.perf_counter() - t0}
    warnings: list[str] = []
    if not plan.nodes_with(Treatment.STATIC, Treatment.DYNAMIC):
        warnings.append("no operator was quantized; the output equals the input model")
    calib = calibration.take(0, min(calibration.num_samples, config.max_calibration_samples))
    total, done = calib.num_samples, [0]

    def step(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress("calibrating", done[0], total)

    # auto's other variants are planned before calibrating: one pass observes them all
    others: list[tuple[Variant, QuantizationPlan]] = []
    if variant is None and config.mode is QuantMode.AUTO and config.search_time != 0:
        others = [(alt, make_plan(alt)) for alt in alternatives()]
    observed = list(dict.fromkeys(plan.observed + [t for _, p in others for t in p.observed]))
    t1 = time.perf_counter()
    run = run_calibration(fm, calib, observed, batch_size=config.batch_size, threads=threads,
                          progress=step) if observed else None
    observers = run.observers if run is not None else {}
    release_memory()
    seconds["calibrate"] = time.perf_counter() - t1
    nonfinite = sorted(t for t, o in observers.items() if o.nonfinite)
    if nonfinite:
        raise DataError(f"{calibration.source}: the float model produces NaN/inf in tensor(s) "
                        f"{', '.join(nonfinite[:5])} on the calibration data")
    plans = [(first, plan)]
    if variant is None and config.mode is QuantMode.AUTO:
        t_probe = time.perf_counter()
        slow = slow_int8_convs(fm, [n.name for n in plan.nodes_with(Treatment.STATIC)
                                    if n.op_type == "Conv"], observers, threads)
        seconds["speed_probe"] = time.perf_counter() - t_probe
        if slow:
            first = Variant("auto", first.treatments, slow)
            plans = [(first, make_plan(first))]
        seen = {signature(plans[0][1])}
        for alt, alt_plan in others:
            if signature(alt_plan) not in seen and alt_plan.nodes_with(Treatment.STATIC,
                                                                       Treatment.DYNAMIC):
                seen.add(signature(alt_plan))
                plans.append((alt, alt_plan))
        missing = sorted({t for _, p in plans for t in p.observed} - set(observers))
        if missing:
            observers.update(run_calibration(fm, calib, missing, batch_size=config.batch_size,
                                             threads=threads).observers)
    del others
    t2 = time.perf_counter()
    selection = calib.take(0, selection_size(
        calib.num_samples, run.bytes_per_sample if run is not None else None))
    # float outputs on a few samples: scores calibration methods and candidates alike
    # untimed work runs at the threads the calibration runs measured fastest
    work = run.threads if run is not None else threads
    reference = _outputs(make_session(fm, threads=work, lean=True), selection,
                         config.batch_size) if len(plans) > 1 or (
        config.calibration is CalibrationMethod.AUTO and plan.observed) else None
    release_memory()
    chosen: CalibrationMethod | None = None
    scores: dict[str, float] = {}
    filled = []
    for k, (v, p) in enumerate(plans):
        if not p.observed:
            filled.append((v, p))
        elif k == 0:
            chosen, scores, best = _choose_method(fm, p, observers, selection, config, work,
                                                  progress, reference)
            filled.append((v, best))
        else:
            method = chosen or (config.calibration if config.calibration is not
                                CalibrationMethod.AUTO else CalibrationMethod.MINMAX)
            filled.append((v, fill_activations(p, fm, activation_params_for(
                observers, p, method, percentile=config.percentile))))
    for _, p in filled:
        if chosen is not None:
            p.metadata["calibration"] = chosen.value
    seconds["choose_and_write"] = time.perf_counter() - t2
    search: dict[str, Any] = {}
    index, model = 0, None
    if len(filled) > 1:
        budget = config.search_time if config.search_time is not None else max(
            MIN_SEARCH_SECONDS, SEARCH_SHARE * (time.perf_counter() - t0))
        known = {0: scores[chosen.value]} if chosen is not None and chosen.value in scores else {}
        found = choose_variant(fm, filled, calib, selection, reference or [], known,
                               batch=batch, threads=threads, budget_s=budget, progress=progress)
        index, model = found.index, found.model
        seconds["search"] = found.seconds
        search = {"batch": batch, "threads": threads, "budget_seconds": round(budget, 2),
                  "seconds": found.seconds, "iterations": found.iterations,
                  "candidates": found.rows}
    v, best = filled[index]
    info: dict[str, Any] = {}
    if run is not None:
        info = {"batch": run.batch, "passes": run.passes, "threads": run.threads,
                "activation_mb_per_sample": round(run.bytes_per_sample / 2**20, 3),
                "selection_samples": selection.num_samples}
    return Int8Outcome(best, model if model is not None else write_model(fm, best), chosen,
                       scores, total if best.observed else 0, seconds, warnings, v, search, info)


def _choose_method(fm: FloatModel, plan: QuantizationPlan, observers: dict[str, HistogramObserver],
                   selection: Dataset, config: Int8Config, threads: int,
                   progress: ProgressFn | None, reference: list[np.ndarray] | None = None
                   ) -> tuple[CalibrationMethod, dict[str, float], QuantizationPlan]:
    """The calibration method whose plan gives the best output SQNR on ``selection`` (a
    few calibration samples; ``reference``: the float model's outputs on them).

    Each candidate is written, run and dropped (one candidate in memory at a time).
    ``threads``: of these untimed runs (the calibration's, ``CalibrationRun.threads``)."""
    methods = list(CONCRETE_METHODS) if config.calibration is CalibrationMethod.AUTO \
        else [config.calibration]

    def plan_for(method: CalibrationMethod) -> QuantizationPlan:
        acts = activation_params_for(observers, plan, method, percentile=config.percentile)
        return fill_activations(plan, fm, acts)

    if len(methods) == 1:
        return methods[0], {}, plan_for(methods[0])
    if reference is None:
        reference = _outputs(make_session(fm, threads=threads, lean=True), selection,
                             config.batch_size)
        release_memory()
    scores: dict[str, float] = {}
    candidates: list[tuple[float, CalibrationMethod, QuantizationPlan]] = []
    # without pre-packing a big model's candidates need no second copy of their weights;
    # a small one's run 1.5x faster with it (QLinearConv of a DBNet-style detector)
    lean = sum(w.nbytes for w in fm.weights.values()) > FLOAT_TIMING_MAX_BYTES
    for k, method in enumerate(methods):
        candidate = plan_for(method)
        serialized = write_model(fm, candidate).SerializeToString()
        session = make_session(serialized, threads=threads, name="quantized candidate", lean=lean)
        del serialized
        outs = _outputs(session, selection, config.batch_size)
        del session
        release_memory()
        score = float(np.mean([sqnr_db(r, o) for r, o in zip(reference, outs)]))
        del outs
        scores[method.value] = round(score, 3)
        candidates.append((score, method, candidate))
        if progress is not None:
            progress("choosing calibration", k + 1, len(methods))
    _, method, best = max(candidates, key=lambda c: c[0])  # the first of equal scores
    return method, scores, best


def _outputs(session: Any, data: Dataset, batch_size: int) -> list[np.ndarray]:
    """The outputs as they come (float32: SQNR sums in float64 chunk by chunk)."""
    return run_batches(session, data, batch_size)
