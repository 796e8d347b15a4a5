"""Per-layer sensitivity and a mixed-precision plan (INT4 / INT8 / float per layer).

Sensitivity of a layer = the model's mean output cosine against float when only
that layer is quantized (INT4 weight-only, RTN; and INT8 dynamic). The plan
starts from everything INT4 and moves the most damaging layers to INT8, then
to float, until the quality target is met, or takes the least damaging layers
to INT4 until a size target is met. A plan is plain data
``{"layers": {node: "int4" | "int8" | "float"}, ...}``, saved as JSON, and
``apply_plan`` turns it into one ONNX model (MatMulNBits + dynamic INT8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from lowbit.data import Dataset
from lowbit.errors import ValidationError
from lowbit.onnx.accuracy import output_cosine
from lowbit.onnx.store import FloatModel
from lowbit.quant.scheme import QuantizeConfig, QuantMode
from lowbit.runtime.session import make_session, run_batches

PRECISIONS = ("int4", "int8", "float")


def _linear_layers(fm: FloatModel) -> list[tuple[str, int]]:
    """(node name, weight parameter count) of MatMul/Gemm nodes with constant weights."""
    from lowbit.onnx.weight_only import WeightOnlyConfig, _candidates

    nodes, _ = _candidates(fm, WeightOnlyConfig())
    names = {id(n): n.name or f"{n.op_type}_{i}" for i, n in enumerate(fm.proto.graph.node)}
    out = []
    for n in nodes:
        w = fm.constant(n.input[1])
        out.append((names[id(n)], int(np.asarray(w).size)))
    return out


def apply_plan(fm: FloatModel, plan: dict[str, Any], calib: Dataset, *, group_size: int = 128,
               threads: int = 1) -> onnx.ModelProto:
    """One model: ``int4`` layers -> MatMulNBits, ``int8`` -> dynamic INT8, rest float."""
    from lowbit.onnx.load import load_model
    from lowbit.onnx.quantize import quantize_onnx
    from lowbit.onnx.weight_only import WeightOnlyConfig, quantize_weight_only

    layers: dict[str, str] = plan["layers"]
    bad = {k: v for k, v in layers.items() if v not in PRECISIONS}
    if bad:
        raise ValidationError(f"plan: unknown precision(s) {bad}; use {', '.join(PRECISIONS)}")
    all_names = [n for n, _ in _linear_layers(fm)]
    int4 = [n for n in all_names if layers.get(n) == "int4"]
    model: onnx.ModelProto = fm.joined()
    if int4:
        cfg = WeightOnlyConfig(bits=4, group_size=group_size, algorithm="rtn",
                               exclude_nodes=tuple(n for n in all_names if n not in int4),
                               embeddings=False)
        model = quantize_weight_only(fm, cfg, calib, threads=threads).model
    int8 = [n for n in all_names if layers.get(n) == "int8"]
    if int8:
        stage, _ = load_model(model)
        keep = tuple(n for n in all_names if n not in int8)
        cfg8 = QuantizeConfig(mode=QuantMode.DYNAMIC, exclude_nodes=keep)
        model = quantize_onnx(stage, calib, cfg8, threads=threads).model
    return model


def layer_sensitivity(fm: FloatModel, calib: Dataset, *, group_size: int = 128,
                      threads: int = 1, samples: int = 32,
                      progress: Callable[[str, int, int], None] | None = None
                      ) -> list[dict[str, Any]]:
    """Output cosine vs float with only one layer quantized, INT4 and INT8, per layer."""
    selection = calib.take(0, min(calib.num_samples, samples))
    reference = run_batches(make_session(fm, threads=threads), selection, 16)
    layers = _linear_layers(fm)
    rows = []
    for k, (name, params) in enumerate(layers):
        row: dict[str, Any] = {"name": name, "params": params}
        for precision in ("int4", "int8"):
            model = apply_plan(fm, {"layers": {name: precision}}, calib, group_size=group_size,
                               threads=threads)
            row[f"cosine_{precision}"] = round(output_cosine(model, selection, reference), 6)
        rows.append(row)
        if progress is not None:
            progress("measuring layer sensitivity", k + 1, len(layers))
    return rows


def plan_mixed(sensitivity: list[dict[str, Any]], *, min_cosine: float | None = None,
               max_weight_bits: float | None = None) -> dict[str, Any]:
    """A first plan from the per-layer table (verified and refined by ``search_plan``).

    ``max_weight_bits``: average bits per linear weight to stay under (e.g. 5.0);
    INT4 goes to the least sensitive layers first.
    """
    if min_cosine is None and max_weight_bits is None:
        raise ValidationError("mixed precision needs a target: min_cosine or max_weight_bits")
    order = sorted(sensitivity, key=lambda r: -r["cosine_int4"])  # least damaging first
    layers = {r["name"]: "float" for r in sensitivity}
    if max_weight_bits is not None:
        total = sum(r["params"] for r in sensitivity)
        bits = {r["name"]: 32.0 for r in sensitivity}
        for r in order:  # INT8 everywhere first, then INT4 where it hurts least
            layers[r["name"]], bits[r["name"]] = "int8", 8.0
        for r in order:
            if sum(bits[n] * p["params"] for n, p in ((x["name"], x) for x in sensitivity)) \
                    / total <= max_weight_bits:
                break
            layers[r["name"]], bits[r["name"]] = "int4", 4.0
    else:
        for r in sensitivity:
            layers[r["name"]] = "int4" if r["cosine_int4"] >= 1 - (1 - min_cosine) / 4 else \
                "int8" if r["cosine_int8"] >= 1 - (1 - min_cosine) / 4 else "float"
    return {"format": "lowbit.mixed-precision/1", "layers": layers,
            "targets": {"min_cosine": min_cosine, "max_weight_bits": max_weight_bits}}


def search_plan(fm: FloatModel, calib: Dataset, sensitivity: list[dict[str, Any]], *,
                min_cosine: float, group_size: int = 128, threads: int = 1) -> tuple[dict, float]:
    """Start all-INT4; demote the most damaging layers (INT4 -> INT8 -> float) one at a
    time until the whole model meets ``min_cosine`` on calibration samples."""
    selection = calib.take(0, min(calib.num_samples, 32))
    reference = run_batches(make_session(fm, threads=threads), selection, 16)
    layers = {r["name"]: "int4" for r in sensitivity}
    steps = sorted(sensitivity, key=lambda r: r["cosine_int4"])  # most damaging first
    queue = [(r["name"], "int8") for r in steps] + \
        [(r["name"], "float") for r in sorted(sensitivity, key=lambda r: r["cosine_int8"])]
    cosine = output_cosine(apply_plan(fm, {"layers": layers}, calib, group_size=group_size,
                                      threads=threads), selection, reference)
    for name, precision in queue:
        if cosine >= min_cosine:
            break
        if PRECISIONS.index(layers[name]) >= PRECISIONS.index(precision):
            continue
        layers[name] = precision
        cosine = output_cosine(apply_plan(fm, {"layers": layers}, calib, group_size=group_size,
                                          threads=threads), selection, reference)
    plan = {"format": "lowbit.mixed-precision/1", "layers": layers,
            "targets": {"min_cosine": min_cosine}, "cosine_on_calibration_samples": round(cosine, 6)}
    return plan, cosine



def read_plan(path: str, fm: FloatModel) -> dict[str, Any]:
    """Load a plan JSON file and check it against the model (clear errors, no eval)."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(f"plan file not found: {p}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(f"plan file {p} is not valid JSON: {exc}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), dict):
        raise ValidationError(f"plan file {p}: expected an object with a 'layers' mapping")
    known = {n for n, _ in _linear_layers(fm)}
    unknown = sorted(set(plan["layers"]) - known)
    if unknown:
        raise ValidationError(f"plan file {p}: no MatMul/Gemm layer named {unknown[:3]}")
    return plan
