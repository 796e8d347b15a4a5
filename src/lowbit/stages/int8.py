"""INT8 quantization stage, with the quality-target search (SmoothQuant, then the
fewest layers back to float)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lowbit.backends.onnx.quantize import Int8Outcome, quantize_int8
from lowbit.backends.onnx.scoring import (
    accuracy_points,
    output_cosine,
    reference_outputs,
    sqnr_of,
)
from lowbit.config import Int8Config, QuantMode
from lowbit.data import Dataset
from lowbit.errors import DataError
from lowbit.metrics import accuracy
from lowbit.quant.plan import Treatment
from lowbit.quant.search import SearchResult, meet_quality_target
from lowbit.runtime.environment import cpu_info
from lowbit.runtime.memory import release_memory
from lowbit.stages.base import RunContext, register

SMOOTHQUANT_ALPHAS = (0.5, 0.7, 0.85)
SMOOTHQUANT_MIN_GAIN_DB = 1.0  # default SmoothQuant (no quality target) must buy this much
SMOOTHQUANT_GOOD_ENOUGH_DB = 30.0  # ... and is not tried on a model already this accurate


@register(Int8Config)
def int8_stage(config: Int8Config, ctx: RunContext) -> dict[str, Any]:
    ctx.check_node_names(config.exclude_nodes, "exclude_nodes")
    calib = ctx.require_train("quantization").take(0, config.max_calibration_samples)
    outcome = quantize_int8(ctx.fm, calib, config, progress=ctx.progress, threads=ctx.threads,
                            batch=ctx.batch)
    if config.has_quality_target:
        outcome = _meet_target(ctx, calib, config, outcome)
    elif config.smoothquant and config.search_time != 0 and \
            outcome.plan.nodes_with(Treatment.DYNAMIC) and not outcome.plan.observed:
        # (a plan with static activations would be calibrated again for every alpha)
        outcome = _smooth_if_better(ctx, calib, config, outcome)
    ctx.plan, ctx.written = outcome.plan, outcome.model
    ctx.warnings.extend(_dynamic_nothing(outcome.warnings, outcome, config))
    ctx.seconds.update({k: round(v, 3) for k, v in outcome.seconds.items()})
    ctx.sections["mode_by_op"] = outcome.plan.metadata.get("treatments", {})
    if outcome.plan.metadata.get("reduce_range"):
        why = (": this CPU has no VNNI, and ONNX Runtime's UINT8 x INT8 kernels can saturate "
               "there otherwise" if cpu_info().get("vnni") is False else " (reduce_range)")
        ctx.notes.append("INT8 weights use the 7-bit range [-63, 63]" + why)
    if cpu_info().get("amx_int8"):
        ctx.notes.append("this CPU has AMX int8 tiles; ONNX Runtime's MLAS uses them for the "
                         "INT8 matrix products")
    if outcome.search:
        ctx.sections["candidates"] = outcome.search
    ctx.sections["calibration"] = {
        "method": outcome.method.value if outcome.method else None,
        "requested": config.calibration.value,
        "sqnr_db_by_method": outcome.method_sqnr_db,
        "samples": outcome.calibration_samples,
        "source": calib.source,
        **outcome.calibration,  # batch, passes, threads, activation MB per sample, selection samples
    }
    return {"mode": config.mode.value}


def _dynamic_nothing(warnings: list[str], outcome: Int8Outcome, config: Int8Config) -> list[str]:
    """``warnings``, with a dynamic run that quantized nothing said in one line that
    points to static mode (instead of the generic "no operator was quantized")."""
    if config.mode is not QuantMode.DYNAMIC or outcome.plan.nodes_with(
            Treatment.STATIC, Treatment.DYNAMIC, Treatment.WEIGHT_ONLY):
        return warnings
    convs = sum(1 for d in outcome.plan.decisions if d.op_type == "Conv")
    what = f"not the model's {convs} Conv(s), which ONNX Runtime runs slower as ConvInteger" \
        if convs else "and nothing else in this model"
    return [w for w in warnings if not w.startswith("no operator was quantized")] + [
        "nothing could be quantized dynamically: dynamic INT8 covers MatMul/Gemm, LSTM and "
        f"embeddings, {what}; use --mode static"]


def _smooth_if_better(ctx: RunContext, calib: Dataset, config: Int8Config,
                      first: Int8Outcome) -> Int8Outcome:
    """Without a quality target, where the output SQNR on calibration samples is below
    ``SMOOTHQUANT_GOOD_ENOUGH_DB``: the chosen variant is rebuilt on SmoothQuant copies (each
    alpha of ``SMOOTHQUANT_ALPHAS``); the most accurate is kept when its output SQNR is at
    least ``SMOOTHQUANT_MIN_GAIN_DB`` better and, timed beside the unsmoothed model, it
    is at most 5% slower (the inserted Muls cost time)."""
    from lowbit.backends.onnx.candidates import relative_speeds
    from lowbit.backends.onnx.smoothquant import smooth, smoothing_statistics

    kept = [r.get("sqnr_db") for r in first.search.get("candidates", []) if r.get("kept")]
    if kept and kept[0] is not None and kept[0] >= SMOOTHQUANT_GOOD_ENOUGH_DB:
        return first  # (the candidate search measured it already)
    selection = calib.take(0, 64)
    reference = reference_outputs(ctx.fm, selection, threads=ctx.threads)
    base_db = sqnr_of(first.model, selection, reference)
    if base_db >= SMOOTHQUANT_GOOD_ENOUGH_DB:  # nothing worth its time and memory to gain
        return first
    stats = smoothing_statistics(ctx.fm, calib, threads=ctx.threads)
    if not stats:
        return first
    tried: dict[float, float] = {}
    n_inputs = 0
    for alpha in SMOOTHQUANT_ALPHAS:  # one smoothed copy alive at a time (memory)
        smoothed, n_inputs = smooth(ctx.fm, calib, alpha=alpha, statistics=stats)
        candidate = quantize_int8(smoothed, calib, config, threads=ctx.threads,
                                  variant=first.variant)
        tried[alpha] = round(sqnr_of(candidate.model, selection, reference), 2)
        del smoothed, candidate
        release_memory()
    alpha = max(tried, key=lambda a: tried[a])
    db = tried[alpha]
    section: dict[str, Any] = {"inputs": n_inputs, "sqnr_db_without": round(base_db, 2),
                               "sqnr_db_by_alpha": tried, "alpha": None, "kept": False}
    ctx.sections["smoothquant"] = section
    if db < base_db + SMOOTHQUANT_MIN_GAIN_DB:
        return first
    smoothed, _ = smooth(ctx.fm, calib, alpha=alpha, statistics=stats)  # the best, again
    candidate = quantize_int8(smoothed, calib, config, threads=ctx.threads, variant=first.variant)
    speeds = relative_speeds([first.model, candidate.model], calib, batch=ctx.batch,
                             threads=ctx.threads)
    section["speed_with_vs_without"] = round(speeds[1], 3)
    if speeds[1] < 0.95:
        return first
    section.update(alpha=alpha, kept=True)
    ctx.fm = smoothed  # the smoothed float model is what the plan quantizes
    candidate.search = first.search
    return candidate


def _scorer(ctx: RunContext, calib: Dataset, config: Int8Config
            ) -> tuple[Callable[[Int8Outcome], float], float, str]:
    """(score of a candidate, target, metric name): higher scores are better."""
    selection = calib.take(0, 256 if config.max_drop is not None else 64)
    if config.max_drop is not None:
        if selection.labels is None:
            raise DataError(f"{calib.source}: option max_drop needs labels ('y') in the data")
        base = accuracy(reference_outputs(ctx.fm, selection, threads=ctx.threads)[0],
                        selection.labels)
        if base is None:
            raise DataError("option max_drop needs a classifier output (batch, classes)")

        def drop(candidate: Int8Outcome) -> float:  # minus the drop in points
            return -(100.0 * float(base) - float(accuracy_points(candidate.model, selection) or 0.0))

        return drop, -float(config.max_drop), "minus_accuracy_drop"
    reference = reference_outputs(ctx.fm, selection, threads=ctx.threads)
    return (lambda c: output_cosine(c.model, selection, reference)), float(config.min_cosine or 0), \
        "cosine"


def _meet_target(ctx: RunContext, calib: Dataset, config: Int8Config,
                 first: Int8Outcome) -> Int8Outcome:
    score, target, metric = _scorer(ctx, calib, config)
    base, smoothed_inputs, alpha_used = ctx.fm, 0, None
    first_score = score(first)
    if config.smoothquant and first.plan.nodes_with(Treatment.DYNAMIC) and first_score < target:
        # SmoothQuant first: it keeps every layer INT8 (full speed) when it suffices
        from lowbit.backends.onnx.smoothquant import smooth, smoothing_statistics

        stats = smoothing_statistics(ctx.fm, calib, threads=ctx.threads)  # once, every alpha
        for alpha in SMOOTHQUANT_ALPHAS:  # migration strength; the best on calibration wins
            smoothed, n_inputs = smooth(ctx.fm, calib, alpha=alpha, statistics=stats)
            if not n_inputs:
                break
            candidate = quantize_int8(smoothed, calib, config, threads=ctx.threads,
                                      variant=first.variant)
            value = score(candidate)
            if value > first_score:
                base, first, first_score, smoothed_inputs, alpha_used = (
                    smoothed, candidate, value, n_inputs, alpha)
            if first_score >= target:
                break
    chosen, variant = first.method or config.calibration, first.variant

    def build(excluded: tuple[str, ...]) -> Int8Outcome:
        cfg = config.replace(exclude_nodes=tuple(config.exclude_nodes) + excluded,
                             calibration=chosen)
        return quantize_int8(base, calib, cfg, threads=ctx.threads, variant=variant)

    result: SearchResult[Int8Outcome] = meet_quality_target(
        build, first, first.plan.quantized_layers(), score, target, metric=metric,
        progress=ctx.progress)
    candidate = result.candidate
    if base is not ctx.fm and not candidate.plan.quantized_layers():
        # every layer went back to float: the smoothed copy buys nothing, keep the model
        base, smoothed_inputs, alpha_used = ctx.fm, 0, None
        candidate = build(tuple(n for n, _ in first.plan.quantized_layers()))
    _report_search(ctx, config, result, smoothed_inputs if base is not ctx.fm else 0, alpha_used,
                   metric)
    if base is not ctx.fm:
        ctx.fm = base  # the smoothed float model is what the plan quantizes
    return candidate


def _report_search(ctx: RunContext, config: Int8Config, result: SearchResult[Any],
                   smoothed_inputs: int, alpha: float | None, metric: str) -> None:
    key = "cosine_on_calibration_samples" if metric == "cosine" else \
        "minus_accuracy_drop_on_calibration_samples"
    ctx.sections["quality_target"] = {
        "min_cosine": config.min_cosine, "max_drop": config.max_drop, "met": result.met,
        key: round(result.score, 6), "kept_in_float": result.kept_float,
        "sensitivity": result.sensitivity, "smoothquant_inputs": smoothed_inputs,
        "smoothquant_alpha": alpha}
    if not result.met:
        ctx.warnings.append(f"quality target (min_cosine {config.min_cosine}, max_drop "
                            f"{config.max_drop}) not reached; best score {result.score:.5f}")
