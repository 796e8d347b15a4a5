"""Meet an output-quality target (``min_cosine``) with the fewest layers in float.

If the fully quantized model's mean output cosine against float (on calibration
samples) is below the target, each quantized Conv/Gemm/MatMul is measured
alone (only that layer quantized: its *sensitivity*), the layers are ordered
from most to least sensitive, and the smallest number of them is kept in float
(binary search over that order) for which the whole model meets the target.
Every layer kept in float costs speed, so the search keeps as few as it can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from lowbit.data import Dataset
from lowbit.report.metrics import mean_cosine
from lowbit.runtime.session import make_session, run_batches

WEIGHTED = ("Conv", "Gemm", "MatMul")


@dataclass
class SearchResult:
    model: onnx.ModelProto
    outcome: Any
    score: float  # cosine, or minus the accuracy drop, of the returned model
    kept_float: list[str] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    met: bool = True
    smoothquant_inputs: int = 0  # MatMul inputs smoothed before the search (0: none)
    smoothquant_alpha: float | None = None


def output_cosine(model: onnx.ModelProto, data: Dataset, reference: list[np.ndarray]) -> float:
    outs = run_batches(make_session(model, name="candidate"), data, 16)
    return float(np.mean([mean_cosine(r, o) for r, o in zip(reference, outs)]))


def quantized_layers(outcome: Any) -> list[tuple[str, str]]:
    return [(d.name, d.op_type) for d in outcome.plan.decisions
            if d.op_type in WEIGHTED and d.treatment.startswith("int8")]


def meet_min_cosine(build: Callable[[tuple[str, ...]], Any], first: Any, data: Dataset,
                    reference: list[np.ndarray], target: float,
                    progress: Callable[[str, int, int], None] | None = None,
                    score: Callable[[onnx.ModelProto], float] | None = None,
                    metric: str = "cosine") -> SearchResult:
    """``build(excluded_node_names)`` quantizes with those nodes kept in float.

    ``score`` (higher is better, default: output cosine) and ``target`` may be any
    quality measure, e.g. minus the accuracy drop in points for ``max_drop``."""
    if score is None:
        def score(model: onnx.ModelProto) -> float:
            return output_cosine(model, data, reference)
    key = f"{metric}_when_only_this_is_int8"
    cosine = score(first.model)
    if cosine >= target:
        return SearchResult(first.model, first, cosine)
    layers = quantized_layers(first)
    names = [n for n, _ in layers]
    sensitivity = []
    for k, (name, op) in enumerate(layers):
        others = tuple(n for n in names if n != name)
        alone = score(build(others).model)
        sensitivity.append({"name": name, "op_type": op, key: round(alone, 6)})
        if progress is not None:
            progress("measuring layer sensitivity", k + 1, len(layers))
    order = [s["name"] for s in sorted(sensitivity, key=lambda s: s[key])]
    lo, hi = 1, len(order)  # smallest k in [1, n] that meets the target
    best: tuple[int, Any, float] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = build(tuple(order[:mid]))
        c = score(candidate.model)
        if c >= target:
            best = (mid, candidate, c)
            hi = mid - 1
        else:
            lo = mid + 1
    if best is None:  # even all-float weighted layers miss it: report, keep the first result
        return SearchResult(first.model, first, cosine, [], sensitivity, met=False)
    k, outcome, c = best
    return SearchResult(outcome.model, outcome, c, order[:k], sensitivity)
