"""Mixed precision: INT4 / INT8 / float per MatMul/Gemm layer, as one plan.

Sensitivity of a layer = the model's mean output cosine against float when only
that layer is quantized (INT4 weight-only RTN, and INT8 dynamic). A plan for a
quality target starts all-INT4 and demotes the most damaging layers (INT4 ->
INT8 -> float) until the whole model meets it; a plan for a size target takes
the least damaging layers to INT4 first. Either way the layers' precisions
become ONE quantization plan, written once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.backends.onnx.plan import build_int8_plan
from lowbit.backends.onnx.quantize import fill_weights, lacks_vnni
from lowbit.backends.onnx.scoring import output_cosine, reference_outputs
from lowbit.backends.onnx.store import FloatModel
from lowbit.backends.onnx.weight_only import linear_layers, plan_weight_only
from lowbit.backends.onnx.writer import write_model
from lowbit.config import MixedPrecisionConfig, Precision, WeightOnlyConfig
from lowbit.data import Dataset
from lowbit.errors import ValidationError
from lowbit.quant.plan import QuantizationPlan, Treatment
from lowbit.stages.base import ProgressFn, RunContext, register

PLAN_FORMAT = "lowbit.mixed-precision/1"
_ORDER = (Precision.INT4, Precision.INT8, Precision.FLOAT)


def mixed_plan(fm: FloatModel, precision: dict[str, Precision], calib: Dataset | None, *,
               group_size: int = 128, threads: int = 1) -> QuantizationPlan:
    """INT4 layers -> weight-only (RTN), INT8 -> dynamic INT8, the rest float: one plan."""
    names = [w.name for w in linear_layers(fm)[0]]
    unknown = sorted(set(precision) - set(names))
    if unknown:
        raise ValidationError(f"plan: no MatMul/Gemm layer named {unknown[:3]}")
    int8 = {n for n in names if precision.get(n) is Precision.INT8}
    int4 = {n for n in names if precision.get(n) is Precision.INT4}
    # Attention (com.microsoft) would follow MatMul; a plan names MatMul/Gemm layers only
    plan = build_int8_plan(fm, treatments={"Gemm": Treatment.DYNAMIC, "MatMul": Treatment.DYNAMIC,
                                           "Attention": Treatment.FLOAT},
                           keep_float={n: "float in the mixed-precision plan" for n in names
                                       if n not in int8})
    fill_weights(plan, fm, "channel", reduce_range=lacks_vnni())
    if int4:
        config = WeightOnlyConfig(bits=4, group_size=group_size, embeddings=False,
                                  exclude_nodes=tuple(n for n in names if n not in int4))
        low = plan_weight_only(fm, config, calib, threads=threads)
        plan.nodes.update(low.nodes)
        plan.tensors.update(low.tensors)
        plan.weight_values.update(low.weight_values)
        plan.layer_error.update(low.layer_error)
        replaced = {d.name: d for d in low.decisions if d.name in low.nodes}
        plan.decisions[:] = [replaced.get(d.name, d) for d in plan.decisions]
    return plan


@register(MixedPrecisionConfig)
def mixed_stage(config: MixedPrecisionConfig, ctx: RunContext) -> dict[str, Any]:
    ctx.plan = mixed_plan(ctx.fm, config.precision, ctx.train, group_size=config.group_size,
                          threads=ctx.threads)
    counts: dict[str, int] = {}
    for _, p in config.layers:
        counts[p.value] = counts.get(p.value, 0) + 1
    ctx.sections["plan"] = {"layers": {k: v.value for k, v in config.layers}, "counts": counts}
    return {"group_size": config.group_size}


def _cosine(fm: FloatModel, precision: dict[str, Precision], selection: Dataset,
            reference: list[np.ndarray], group_size: int, threads: int) -> float:
    model = write_model(fm, mixed_plan(fm, precision, selection, group_size=group_size,
                                       threads=threads))
    return output_cosine(model, selection, reference)


def layer_sensitivity(fm: FloatModel, calib: Dataset, *, group_size: int = 128, threads: int = 1,
                      samples: int = 32, progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Output cosine vs float with only one layer quantized, INT4 and INT8, per layer."""
    selection = calib.take(0, samples)
    reference = reference_outputs(fm, selection, threads=threads)
    layers = linear_layers(fm)[0]
    rows = []
    for k, item in enumerate(layers):
        row: dict[str, Any] = {"name": item.name,
                               "params": int(np.asarray(fm.constant(item.weight)).size)}
        for p in (Precision.INT4, Precision.INT8):
            row[f"cosine_{p.value}"] = round(_cosine(fm, {item.name: p}, selection, reference,
                                                     group_size, threads), 6)
        rows.append(row)
        if progress is not None:
            progress("measuring layer sensitivity", k + 1, len(layers))
    return rows


def plan_for_size(sensitivity: list[dict[str, Any]], max_weight_bits: float) -> dict[str, Precision]:
    """INT8 everywhere, then INT4 on the least damaging layers until the average bits per
    linear weight is at most ``max_weight_bits``."""
    total = sum(r["params"] for r in sensitivity)
    layers = {r["name"]: Precision.INT8 for r in sensitivity}
    bits = {r["name"]: 8.0 for r in sensitivity}
    for r in sorted(sensitivity, key=lambda r: -r["cosine_int4"]):  # least damaging first
        if sum(bits[x["name"]] * x["params"] for x in sensitivity) / max(1, total) <= max_weight_bits:
            break
        layers[r["name"]], bits[r["name"]] = Precision.INT4, 4.0
    return layers


def plan_for_quality(fm: FloatModel, calib: Dataset, sensitivity: list[dict[str, Any]], *,
                     min_cosine: float, group_size: int = 128, threads: int = 1
                     ) -> tuple[dict[str, Precision], float]:
    """Start all-INT4; demote the most damaging layers (INT4 -> INT8 -> float) one at a
    time until the whole model meets ``min_cosine`` on calibration samples."""
    selection = calib.take(0, 32)
    reference = reference_outputs(fm, selection, threads=threads)
    layers = {r["name"]: Precision.INT4 for r in sensitivity}
    queue = [(r["name"], Precision.INT8) for r in sorted(sensitivity, key=lambda r: r["cosine_int4"])] \
        + [(r["name"], Precision.FLOAT) for r in sorted(sensitivity, key=lambda r: r["cosine_int8"])]
    cosine = _cosine(fm, layers, selection, reference, group_size, threads)
    for name, precision in queue:
        if cosine >= min_cosine:
            break
        if _ORDER.index(layers[name]) >= _ORDER.index(precision):
            continue
        layers[name] = precision
        cosine = _cosine(fm, layers, selection, reference, group_size, threads)
    return layers, cosine


def plan_for_target(fm: FloatModel, calib: Dataset, *, min_cosine: float | None = None,
                    max_bits: float | None = None, group_size: int = 128, threads: int = 1,
                    progress: ProgressFn | None = None) -> dict[str, Any]:
    """The plan file's content (JSON-ready): layers, targets, the sensitivity table."""
    rows = layer_sensitivity(fm, calib, group_size=group_size, threads=threads, progress=progress)
    if not rows:
        raise ValidationError("the model has no MatMul/Gemm layer with a constant weight: "
                              "there is nothing to plan")
    plan: dict[str, Any] = {"format": PLAN_FORMAT}
    if min_cosine is not None:
        layers, cosine = plan_for_quality(fm, calib, rows, min_cosine=min_cosine,
                                          group_size=group_size, threads=threads)
        plan["cosine_on_calibration_samples"] = round(cosine, 6)
    else:
        layers = plan_for_size(rows, float(max_bits or 0))
    plan.update({"layers": {k: v.value for k, v in layers.items()},
                 "targets": {"min_cosine": min_cosine, "max_weight_bits": max_bits},
                 "sensitivity": rows, "group_size": group_size})
    return plan
